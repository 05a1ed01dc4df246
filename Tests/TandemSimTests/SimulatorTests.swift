import Testing
import TandemSim

/// The simulator over many seeds, and the seeds that found bugs (regressions). Replay any of
/// them: `tandem sim --seed N --verbose` (with the test's option).
@Suite struct SimulatorTests {
    static let chunks = 8
    static let seedsPerChunk = 125

    static func check(_ report: SimReport) {
        #expect(report.failure == nil, "\(report.failure.map { "\($0)" } ?? "")")
    }

    /// 1000 seeds (1 ... 1000), in chunks that run in parallel.
    @Test(arguments: 0..<chunks)
    func thousandSeeds(chunk: Int) {
        SimCrashReporter.install()
        for k in 0..<Self.seedsPerChunk {
            let seed = UInt64(1 + chunk * Self.seedsPerChunk + k)
            let report = Simulator.run(seed: seed, options: SimOptions(slot: chunk))
            Self.check(report)
            if report.failure != nil { return }
        }
    }

    /// The modes the default run leaves out, 100 seeds each, in parallel with the chunks above;
    /// each covers what it adds.
    enum Mode: String, CaseIterable, CustomStringConvertible {
        case switchover, witness, barriers, witnessBarriers

        var options: SimOptions {
            switch self {
            case .switchover: SimOptions(switchover: true, slot: SimulatorTests.chunks)
            case .witness: SimOptions(witness: true, slot: SimulatorTests.chunks + 1)
            case .barriers: SimOptions(barriers: true, slot: SimulatorTests.chunks + 2)
            case .witnessBarriers: SimOptions(witness: true, barriers: true, slot: SimulatorTests.chunks + 3)
            }
        }

        var covers: [String] {
            switch self {
            case .switchover: ["switchover", "switchover done"]
            case .witness: ["fault isolation", "fault witness restart", "witness fenced the peer", "witness promotion", "quorum lost"]
            case .barriers: ["barrier recorded", "undo records saved", "rollback done", "rollback finished at start", "rollback resynced"]
            case .witnessBarriers: ["rollback recorded by the witness", "rollback done", "rollback resynced"]
            }
        }

        var description: String { self == .witnessBarriers ? "witness barriers" : rawValue }
    }

    @Test(arguments: Mode.allCases)
    func hundredSeeds(mode: Mode) {
        SimCrashReporter.install()
        var counts: [String: Int] = [:]
        for seed in UInt64(1)...100 {
            let report = Simulator.run(seed: seed, options: mode.options)
            Self.check(report)
            if report.failure != nil { return }
            for (k, v) in report.counts { counts[k, default: 0] += v }
        }
        for what in mode.covers {
            #expect(counts[what, default: 0] > 0, "no \(what) in 100 seeds with \(mode): \(counts)")
        }
    }

    @Test func aSeedReplaysExactly() {
        let a = Simulator.run(seed: 77, options: SimOptions(traceEvents: 500))
        let b = Simulator.run(seed: 77, options: SimOptions(traceEvents: 500))
        #expect(a.events == b.events && a.simNanos == b.simNanos && a.counts == b.counts)
        #expect(a.events > 1000, "a run does something")
    }

    /// Over the 1000 seeds, every fault and the interesting transitions happen.
    @Test func seedsCoverTheFaults() {
        var counts: [String: Int] = [:]
        for seed in UInt64(1)...120 {
            for (k, v) in Simulator.run(seed: seed).counts { counts[k, default: 0] += v }
        }
        for what in ["fault reset", "fault partition", "fault power loss", "fault process crash", "fault clean restart",
                     "fault disk errors", "fault corruption", "verify", "al eviction", "decision becomeSource", "connect"] {
            #expect(counts[what, default: 0] > 0, "no \(what) in 120 seeds: \(counts)")
        }
    }

    // MARK: Regressions: seeds that found real bugs (see the commit that fixed each)

