import Testing
@testable import TandemCore

/// Role changes, outdating and split-brain resolution in the core, on the two-node step harness.
@Suite struct ReplicaRoleTests {
    private static func hello(of core: ReplicaCore, discard: Bool = false) -> PeerHello {
        var h = Pair.hello(of: core, flags: discard ? PeerFlags.Hello.discardMyData : 0)
        h.outOfSyncBits = UInt64(core.bitmap.setBitCount)
        h.primarySinceMillis = core.primarySinceMillis
        return h
    }

    @Test func aSwitchoverWhileConnectedKeepsTheGenerationAndReplicatesBack() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        #expect(pair.secondary.promote(force: false, freshUUID: 0xA000, nowMillis: 1, into: &actions) == .peerIsPrimary)
        #expect(pair.secondary.role == .secondary)
        pair.write(1, at: 0)
        #expect(pair.primary.demote(into: &actions) == .requestsInFlight(1), "the node drains clients first")
        pair.completePrimary(.client(1))
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1))
        pair.deliverToPrimary()
        actions.removeAll()
        #expect(pair.primary.demote(into: &actions) == nil)
        pair.applyPrimary(actions)
        pair.deliverToSecondary()
        #expect(pair.secondary.peerRole == .secondary)
        actions.removeAll()
        let before = pair.secondary.uuids
        #expect(pair.secondary.promote(force: false, freshUUID: 0xA000, nowMillis: 2, into: &actions) == nil)
        #expect(pair.secondary.uuids == before, "connected to an UpToDate peer: no new generation")
        // The new primary writes; the old one applies and acks.
        actions.removeAll()
        pair.secondary.clientWrite(id: 7, offset: 8192, length: 4096, kind: .write, fua: false, into: &actions)
        guard case .sendWrite(let w, let kind, _)? = actions.first(where: { if case .sendWrite = $0 { true } else { false } }) else {
            Issue.record("the new primary did not replicate: \(actions)")
            return
        }
        var back: [ReplicaCore.Action] = []
        pair.primary.peerWrite(w, kind: kind, into: &back)
        #expect(back.contains { if case .submitLocal(let io) = $0 { io.tag == .peerWrite(7) } else { false } })
    }

    /// Found by the simulator (`--switchover`, seed 2181): a primary demoted with blocks its
    /// transfer log had marked out of sync; the promoted peer never got them and the secondary's
    /// bits were never resynced.
    @Test func aDemotionWithBlocksOutOfSyncResyncsThemFirst() {
        var pair = Pair()
        pair.primary.markOutOfSync(offset: 0, length: 4096)
        var actions: [ReplicaCore.Action] = []
        #expect(pair.primary.demote(into: &actions) == .outOfSync(4096))
        #expect(pair.primary.role == .primary && pair.primary.link == .handshaking, "the resync of those blocks started")
    }

    /// Found by the simulator (`--failover --primary-disk-errors --double-faults --switchover`,
    /// seed 14514): a primary lost its link with writes its peer had not flushed (its transfer
    /// log marked them) and demoted. At the next connect (same generation: noSync, the demoted
    /// node the source of its marks) the peer was connected and UpToDate at once, before the
    /// demoted node's bitmap arrived, and a switchover promoted it without those blocks.
    @Test func aSecondaryThePeersMarksMakeTheTargetIsNotPromotedBeforeTheirResync() {
        var pair = Pair()
        pair.dropLink()
        pair.primary.markOutOfSync(offset: 0, length: 4096)
        var actions: [ReplicaCore.Action] = []
        #expect(pair.primary.demote(into: &actions) == nil)
        let helloDemoted = Self.hello(of: pair.primary), helloPeer = Self.hello(of: pair.secondary)
        // The peer, without marks, hears first.
        actions.removeAll()
        pair.secondary.linkUp(peer: helloDemoted, freshUUID: 0x8000, into: &actions)
        pair.applySecondary(actions)
        #expect(pair.secondary.lastDecision?.decision == .noSync)
        #expect(pair.secondary.link == .handshaking, "the target of the peer's marks from the connect on")
        actions.removeAll()
        #expect(pair.secondary.promote(force: false, freshUUID: 0x9000, nowMillis: 1, into: &actions) == .resyncTarget)
        #expect(pair.secondary.role == .secondary)
        actions.removeAll()
        pair.primary.linkUp(peer: helloPeer, freshUUID: 0x7000, into: &actions)
        pair.applyPrimary(actions)
        for _ in 0..<4 {
            pair.deliverToSecondary()
            pair.deliverToPrimary()
        }
        #expect(pair.dropped.isEmpty, "no protocol error: each side sent its bitmap once")
        #expect(pair.primary.sync == .syncSource)
        #expect(pair.secondary.sync == .syncTarget && pair.secondary.disk == .inconsistent)
        #expect(pair.secondary.bitmap.isDirty(offset: 0, length: 4096))
    }

    /// A write the peer acknowledged and a flush of the core's own made durable there (the
    /// transfer log settled it: no mark), only in the primary's volatile cache; the link drops,
    /// and the demotion's flush fails on the primary's disk, which stays (no peer to detach
    /// for). The clean demotion drops the activity log a crash would have resynced, so a power
    /// loss could take the write from this disk alone, and the next connect found the two copies
    /// in sync, yet different there. Now the node marks the log's extents at such a demotion,
    /// and the connect copies them from this disk, so the copies end equal.
    @Test func aDemotionWhoseFlushFailedMarksTheLogsExtents() {
        let extent = 64 << 10
        var log = ActivityLog(deviceBytes: Pair.size, extentBytes: extent, capacity: 2, ringSlots: ActivityLog.ringSlotsMin(capacity: 2),
                              nextSequence: 1, writeBytesMax: 4096)
        guard case .needTransaction(let tx) = log.beginWrite(offset: 0, length: 4096) else { Issue.record("a cold extent"); return }
        #expect(log.transactionPersisted(tx) == nil)
        var pair = Pair()
        pair.writeDoneOnBoth(1, at: 0)
        var actions: [ReplicaCore.Action] = []
        pair.primary.flushPeerToSettleWrites(into: &actions)
        pair.applyPrimary(actions)
        pair.deliverToSecondary()
        guard let peerFlush = pair.secondaryDisk.first(where: { if case .peerFlush = $0.tag { true } else { false } }) else {
            Issue.record("no peer flush: \(pair.secondaryDisk)")
            return
        }
        pair.completeSecondary(peerFlush.tag)
        pair.deliverToPrimary()
        #expect(pair.settled == [0], "durable on the peer: settled, never marked")
        log.endWrite(offset: 0, length: 4096)
        pair.dropLink()
        // The demotion: the node's flush of both sides (the peer is gone), then the core.
        pair.flush(2)
        pair.completePrimary(.clientFlush(2), -5)
        #expect(pair.flushed[2] == -5 && pair.primary.disk == .upToDate, "no full copy to detach for: the disk stays")
        actions.removeAll()
        #expect(pair.primary.demote(into: &actions) == nil)
        #expect(!pair.primary.bitmap.isDirty(offset: 0, length: 4096), "nothing in the core names write 1")
        pair.primary.markLogExtentsAfterFailedDemotionFlush(log)
        #expect(pair.primary.bitmap.isDirty(offset: 0, length: 4096))
        pair.applyPrimary(actions)
        // The same generation on both sides: the demoted node is the source of its marks.
        pair.reconnect()
        #expect(pair.dropped.allSatisfy { $0 == .peerClosed })
        #expect(pair.primary.lastDecision?.decision == .noSync)
        #expect(pair.primary.sync == .syncSource)
        #expect(pair.secondary.sync == .syncTarget && pair.secondary.disk == .inconsistent)
        #expect(pair.secondary.bitmap.isDirty(offset: 0, length: 4096))
    }

    @Test func aSurvivorPromotedAloneStartsANewGenerationAtItsFirstWriteAndTheReturningPeerResyncsFromIt() {
        var pair = Pair()
        // The primary crashes (it never sees the link go); the survivor (UpToDate) is promoted
        // and writes alone.
        var old = pair.primary
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        let before = pair.secondary.uuids
        #expect(pair.secondary.promote(force: false, freshUUID: 0xB000, nowMillis: 5, into: &actions) == nil)
        #expect(pair.secondary.uuids == before, "no write yet: still the peer's generation")
        actions.removeAll()
        pair.secondary.clientWrite(id: 1, offset: 1 << 20, length: 4096, kind: .write, fua: false, into: &actions)
        #expect(pair.secondary.uuids.current == 0xB000 && pair.secondary.uuids.bitmap == 0x1000)
        let rotatedFirst = actions.firstIndex { if case .stateChanged = $0 { true } else { false } }
        let submitted = actions.firstIndex { if case .submitLocal = $0 { true } else { false } }
        #expect(rotatedFirst != nil && submitted != nil && rotatedFirst! < submitted!,
                "the node persists the new generation (on the state change) before the write reaches the disk")
        pair.secondary.localCompleted(.client(1), result: 0, into: &actions)
        #expect(pair.secondary.bitmap.isDirty(offset: 1 << 20, length: 4096))
        // The old primary returns as secondary (after its crash) and becomes the target.
        old = ReplicaCore(configuration: old.configuration, role: .secondary, disk: .upToDate, uuids: old.uuids, bitmap: old.bitmap,
                          flags: [.consistent, .crashedPrimary])
        actions.removeAll()
        pair.secondary.linkUp(peer: Self.hello(of: old), freshUUID: 1, into: &actions)
        #expect(pair.secondary.lastDecision?.decision == .becomeSource)
        old.linkUp(peer: Self.hello(of: pair.secondary), freshUUID: 2, into: &actions)
        #expect(old.lastDecision?.decision == .becomeTarget)
    }

    @Test func promotionNeedsAnUpToDateDiskUnlessForced() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        // A primary that disconnects on purpose outdates its secondary.
        pair.primary.disconnect(freshUUID: 0xC000, into: &actions)
        #expect(actions.contains(.send(.disconnect(reason: .shutdown, text: "primary disconnecting: outdate your data"))))
        #expect(actions.contains(.dropLink(.administrative)))
        #expect(pair.primary.link == .standalone)
        actions.removeAll()
        pair.secondary.peerMessage(.disconnect(reason: .shutdown, text: "x"), into: &actions)
        #expect(pair.secondary.disk == .outdated && pair.secondary.localFlags.contains(.outdated))
        pair.secondary.linkDown(.peerClosed, freshUUID: 0xC001, into: &actions)
        #expect(pair.secondary.promote(force: false, freshUUID: 0xC002, nowMillis: 1, into: &actions) == .diskNotUpToDate(.outdated))
        #expect(pair.secondary.role == .secondary)
        #expect(pair.secondary.promote(force: true, freshUUID: 0xC002, nowMillis: 1, into: &actions) == nil)
        #expect(pair.secondary.role == .primary && pair.secondary.disk == .upToDate && !pair.secondary.localFlags.contains(.outdated))
        #expect(pair.secondary.uuids.current == 0xC002 && pair.secondary.uuids.bitmap == 0x1000,
                "forced: this data is declared the newest, a new generation at once (as DRBD)")
    }

    /// `tandem rollback` on the secondary after the primary demoted: the peer is told why the
    /// link goes down and marks itself Outdated (so the witness never lets it take over, nor an
    /// operator without --force), then resyncs from the rolled-back node.
    @Test func aRollbackOutdatesThePeerWhichResyncsFromTheRolledBackNode() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        #expect(pair.primary.demote(into: &actions) == nil)
        pair.applyPrimary(actions)
        pair.deliverToSecondary()
        #expect(pair.secondary.peerRole == .secondary)
        actions.removeAll()
        pair.secondary.disconnect(freshUUID: 0xC000, forRollback: true, into: &actions)
        #expect(actions.contains(.send(.disconnect(reason: .rollback, text: "rolling back to a barrier: outdate your data and resync from me"))))
        #expect(actions.contains(.dropLink(.administrative)))
        #expect(pair.secondary.link == .standalone)
        actions.removeAll()
        // The demoted node (`primary` in the harness) receives it, then the close.
        pair.primary.peerMessage(.disconnect(reason: .rollback, text: "x"), into: &actions)
        #expect(pair.primary.disk == .outdated && pair.primary.localFlags.contains(.outdated), "persisted with the state change")
        #expect(pair.primary.peerLeftForRollback)
        pair.primary.linkDown(.peerClosed, freshUUID: 0xC001, into: &actions)
        #expect(pair.primary.link == .connecting, "it reconnects when the rollback ends")
        #expect(pair.primary.promote(force: false, freshUUID: 0xC002, nowMillis: 1, into: &actions) == .diskNotUpToDate(.outdated))
        #expect(pair.primary.role == .secondary)
        // The rollback ends: restored chunks out of sync, a new generation, connect.
        pair.secondary.markOutOfSync(offset: 1 << 20, length: 4096)
        pair.secondary.startGenerationAfterRollback(freshUUID: 0xC003, into: &actions)
        pair.secondary.connect(discardMyData: false, into: &actions)
        let before = pair.secondary.uuids
        pair.reconnect()
        #expect(pair.secondary.lastDecision?.decision == .becomeSource && pair.primary.lastDecision?.decision == .becomeTarget)
        #expect(!pair.primary.peerLeftForRollback)
        #expect(pair.secondary.uuids == before)
    }

    /// A primary never takes a rollback notice for itself (the rollback is refused while the
    /// peer is primary; a late message finds it promoted): it keeps its disk.
    @Test func aPrimaryIgnoresARollbackNotice() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        pair.primary.peerMessage(.disconnect(reason: .rollback, text: "x"), into: &actions)
        #expect(pair.primary.disk == .upToDate && !pair.primary.localFlags.contains(.outdated))
    }

    /// Before it rolls back with a witness, the secondary asks its peer over the link (or the
    /// witness) to record it: the peer outdates itself, persisted, and only then replies
    /// (Protocol/barriers.md "Rollback and the witness"). Then the `disconnect(rollback)`.
    @Test func aRollbackNoticeIsAcknowledgedOnlyOnceThePeerIsOutdated() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        let underPrimary = pair.secondary.noticeRollback(into: &actions)
        #expect(!underPrimary && actions.isEmpty, "never under a primary")
        #expect(pair.primary.demote(into: &actions) == nil)
        pair.applyPrimary(actions)
        pair.deliverToSecondary()
        actions.removeAll()
        let sent = pair.secondary.noticeRollback(into: &actions)
        #expect(sent)
        guard case .send(.stateChange(let request))? = actions.first, request.id != 0,
              request.flags == PeerFlags.State.rollingBack, request.role == .secondary
        else {
            Issue.record("no rollback notice request: \(actions)")
            return
        }
        actions.removeAll()
        pair.primary.peerMessage(.stateChange(request), into: &actions)
        #expect(pair.primary.disk == .outdated && pair.primary.localFlags.contains(.outdated) && pair.primary.peerLeftForRollback)
        // The state change (which the node persists) comes before the reply.
        let persisted = actions.firstIndex { if case .stateChanged = $0 { true } else { false } }
        let replied = actions.firstIndex { if case .send(.stateChange) = $0 { true } else { false } }
        guard let persisted, let replied, persisted < replied, case .send(.stateChange(let reply)) = actions[replied] else {
            Issue.record("the reply must follow the outdated state: \(actions)")
            return
        }
        #expect(reply.id == request.id && reply.flags == PeerFlags.State.reply | PeerFlags.State.rollingBack && reply.diskState == .outdated)
        actions.removeAll()
        pair.secondary.peerMessage(.stateChange(reply), into: &actions)
        #expect(actions.contains(.rollbackNoticeAnswered(accepted: true)))
        #expect(pair.secondary.peerDisk == .outdated)
        // A second reply with that id is no answer any more.
        actions.removeAll()
        pair.secondary.peerMessage(.stateChange(reply), into: &actions)
        #expect(!actions.contains(.rollbackNoticeAnswered(accepted: true)))
    }

    /// A primary refuses the notice (the peer must not roll back under it) and keeps its disk;
    /// a link lost before the answer is no acknowledgement.
    @Test func aRollbackNoticeIsRefusedByAPrimaryAndLostWithTheLink() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        let request = PeerStateChange(id: 5, role: .secondary, diskState: .upToDate, flags: PeerFlags.State.rollingBack,
                                      uuids: ReplicaCore.wire(pair.secondary.uuids))
        pair.primary.peerMessage(.stateChange(request), into: &actions)
        #expect(pair.primary.disk == .upToDate && !pair.primary.peerLeftForRollback)
        #expect(actions.contains { if case .send(.stateChange(let r)) = $0 { r.id == 5 && r.flags & PeerFlags.State.refused != 0 } else { false } })

        #expect(pair.primary.demote(into: &actions) == nil)
        pair.applyPrimary(actions)
        pair.deliverToSecondary()
        actions.removeAll()
        let asked = pair.secondary.noticeRollback(into: &actions)
        #expect(asked)
        actions.removeAll()
        pair.secondary.linkDown(.timeout, freshUUID: 0xD000, into: &actions)
        #expect(actions.contains(.rollbackNoticeAnswered(accepted: false)))
    }

    /// Found by the simulator (`--failover --overlapping-writes --double-faults
    /// --primary-disk-errors`, seed 91108538): a survivor promoted alone sent its hello with the
    /// peer's generation and then wrote, starting a generation the hello never carried; the old
    /// primary, newer than that hello, made itself the source over the write while the survivor
    /// found the split brain. A write that would start a generation while the hello is out now
    /// waits for this side's decision, made on the same two hellos as the peer's.
    @Test func aWriteWhileTheHelloIsOutWaitsForTheDecision() {
        var pair = Pair()
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        // The old primary wrote alone before it crashed: a generation the survivor lacks.
        var old = pair.primary
        old.clientWrite(id: 9, offset: 0, length: 4096, kind: .write, fua: false, into: &actions)
        old.localCompleted(.client(9), result: 0, into: &actions)
        #expect(old.uuids.current == 0x2000 && old.uuids.bitmap == 0x1000)
        old = ReplicaCore(configuration: old.configuration, role: .secondary, disk: .upToDate, uuids: old.uuids, bitmap: old.bitmap,
                          flags: [.consistent, .crashedPrimary])
        var survivor = pair.secondary
        let before = survivor.uuids
        #expect(survivor.promote(force: false, freshUUID: 0xB000, nowMillis: 5, into: &actions) == nil)
        let survivorHello = Self.hello(of: survivor), oldHello = Self.hello(of: old)
        survivor.helloSent()
        old.helloSent()
        actions.removeAll()
        survivor.clientWrite(id: 1, offset: 1 << 20, length: 4096, kind: .write, fua: false, into: &actions)
        survivor.localCompleted(.client(1), result: 0, into: &actions)
        #expect(survivor.uuids == before, "no generation the peer's decision cannot see")
        #expect(!actions.contains(.completeClient(id: 1, result: 0)), "answered only after this side decided")
        // The peer decides on the hello as sent: nothing was answered past it yet.
        old.linkUp(peer: survivorHello, freshUUID: 2, into: &actions)
        #expect(old.lastDecision?.decision == .becomeSource)
        // This side, on the same two hellos: a role conflict; the write goes on alone, in a
        // generation of its own persisted (the state change) before the answer.
        actions.removeAll()
        survivor.linkUp(peer: oldHello, freshUUID: 3, into: &actions)
        #expect(survivor.roleConflict == .peerHoldsNewerData && survivor.uuids.current == 0xB000 && survivor.uuids.bitmap == before.current)
        let rotated = actions.lastIndex { if case .stateChanged = $0 { true } else { false } }
        let answered = actions.firstIndex(of: .completeClient(id: 1, result: 0))
        #expect(rotated != nil && answered != nil && rotated! < answered!)
        // Both wrote apart: the next connect is a split brain on both sides.
        old.linkDown(.peerClosed, freshUUID: 4, into: &actions)
        let survivorHelloAfter = Self.hello(of: survivor), oldHelloAfter = Self.hello(of: old)
        survivor.linkUp(peer: oldHelloAfter, freshUUID: 5, into: &actions)
        old.linkUp(peer: survivorHelloAfter, freshUUID: 6, into: &actions)
        #expect(survivor.splitBrain && old.splitBrain)
    }

    /// A forced promotion starts its generation at once, so it waits while this node's hello is
    /// out: the peer decides on the state that hello carried.
    @Test func aForcedPromotionWaitsWhileTheHelloIsOut() {
        var pair = Pair()
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        var outdated = ReplicaCore(configuration: pair.secondary.configuration, role: .secondary, disk: .outdated,
                                   uuids: pair.secondary.uuids, bitmap: pair.secondary.bitmap, flags: [.consistent, .outdated])
        let before = outdated.uuids
        outdated.helloSent()
        #expect(outdated.promote(force: true, freshUUID: 0xC000, nowMillis: 5, into: &actions) == .helloOut)
        #expect(outdated.role == .secondary && outdated.disk == .outdated && outdated.uuids == before)
        // The peer never answered: once the link is down the promotion goes through.
        outdated.linkDown(.peerClosed, freshUUID: 7, into: &actions)
        #expect(outdated.promote(force: true, freshUUID: 0xC000, nowMillis: 6, into: &actions) == nil)
        #expect(outdated.role == .primary && outdated.disk == .upToDate && outdated.uuids.current == 0xC000)
    }

    /// With a witness, the fence starts the generation: not while this node's hello is out (the
    /// peer decides on the UUIDs it carried); the node asks the witness again later.
    @Test func theFenceStartsNoGenerationWhileTheHelloIsOut() {
        let pair = Pair()
        var configuration = pair.secondary.configuration
        configuration.fencing = true
        var survivor = ReplicaCore(configuration: configuration, role: .secondary, disk: .upToDate,
                                   uuids: pair.secondary.uuids, bitmap: pair.secondary.bitmap)
        var actions: [ReplicaCore.Action] = []
        #expect(survivor.promote(force: false, freshUUID: 0xD000, nowMillis: 5, into: &actions) == nil)
        let before = survivor.uuids
        survivor.helloSent()
        let whileOut = survivor.startGenerationWithoutPeer(into: &actions)
        #expect(!whileOut && survivor.uuids == before)
        survivor.linkDown(.peerClosed, freshUUID: 8, into: &actions)
        let afterward = survivor.startGenerationWithoutPeer(into: &actions)
        #expect(afterward && survivor.uuids.current == 0xD000 && survivor.uuids.bitmap == before.current)
    }

    /// A failover, then the survivor crashes too, and the old primary is promoted alone and
    /// writes; the survivor returns. Returns both sides' decisions on the reconnect.
    private static func failoverTwice(survivorWrites: Bool) -> (ReplicaCore, ReplicaCore) {
        var pair = Pair()
        var n0 = pair.primary
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        // n0 (primary) loses power; n1 is promoted alone, then loses power too.
        var n1 = pair.secondary
        #expect(n1.promote(force: false, freshUUID: 0xB000, nowMillis: 5, into: &actions) == nil)
        if survivorWrites {
            n1.clientWrite(id: 1, offset: 1 << 20, length: 4096, kind: .write, fua: false, into: &actions)
            n1.localCompleted(.client(1), result: 0, into: &actions)
            #expect(n1.uuids.current == 0xB000 && n1.uuids.bitmap == 0x1000)
        } else {
            #expect(n1.uuids == pair.secondary.uuids, "promoted, never wrote: no new generation")
        }
        n1 = ReplicaCore(configuration: n1.configuration, role: .secondary, disk: .upToDate, uuids: n1.uuids, bitmap: n1.bitmap,
                         flags: [.consistent, .crashedPrimary])
        // n0 comes back (secondary, after its crash), is promoted alone and writes.
        n0 = ReplicaCore(configuration: n0.configuration, role: .secondary, disk: .upToDate, uuids: n0.uuids, bitmap: n0.bitmap,
                         flags: [.consistent, .crashedPrimary])
        n0.spareUUID = 0xE000  // as the node keeps one
        #expect(n0.promote(force: false, freshUUID: 0xE001, nowMillis: 9, into: &actions) == nil)
        n0.clientWrite(id: 2, offset: 2 << 20, length: 4096, kind: .write, fua: false, into: &actions)
        n0.localCompleted(.client(2), result: 0, into: &actions)
        #expect(n0.uuids.current == 0xE000 && n0.uuids.bitmap == 0x1000)
        let hello0 = Self.hello(of: n0), hello1 = Self.hello(of: n1)
        n0.linkUp(peer: hello1, freshUUID: 0xF000, into: &actions)
        n1.linkUp(peer: hello0, freshUUID: 0xF001, into: &actions)
        return (n0, n1)
    }

    /// Found by the simulator (`--failover --double-faults --overlapping-writes`, seed 883): the
    /// survivor of a failover started a generation at its promotion and lost power before it
    /// wrote; the old primary, promoted alone later, started one too at its own, and the two
    /// generations looked like writes on both sides (equal bitmap UUIDs): a split brain though
    /// only one node wrote.
    @Test func aNodePromotedAloneThatNeverWroteCausesNoSplitBrain() {
        let (n0, n1) = Self.failoverTwice(survivorWrites: false)
        #expect(!n0.splitBrain && !n1.splitBrain)
        #expect(n0.lastDecision?.decision == .becomeSource && n1.lastDecision?.decision == .becomeTarget)
        #expect(n1.lastDecision?.rule == .peerBitmapIsLocalCurrent, "n0 wrote since n1's generation")
    }

    /// Seeds 1393 and 3952 (`--witness --failover --double-faults --overlapping-writes`) reached
    /// two crashed primaries of one generation with a node's stale `wasPrimary`; a real pair of
    /// them (one took over and crashed before its first write alone) is decided by the marks: the
    /// node whose bitmap holds marks is the source even when its id is the higher one, as its hot
    /// extents may hold acknowledged writes the other lacks.
    @Test func ofTwoCrashedPrimariesTheOneWithMarksIsTheSource() {
        var pair = Pair()
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        var marked = pair.secondary.bitmap
        marked.setRange(offset: 1 << 20, length: 4096)
        var n0 = ReplicaCore(configuration: pair.primary.configuration, role: .secondary, disk: .upToDate, uuids: pair.primary.uuids,
                             bitmap: DirtyBitmap(deviceBytes: pair.primary.bitmap.deviceBytes, granularityBytes: pair.primary.bitmap.granularityBytes),
                             flags: [.consistent, .crashedPrimary])
        var n1 = ReplicaCore(configuration: pair.secondary.configuration, role: .secondary, disk: .upToDate, uuids: pair.secondary.uuids,
                             bitmap: marked, flags: [.consistent, .crashedPrimary])
        #expect(n0.configuration.nodeID < n1.configuration.nodeID && n0.uuids == n1.uuids)
        var hello0 = Pair.hello(of: n0, flags: PeerFlags.Hello.crashedPrimary), hello1 = Pair.hello(of: n1, flags: PeerFlags.Hello.crashedPrimary)
        hello0.outOfSyncBits = UInt64(n0.bitmap.setBitCount)
        hello1.outOfSyncBits = UInt64(n1.bitmap.setBitCount)
        n0.linkUp(peer: hello1, freshUUID: 0xF000, into: &actions)
        n1.linkUp(peer: hello0, freshUUID: 0xF001, into: &actions)
        #expect(n1.lastDecision?.decision == .becomeSource && n0.lastDecision?.decision == .becomeTarget)
        #expect(n0.lastDecision?.rule == .equalCurrents)
    }

    @Test func twoNodesThatBothWroteApartAreStillASplitBrain() {
        let (n0, n1) = Self.failoverTwice(survivorWrites: true)
        #expect(n0.splitBrain && n1.splitBrain)
        #expect(n0.lastDecision?.decision == .splitBrain && n1.lastDecision?.decision == .splitBrain)
        #expect(n0.lastDecision?.rule == .equalBitmaps && n0.link == .standalone && n1.link == .standalone)
    }

    @Test func anOutdatedSecondaryIsUpToDateAgainAfterCatchingUp() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        pair.secondary.peerMessage(.disconnect(reason: .shutdown, text: ""), into: &actions)
        pair.dropLink()
        #expect(pair.secondary.disk == .outdated)
        // Nothing was written meanwhile: same generation, no sync, UpToDate again.
        pair.reconnect()
        #expect(pair.secondary.lastDecision?.decision == .noSync)
        #expect(pair.secondary.disk == .upToDate && !pair.secondary.localFlags.contains(.outdated))
    }

    /// Both sides primary while apart, each writing: the split brain of the harness.
    private static func splitPair(primaryWrites: Int, secondaryWrites: Int, policy: SplitBrainPolicy = .disconnect) -> (ReplicaCore, ReplicaCore) {
        var pair = Pair()
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        var a = pair.primary, b = pair.secondary
        _ = b.promote(force: true, freshUUID: 0xD000, nowMillis: 10, into: &actions)
        for i in 0..<primaryWrites {
            a.clientWrite(id: UInt64(i), offset: UInt64(i) << 20, length: 4096, kind: .write, fua: false, into: &actions)
            a.localCompleted(.client(UInt64(i)), result: 0, into: &actions)
        }
        for i in 0..<secondaryWrites {
            b.clientWrite(id: UInt64(i), offset: UInt64(32 + i) << 20, length: 4096, kind: .write, fua: false, into: &actions)
            b.localCompleted(.client(UInt64(i)), result: 0, into: &actions)
        }
        if policy != .disconnect {
            var ca = a.configuration, cb = b.configuration
            ca.splitBrainPolicy = policy
            cb.splitBrainPolicy = policy
            a = ReplicaCore(configuration: ca, role: a.role, disk: a.disk, uuids: a.uuids, bitmap: a.bitmap, flags: a.localFlags)
            b = ReplicaCore(configuration: cb, role: b.role, disk: b.disk, uuids: b.uuids, bitmap: b.bitmap, flags: a.localFlags)
        }
        return (a, b)
    }

    @Test func discardMyDataResolvesASplitBrainWithTheUnionOfBothBitmaps() {
        var (a, b) = Self.splitPair(primaryWrites: 3, secondaryWrites: 2)
        var actions: [ReplicaCore.Action] = []
        a.linkUp(peer: Self.hello(of: b), freshUUID: 1, into: &actions)
        #expect(a.splitBrain && a.link == .standalone && actions.contains(.dropLink(.splitBrain)))
        // The operator gives b's changes up: b demotes, both connect again.
        #expect(b.demote(into: &actions) == nil)
        b.connect(discardMyData: true, into: &actions)
        a.connect(discardMyData: false, into: &actions)
        #expect(a.link == .connecting && b.discardMyData)
        actions.removeAll()
        let helloB = Self.hello(of: b, discard: true), helloA = Self.hello(of: a)
        a.linkUp(peer: helloB, freshUUID: 2, into: &actions)
        b.linkUp(peer: helloA, freshUUID: 3, into: &actions)
        #expect(a.lastDecision?.decision == .becomeSource && b.lastDecision?.decision == .becomeTarget)
        #expect(!a.splitBrain && !b.splitBrain && !b.discardMyData)
    }

    @Test func discardMyDataOnAPrimaryIsARoleConflict() {
        var (a, b) = Self.splitPair(primaryWrites: 1, secondaryWrites: 1)
        var actions: [ReplicaCore.Action] = []
        // b still primary: it would become the target under its own clients.
        b.connect(discardMyData: true, into: &actions)
        b.linkUp(peer: Self.hello(of: a), freshUUID: 3, into: &actions)
        #expect(actions.contains(.dropLink(.roleConflict)) && b.link == .connecting)
    }

    @Test func aPrimaryOlderThanItsPeerNamesTheConflictUntilItDemotes() {
        // a wrote alone and went secondary (a restart); b was promoted meanwhile, wrote nothing.
        var (a, b) = Self.splitPair(primaryWrites: 2, secondaryWrites: 0)
        var actions: [ReplicaCore.Action] = []
        #expect(a.demote(into: &actions) == nil)
        b.linkUp(peer: Self.hello(of: a), freshUUID: 3, into: &actions)
        #expect(actions.contains(.dropLink(.roleConflict)) && b.link == .connecting)
        #expect(b.roleConflict == .peerHoldsNewerData && b.status.roleConflict == .peerHoldsNewerData && !b.splitBrain)
        // The operator demotes b: the next connect makes it the target of a's newer data.
        #expect(b.demote(into: &actions) == nil)
        #expect(b.roleConflict == nil)
        actions.removeAll()
        b.linkUp(peer: Self.hello(of: a), freshUUID: 4, into: &actions)
        #expect(b.lastDecision?.decision == .becomeTarget && !actions.contains(.dropLink(.roleConflict)) && b.roleConflict == nil)
    }

    @Test func automaticPoliciesPickTheLoserOrRefuse() {
        func decide(_ policy: SplitBrainPolicy, _ aWrites: Int, _ bWrites: Int) -> (GenerationUUIDs.SyncDecision?, GenerationUUIDs.SyncDecision?) {
            var (a, b) = Self.splitPair(primaryWrites: aWrites, secondaryWrites: bWrites, policy: policy)
            var actions: [ReplicaCore.Action] = []
            _ = a.demote(into: &actions)
            let ha = Self.hello(of: a), hb = Self.hello(of: b)
            a.linkUp(peer: hb, freshUUID: 2, into: &actions)
            b.linkUp(peer: ha, freshUUID: 3, into: &actions)
            return (a.lastDecision?.decision, b.lastDecision?.decision)
        }
        #expect(decide(.disconnect, 3, 2) == (.splitBrain, .splitBrain))
        #expect(decide(.discardLeastChanges, 3, 2) == (.becomeSource, .becomeTarget))
        #expect(decide(.discardLeastChanges, 2, 2) == (.splitBrain, .splitBrain), "a tie is for an operator")
        #expect(decide(.discardZeroChanges, 2, 2) == (.splitBrain, .splitBrain))
        // b promoted at t=10, a never (0 = unknown): younger-primary cannot tell.
        #expect(decide(.discardYoungerPrimary, 1, 5) == (.splitBrain, .splitBrain))
    }

    @Test func bothPromotedAtOnceDropTheLink() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        pair.secondary.peerMessage(.stateChange(PeerStateChange(role: .primary, diskState: .upToDate, uuids: ReplicaCore.wire(pair.primary.uuids))), into: &actions)
        #expect(pair.secondary.peerRole == .primary)
        actions.removeAll()
        pair.primary.peerMessage(.stateChange(PeerStateChange(role: .primary, diskState: .upToDate, uuids: ReplicaCore.wire(pair.secondary.uuids))), into: &actions)
        #expect(actions.contains(.dropLink(.roleConflict)) && pair.primary.roleConflict == .twoPrimaries)
    }
}