    /// ReplicaCore detached the primary's disk on a write error while the peer was an
    /// Inconsistent resync target, acknowledging writes held only by the half-synced peer.
    @Test(arguments: SimRegressions.detachWithoutUpToDatePeer)
    func detachOnlyWithAnUpToDatePeer(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true)))
    }

    /// Failover with promote: the sync decision used the local `wasPrimary` flag, which the peer
    /// never sees (both became sync source); and a crashed primary returning as secondary to a
    /// live primary of the same generation made both want to be source (a role conflict forever).
    @Test(arguments: SimRegressions.failoverDecisions)
    func failoverDecisionsAgree(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true)))
    }

    /// A primary that wrote before its first connection connected with noSync and never copied
    /// those blocks.
    @Test(arguments: SimRegressions.noSyncIgnoredBitmap)
    func noSyncCopiesWhatThePrimaryWroteAlone(seed: UInt64) {
        Self.check(Simulator.run(seed: seed))
    }

    /// Resync slots whose data was sent before a link loss were never freed: the next resync
    /// stalled forever.
    @Test(arguments: SimRegressions.sentResyncSlotsLeaked)
    func sentResyncSlotsAreFreedOnLinkLoss(seed: UInt64) {
        Self.check(Simulator.run(seed: seed))
    }

    /// A resync write acknowledged from the target's volatile cache, lost in a power loss, with
    /// neither bitmap remembering it.
    @Test(arguments: SimRegressions.resyncWriteNotDurable)
    func resyncWritesAreDurableWhenAcknowledged(seed: UInt64) {
        Self.check(Simulator.run(seed: seed))
    }

    /// Not a bug found, a bug planted to see the simulator find it: a resync target that writes
    /// without FUA and acknowledges each run when its write completes, before a flush covers it
    /// (group commit done wrong). A power loss of the target took acknowledged runs from its
    /// cache; the source had cleared their bits. The first failing seed of each mode.
    @Test(arguments: SimRegressions.resyncAckBeforeTargetFlush)
    func resyncAcksWaitForTheTargetsFlush(seed: UInt64, mode: String) {
        let options: SimOptions = switch mode {
        case "witness": SimOptions(witness: true)
        case "failover": SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true)
        default: SimOptions()
        }
        Self.check(Simulator.run(seed: seed, options: options))
    }

    /// With the target's resync acks held for its flush: a client write over a run already sent
    /// failed on the source's disk; the run's ack, later than the write's, cleared the mark.
    @Test(arguments: SimRegressions.markClearedByLateResyncAck)
    func aMarkSetAfterAResyncRunWasSentSurvivesItsAck(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true, switchover: true, witness: true)))
    }

    /// A checker error: a failover onto a peer not up to date kept the stable value of blocks the
    /// peer held only in its cache (a FLUSH answered by the old primary alone after a link loss).
    @Test(arguments: SimRegressions.checkerFailoverOntoCachedCopy)
    func aFailoverKeepsOnlyThePeersDurableCopy(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, primaryDiskErrors: true, doubleFaults: true, switchover: true)))
    }

    /// A checker error: the peer acknowledged a write (FUA: durable there) and lost power; the
    /// primary, not knowing, answered it after the link had died, and the checker counted it as
    /// written alone. The peer, promoted later, wrote alone and rightly became the source.
    @Test(arguments: SimRegressions.checkerPeerAckedBeforeLinkDied)
    func aWriteThePeerAcknowledgedIsNotWrittenAlone(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, primaryDiskErrors: true, doubleFaults: true, switchover: true)))
    }

    /// Found after the fix above, further in the same mode: a primary lost its link with writes
    /// its peer had not flushed (marked out of sync) and demoted; at the next connect (noSync, the
    /// demoted node the source of its marks) the peer was connected and UpToDate before the
    /// bitmap came, and a switchover promoted it without those blocks.
    @Test(arguments: SimRegressions.targetOfPeerMarksPromoted)
    func aSecondaryThePeersMarksMakeTheTargetWaitsForTheirResync(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, primaryDiskErrors: true, doubleFaults: true, switchover: true)))
    }

    /// A clean stop as primary whose final sync fails (a failing disk) keeps `wasPrimary`
    /// (`ReplicatedNode.stop`), and the machine loses power before the restart: the restart, a
    /// crashed primary's, resyncs the log's extents from what the disk kept. These seeds run that
    /// path; none was found where the old order (the flag cleared before the sync) broke an
    /// invariant, so they pin the path and the model, not the bug.
    @Test(arguments: SimRegressions.stopWhoseFinalSyncFailed)
    func aStopWhoseFinalSyncFailedKeepsWasPrimary(seed: UInt64) {
        let report = Simulator.run(seed: seed, options: SimOptions(failover: true, primaryDiskErrors: true, doubleFaults: true))
        Self.check(report)
        #expect(report.counts["stop after a failed final sync: wasPrimary kept", default: 0] > 0)
        #expect(report.counts["fault power loss while stopped", default: 0] > 0)
    }

    /// The node evicted activity-log extents whose writes were still in the volatile cache: after
    /// a primary power loss they were neither on its disk nor resynced.
    @Test(arguments: SimRegressions.alEvictionWithoutDataSync)
    func alEvictionSyncsTheDataFirst(seed: UInt64) {
        Self.check(Simulator.run(seed: seed))
    }

    /// Resync ids repeated across links: a target still writing an earlier link's data got the
    /// same id again and tripped a precondition in ReplicaCore.
    @Test(arguments: SimRegressions.resyncIDsRepeated)
    func resyncIDsDifferAcrossLinks(seed: UInt64) {
        Self.check(Simulator.run(seed: seed))
    }

    /// Overlapping client writes in flight reached the primary's disk in any order and the
    /// peer's in arrival order: the replicas ended different.
    @Test(arguments: SimRegressions.overlappingWritesReordered)
    func overlappingWritesLandInOneOrderOnBothDisks(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(overlappingClientWrites: true)))
    }

    /// Both nodes crash before the primary noticed the secondary's crash: acknowledged writes
    /// lost from the secondary's cache were only in the primary's transfer log, and their
    /// activity-log extents were already released (now they settle when a peer flush covers them).
    @Test(arguments: SimRegressions.extentsReleasedBeforePeerFlush)
    func doubleCrashBeforeTheLinkLossIsNoticed(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(doubleFaults: true)))
    }

    /// Failover (the survivor promoted with `promote`) onto a secondary whose disk failed a
    /// replicated write: the primary answered the write and marked it out of sync, but the
    /// secondary stayed UpToDate and was promoted without it (now it detaches, as DRBD does).
    @Test(arguments: SimRegressions.failedSecondaryPromoted)
    func aSecondaryThatFailedAWriteIsNotPromoted(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true)))
    }

    /// A primary whose disk was detached came back, after a restart, UpToDate on stale data (now
    /// it is persisted as a resync target and restarts secondary until resynced).
    @Test(arguments: SimRegressions.detachedDiskRestarted)
    func aDetachedDiskRestartedIsResynced(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true)))
    }

    /// A client write during a verify's handshake started a generation the target never adopted;
    /// after a switchover the next link loss looked like a split brain.
    @Test(arguments: SimRegressions.generationDuringHandshake)
    func aWriteDuringAHandshakeStartsNoGeneration(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(switchover: true)))
    }

    /// A primary demoted with blocks out of sync (an overflowed transfer log, or the link lost
    /// before the demotion); the secondary's bits were never resynced and the promoted peer could
    /// lack them.
    @Test(arguments: SimRegressions.demotedWithBlocksOutOfSync)
    func blocksOutOfSyncAreCopiedBeforeAndAfterADemotion(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(switchover: true)))
    }

    /// A secondary resync source ended the resync with the copied blocks only in its cache and
    /// lost them in a power loss; the target kept them and no bitmap said so.
    @Test(arguments: SimRegressions.resyncSourceNotDurable)
    func theResyncSourceFlushesBeforeTheEnd(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, primaryDiskErrors: true, doubleFaults: true, switchover: true)))
    }

    /// A secondary resync source sent a block it held only in its cache (a replicated write no
    /// flush had covered, whose primary had crashed); both sides cleared the bit, the link reset,
    /// and a power loss took the block from the source (now the source flushes before it reads).
    @Test(arguments: SimRegressions.resyncSourceReadUnflushed)
    func theResyncSourceFlushesBeforeItReads(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(overlappingClientWrites: true, primaryDiskErrors: true, switchover: true)))
    }

    /// The simulator's operator: a promotion queued at a restart, while the node was the one to
    /// be primary, fired during a later switchover's promoting step and promoted it alone while
    /// the demoted peer held writes it lacked (now that step alone promotes).
    @Test(arguments: SimRegressions.stalePromotionDuringSwitchover)
    func aStalePromotionWaitsForTheSwitchover(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(overlappingClientWrites: true, primaryDiskErrors: true, switchover: true, barriers: true)))
    }

    /// A client flush failed on the primary's disk and the peer's flush answered it: the ack
    /// settled the writes it covered and detached the disk in one batch, the settlement first,
    /// and a write waiting for room in the activity log evicted a settled write's extent without
    /// a sync (the disk was detached) before the detach's state change marked the log's extents.
    /// A power loss took that write from the disk's cache, the resync after the restart skipped
    /// it, and the node, promoted again, lacked an acknowledged write (now such an eviction marks
    /// the extents it takes).
    @Test(arguments: SimRegressions.evictedBeforeTheDetachWasMarked)
    func anExtentEvictedBeforeTheDetachIsMarked(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(overlappingClientWrites: true, primaryDiskErrors: true, switchover: true, barriers: true)))
    }

    /// A resync source counted its target UpToDate as it sent `resyncDone`; a client write or
    /// flush then failed on its disk and the target's answer detached it, and a reset or a
    /// partition took `resyncDone`: both disks ended Inconsistent, though the target held every
    /// acknowledged write, and every promotion was refused (no end after 2000000 events, or no
    /// convergence). Now the source detaches its disk for the target's copy only once the target
    /// has said it is UpToDate.
    @Test(arguments: SimRegressions.detachedBeforeTheTargetKnewItWasDone)
    func theSourceKeepsItsDiskUntilTheTargetConfirmsTheResyncsEnd(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(overlappingClientWrites: true, primaryDiskErrors: true, switchover: true, barriers: true)))
    }

    /// A primary's write failed on its disk during a verify's handshake that made it the resync
    /// source; the peer's hello said UpToDate, so the disk detached and the write was answered,
    /// and the detached disk still became the source and copied its stale blocks over the peer's
    /// good ones (now a side about to be the source keeps its disk and the write fails).
    @Test(arguments: SimRegressions.detachedBeforeBecomingSource)
    func aSideAboutToBeTheSourceKeepsItsDisk(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(overlappingClientWrites: true, primaryDiskErrors: true, doubleFaults: true, switchover: true, witness: true)))
    }

    /// A secondary holding the only copy of writes its peer lacked (written as primary before a
    /// power loss) became the resync source of the stale peer; the link reset, and its flush
    /// before the first read failed on a failing disk: it detached as an UpToDate secondary
    /// does. The peer was an Inconsistent target by then, the restart that attaches a detached
    /// disk made this one Inconsistent too, and for 10000 simulated seconds neither node could
    /// be promoted or resynced (the client waited, the faults went on: no end after 2000000
    /// events). Now such a secondary keeps its disk, as a primary whose peer is no full copy does.
    @Test(arguments: SimRegressions.onlyCopyDetachedAsSecondary)
    func aSecondaryHoldingWritesItsPeerLacksKeepsItsDisk(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, witness: true, barriers: true)))
    }

    /// The same with a crashed primary restarted secondary, the source of its hot extents in
    /// the peer's own generation (no bitmap UUID): the link dropped just after the connect made
    /// the peer an Inconsistent target, then its flush before the first read failed and it
    /// detached; both disks ended Inconsistent and every promotion was refused (no end after
    /// 2000000 events). Now the source role that the link loss ended still keeps the disk.
    @Test(arguments: SimRegressions.sourceDetachedAfterTheLinkDropped)
    func aSourceWhoseLinkDroppedKeepsItsDisk(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, primaryDiskErrors: true, doubleFaults: true)))
    }

    /// With a witness, a secondary restarted after a power loss came back UpToDate without the
    /// acknowledged writes its cache lost, and the witness let it take over (now it attaches
    /// Consistent until a connect finds it current, as DRBD does with fencing).
    @Test(arguments: SimRegressions.restartedSecondaryTookOver)
    func aRestartedSecondaryWaitsForThePrimary(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(witness: true)))
    }

    /// The witness let a primary whose data was older than its peer's (the peer took over,
    /// wrote, then restarted as secondary) fence the peer and write on alone.
    @Test(arguments: SimRegressions.olderPrimaryFenced)
    func anOlderPrimaryIsNotFenced(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true, witness: true)))
    }

    /// A Consistent secondary was declared UpToDate at a connect that had blocks to copy from the
    /// primary, which died before the copy: the witness let it take over without them.
    @Test(arguments: SimRegressions.upToDateBeforeMarksCopied)
    func aConnectWithMarksWaitsForTheirResync(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(witness: true)))
    }

    /// A restarted witness (which knows nothing) recorded a second primary writing without its
    /// peer: two nodes fenced each other and both started generations.
    @Test(arguments: SimRegressions.restartedWitnessTwoPrimaries)
    func aRestartedWitnessLetsOnlyOnePrimaryWriteAlone(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(witness: true)))
    }

    /// A primary wrote without its peer, then demoted while cut off; seeing it secondary, the
    /// witness promoted the peer that lacked those writes.
    @Test(arguments: SimRegressions.demotedAheadOfPeer)
    func aNewerGenerationBlocksThePromotion(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(switchover: true, witness: true)))
    }

    /// A detached primary answered writes and flushes the link lost before the peer confirmed
    /// them: they were on neither disk.
    @Test(arguments: SimRegressions.detachedAnswerWithoutPeer)
    func aDetachedPrimaryAnswersOnlyWhatThePeerHas(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true)))
    }

    /// The core kept the `wasPrimary` it was built with, so the flag the node cleared at a
    /// demotion came back at the next persist: a crash as secondary then marked stale hot
    /// extents and made that node the sync source over its peer's newer data.
    @Test(arguments: SimRegressions.wasPrimaryKeptByTheCore)
    func aDemotionClearsWasPrimaryForGood(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true, switchover: true, witness: true)))
    }

    /// A write in flight when the primary's disk detached succeeded on it afterwards and was not
    /// marked; the detached disk is never flushed again, so a power loss took the write and the
    /// resync after the restart left that block differing.
    @Test(arguments: SimRegressions.doneOnADetachedDisk)
    func aWriteDoneOnADetachedDiskIsResynced(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true, switchover: true, witness: true)))
    }

    /// The switchover's flush failed on the primary's disk, and the node demoted with that disk
    /// still UpToDate: a write the flush covered (acknowledged, durable on the peer) sat only in
    /// its volatile cache, and the clean demotion dropped the activity log that a crash would
    /// have resynced. The disk detached later (a failed replicated write, which marked only that
    /// write), a power loss took the cached block, and the resync after the restart copied only
    /// the marked blocks: connected and in sync, the replicas differed. Now a failed client
    /// flush with a full copy on the peer detaches the disk, and a disk detached while primary
    /// marks the log's extents.
    @Test(arguments: SimRegressions.failedDemotionFlushKeptTheDisk)
    func aFailedFlushOnAPrimaryDetachesAndMarksItsLog(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true, switchover: true, witness: true)))
    }

    /// A primary cut off from both its peer and the witness held the answers to its writes
    /// (no fence); the witness promoted the peer and the client left. The simulated switchover
    /// then demoted the old primary with those answers still held (it drained on the client's
    /// view, not the node's), the node resynced from the peer (the held writes overwritten), and
    /// at its next promotion answered them as done: both nodes had acknowledged writes the other
    /// lacked. The node's NBD drain waits for its own requests, held answers included (they fail
    /// once quorum is lost); the simulator's switchover now does too.
    @Test(arguments: SimRegressions.demotedWithHeldAnswers)
    func aSwitchoverWaitsForHeldAnswers(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true, switchover: true, witness: true)))
    }

    /// A primary killed with acknowledged writes in its volatile cache restarted (the machine
    /// kept the cache) and then lost power before it connected: as a crashed primary it was the
    /// source of its hot extents, and copied the older blocks over the peer's (now the node syncs
    /// the device at attach).
    @Test(arguments: SimRegressions.unsyncedAtAttach)
    func theDeviceIsSyncedAtAttach(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true, witness: true)))
    }

    /// A secondary recorded a barrier while the writes before it were only in its disk's volatile
    /// cache; a power loss took them and the resync that repaired them saved the older content as
    /// the barrier's image.
    @Test(arguments: SimRegressions.barrierOnUnsyncedWrites)
    func aBarrierIsRecordedOnDurableWrites(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(barriers: true)))
    }

    /// A rollback finished at start (after a crash part way), or one that crashed before its
    /// metadata write, left the restored chunks unmarked and no new generation: the pair connected
    /// as equals and the replicas differed.
    @Test(arguments: SimRegressions.rollbackMarksLost)
    func aRollbackMarksItsChunksBeforeTheStoreForgetsIt(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(barriers: true)))
    }

    /// A detached secondary, or a resync target whose failed write the end of the resync forgot,
    /// recorded barriers whose images lacked the write it failed.
    @Test(arguments: SimRegressions.barrierAfterFailedWrite)
    func aSecondaryThatFailedAWriteKeepsNoBarrier(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(barriers: true)))
    }

    /// An undo record appended, its sync not yet done, when the node lost power survived; the
    /// restarted node counted its chunk saved, a resync write overwrote the chunk (durably, no
    /// save needed), and a second power loss took the never-synced record: the barrier's image
    /// read the resync's data. The store syncs its newest segment at open.
    @Test(arguments: SimRegressions.recoveredRecordsUnsynced)
    func recoveredUndoRecordsAreSyncedBeforeAnyWrite(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(barriers: true)))
    }

    /// Resync writes after a link loss, and the first client writes of a node promoted meanwhile,
    /// landed in the image of a barrier still to be recorded.
    @Test(arguments: SimRegressions.writesIntoPendingBarrier)
    func writesWaitBehindAPendingBarrier(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(switchover: true, barriers: true)))
    }

    /// A replicated write failed on the resync target just before the source ended the resync
    /// (its ack still on the way): the target became UpToDate without it and was promoted.
    @Test(arguments: SimRegressions.failedWriteBeforeResyncDone)
    func aTargetThatFailedAWriteIsNotUpToDateAtTheResyncsEnd(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true, witness: true)))
    }

    /// The checker's failover onto a stale peer took the peer's cache as what it keeps; the
    /// peer (an old primary cut off) lost its own unflushed write in a power loss.
    @Test(arguments: SimRegressions.checkerFailoverOntoUnflushedPeer)
    func aFailoverPeerKeepsOnlyWhatItsDiskMadeDurable(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true, witness: true)))
    }

    /// A rollback begun while the secondary was cut off from its peer lost its
    /// `disconnect(rollback)`; the witness, which had lost the secondary too, promoted the demoted
    /// peer, and the two generations met as a split brain (now nothing is restored before the
    /// witness, or else the peer over the link, has recorded the rollback).
    @Test(arguments: SimRegressions.rollbackNotRecorded)
    func aRollbackWaitsForItsRecord(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(witness: true, barriers: true)))
    }

    /// With the witness's refusal to promote the peer of a recorded rollback taken out (the
    /// record made, but not enforced): the link broke as a slow rollback started, or the
    /// rolling-back node crashed mid-restore, and the witness promoted the peer.
    @Test(arguments: SimRegressions.rollbackRecordNotEnforced)
    func aRecordedRollbackKeepsThePeerFromBeingPromoted(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(witness: true, barriers: true)))
    }

    /// A partition hid a survivor's promotion from its secondary; the primary fenced the
    /// secondary through the witness, wrote alone, and demoted for the rollback's switchover.
    /// The secondary, on its stale view (connected, the peer secondary and in sync), asked to
    /// roll back and the witness recorded it: the rolled-back generation and the primary's
    /// both descended from the one they shared, a split brain at every connect (no end after
    /// 2000000 events). Now the witness refuses the record while the peer's generation descends
    /// from the node's.
    @Test(arguments: SimRegressions.rollbackOnOlderData)
    func aRollbackIsNotRecordedOnDataOlderThanThePeers(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, witness: true, barriers: true)))
    }

    /// The checker's error: a node rolling back stands alone until it is done (it neither dials
    /// nor accepts), and a slow rollback that began as the faults stopped was taken for a split
    /// brain by the operator's nudge.
    @Test(arguments: SimRegressions.checkerRollingBackStandsAlone)
    func aNodeRollingBackMayStandAlone(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(witness: true, barriers: true)))
    }

    /// The survivor of a failover started a generation at its promotion and lost power before
    /// its first write; the old primary, promoted alone later, started one too: equal bitmap
    /// UUIDs, a split brain though only one node wrote (now a generation starts at the first
    /// write without the peer, as in DRBD 9).
    @Test(arguments: SimRegressions.generationAtPromotion)
    func aPromotionWithoutAWriteStartsNoGeneration(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true)))
    }

    /// A node that crashed as primary restarted secondary and kept `wasPrimary` after the resync
    /// of its hot extents; the peer became primary, this node lost power as secondary (with the
    /// peer's acknowledged writes in its cache) and came back a crashed primary again. The peer,
    /// killed as primary, was one too, of the same generation: the lower id won the tie and
    /// copied its older blocks over the peer's acknowledged writes (now a secondary drops
    /// `wasPrimary` at start, and of two crashed primaries the one with marks is the source).
    /// A primary stopped cleanly with a write queued behind an overlapping one still on its
    /// disk; the peer had applied and acknowledged it. The clean stop left the range out of the
    /// bitmap (the restart marks no activity-log extents): no resync covered it and the copies
    /// differed (now the core marks every write not done on the local disk before the persist).
    @Test(arguments: SimRegressions.unfinishedWritesAtCleanStop)
    func aCleanStopMarksWritesNotOnTheLocalDisk(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true)))
    }

    /// A write done on the primary's disk before it detached, never confirmed by the peer (the
    /// link dropped), was answered with success: only the detached disk held it, and it counted
    /// as written without the peer; the peer, promoted later by the witness, wrote too.
    @Test(arguments: SimRegressions.answeredFromADetachedDisk)
    func aWriteOnlyOnADetachedDiskFails(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true, witness: true)))
    }

    /// A simulator (operator) error: the switchover promoted the secondary on its own stale view
    /// (connected, peer secondary) during a partition it had not noticed; the old primary had
    /// been promoted, answered a write alone at its ping timeout and demoted. The new primary was
    /// older than its peer, no resync may overwrite a primary, and the two never connected again
    /// (now the operator waits until both nodes are connected on the same link).
    @Test(arguments: SimRegressions.switchoverOnAStaleView)
    func aSwitchoverPromotesOnlyWithBothNodesConnected(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, primaryDiskErrors: true, doubleFaults: true, switchover: true)))
    }

    /// A simulator (operator) gap: the survivor was promoted while the old primary, killed
    /// later, held writes it lacked; the old primary came back newer. A primary is never a resync
    /// target, so every connect ended in a role conflict and the pair never converged (as DRBD's
    /// `rr-conflict disconnect`, which is right). Now the core names the conflict and the
    /// operator demotes the older primary, lets it resync and promotes it again.
    @Test(arguments: SimRegressions.primaryOlderThanItsPeer)
    func aPrimaryOlderThanItsPeerIsDemotedByTheOperator(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true)))
    }

    /// A checker error: a survivor promoted and killed 8 ms later had submitted a write alone
    /// (starting its own generation) and answered none; the other node, promoted next, wrote.
    /// The core found a split brain, which the checker, counting only answered writes, called
    /// false. Data the peer lacks was on the disk either way (`SimNode.submittedAlone`).
    @Test(arguments: SimRegressions.checkerUnansweredWriteAlone)
    func aWriteSubmittedAloneAndNeverAnsweredStillDiverges(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true)))
    }

    /// A checker error: a secondary lost power with an acknowledged write no flush had covered;
    /// 5 ms later, before the primary noticed, the primary's disk failed a write and detached
    /// (its peer still looked a full copy), and the client's next flush failed. The pair went on
    /// with the secondary's copy, which had lost the write: allowed by NBD's rules (an unflushed
    /// write may be lost, and the flush said so), but the model only relaxed for a power loss of
    /// the only consistent copy.
    @Test(arguments: SimRegressions.checkerUnflushedLostWithThePeer)
    func anUnflushedWriteTheSecondaryLostMayGoWithThePrimarysDetach(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true, switchover: true, witness: true, barriers: true)))
    }

    /// A checker error: a rollback's switchover drained the primary while a partition cut off
    /// its secondary (which had lost power and come back UpToDate but stale): the link timed
    /// out, the primary answered its last writes alone, the demotion's flush failed on its
    /// failing disk, and it demoted. It then lost power, one of those writes (no flush had
    /// covered it) with its cache; the rollback never began, and the operator promoted it again.
    /// Allowed by NBD's rules, but the model, counting the UpToDate peer as a copy, only relaxed
    /// for a power loss of the only consistent copy (now a node that wrote alone holds one).
    @Test(arguments: SimRegressions.checkerDemotedAloneLostUnflushed)
    func anUnflushedWriteADemotedPrimaryAnsweredAloneMayGoWithItsPowerLoss(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, primaryDiskErrors: true, doubleFaults: true, barriers: true)))
    }

    /// A simulator (operator) gap: after a switchover the witness deposed the new primary on a
    /// record the old primary's demotion had not reached yet (it was cut off); both nodes stood
    /// secondary, connected and in sync, and nobody promoted again. Now the operator does.
    @Test(arguments: SimRegressions.nobodyPromotedAfterADeposition)
    func theOperatorPromotesAgainWhenNoNodeIsPrimary(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(primaryDiskErrors: true, switchover: true, witness: true, barriers: true)))
    }

    @Test(arguments: SimRegressions.staleWasPrimaryWonTheTie)
    func aSecondaryIsNoCrashedPrimaryAfterItsResync(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, doubleFaults: true, witness: true)))
    }

    /// A survivor promoted alone sent its hello (the peer's generation, no write yet), then
    /// answered its first write in a generation it started after it: the old primary, newer
    /// than that hello, decided on it to be the source over the write; the survivor, on its new
    /// UUIDs, found the split brain (now a write that would start a generation while the hello
    /// is out holds its answer until this side has decided on the same two hellos).
    @Test(arguments: SimRegressions.generationAfterTheHello)
    func noGenerationStartsWhileTheHelloIsOut(seed: UInt64) {
        Self.check(Simulator.run(seed: seed, options: SimOptions(failover: true, overlappingClientWrites: true, primaryDiskErrors: true, doubleFaults: true)))
    }
}

/// Seeds that found each bug: the first seed the simulator fails with the fix reverted (see
/// DEVELOPERS.md, "Simulator"). Each passes with the fix.
enum SimRegressions {
    static let detachWithoutUpToDatePeer: [UInt64] = [45, 46]
    static let noSyncIgnoredBitmap: [UInt64] = [3]
    static let sentResyncSlotsLeaked: [UInt64] = [13]
    static let resyncWriteNotDurable: [UInt64] = [30]
    static let resyncAckBeforeTargetFlush: [(UInt64, String)] = [(620, "default"), (2, "witness"), (2, "failover")]
    static let markClearedByLateResyncAck: [UInt64] = [912]
    static let checkerFailoverOntoCachedCopy: [UInt64] = [122]
    static let checkerPeerAckedBeforeLinkDied: [UInt64] = [1857, 5922]
    static let targetOfPeerMarksPromoted: [UInt64] = [14514]
    static let alEvictionWithoutDataSync: [UInt64] = [993]
    static let resyncIDsRepeated: [UInt64] = [2996]
    static let failoverDecisions: [UInt64] = [28, 524]
    static let overlappingWritesReordered: [UInt64] = [1, 60]
    static let extentsReleasedBeforePeerFlush: [UInt64] = [133, 270, 917]
    static let failedSecondaryPromoted: [UInt64] = [968, 1450, 2370, 2653]
    static let detachedDiskRestarted: [UInt64] = [30, 105, 109]
    static let detachedAnswerWithoutPeer: [UInt64] = [105, 215, 884]
    static let generationDuringHandshake: [UInt64] = [2722]
    static let demotedWithBlocksOutOfSync: [UInt64] = [778, 1124, 2181]
    static let resyncSourceNotDurable: [UInt64] = [1009]
    static let resyncSourceReadUnflushed: [UInt64] = [92120945]
    static let detachedBeforeBecomingSource: [UInt64] = [103109819]
    static let evictedBeforeTheDetachWasMarked: [UInt64] = [101118196]
    static let detachedBeforeTheTargetKnewItWasDone: [UInt64] = [320004187, 320013541]
    static let onlyCopyDetachedAsSecondary: [UInt64] = [102100484]
    static let sourceDetachedAfterTheLinkDropped: [UInt64] = [195654, 199606]
    static let stalePromotionDuringSwitchover: [UInt64] = [101103302, 101107362, 101116884]
    static let restartedSecondaryTookOver: [UInt64] = [6, 51, 87]
    static let restartedWitnessTwoPrimaries: [UInt64] = [347, 600]
    static let demotedAheadOfPeer: [UInt64] = [61]
    static let upToDateBeforeMarksCopied: [UInt64] = [2261]
    static let olderPrimaryFenced: [UInt64] = [632, 1451, 2461, 2778]
    static let wasPrimaryKeptByTheCore: [UInt64] = [241, 530, 1593]
    static let doneOnADetachedDisk: [UInt64] = [1100]
    static let unsyncedAtAttach: [UInt64] = [996]
    static let barrierOnUnsyncedWrites: [UInt64] = [65, 188, 216]
    static let rollbackMarksLost: [UInt64] = [6, 10, 21]
    static let stopWhoseFinalSyncFailed: [UInt64] = [54214, 61492]
    static let barrierAfterFailedWrite: [UInt64] = [1, 31, 35, 252, 1643]
    static let writesIntoPendingBarrier: [UInt64] = [135, 169]
    static let generationAtPromotion: [UInt64] = [883]
    static let failedWriteBeforeResyncDone: [UInt64] = [1302]
    static let checkerFailoverOntoUnflushedPeer: [UInt64] = [1785]
    static let staleWasPrimaryWonTheTie: [UInt64] = [1393, 3952]
    static let rollbackNotRecorded: [UInt64] = [37, 232]
    static let rollbackRecordNotEnforced: [UInt64] = [6, 19]
    static let rollbackOnOlderData: [UInt64] = [310036700]
    static let unfinishedWritesAtCleanStop: [UInt64] = [21570, 27782]
    static let answeredFromADetachedDisk: [UInt64] = [20824]
    static let switchoverOnAStaleView: [UInt64] = [27437]
    static let checkerRollingBackStandsAlone: [UInt64] = [41428]
    static let recoveredRecordsUnsynced: [UInt64] = [40506]
    static let primaryOlderThanItsPeer: [UInt64] = [62106]
    static let checkerUnansweredWriteAlone: [UInt64] = [108010]
    static let checkerUnflushedLostWithThePeer: [UInt64] = [303937]
    static let checkerDemotedAloneLostUnflushed: [UInt64] = [117100438]
    static let nobodyPromotedAfterADeposition: [UInt64] = [304314]
    static let failedDemotionFlushKeptTheDisk: [UInt64] = [103288]
    static let demotedWithHeldAnswers: [UInt64] = [315969]
    static let generationAfterTheHello: [UInt64] = [91108538]
}
