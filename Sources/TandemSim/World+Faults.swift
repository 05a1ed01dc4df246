import TandemCore

/// Faults, one case each: to add one, add a case (last, so that the seeds of the other modes
/// keep their picks), a weight (0 unless its option is on) and its effect in `inject`.
enum Fault: CaseIterable {
    case linkReset, partition, crash, restart, diskErrors, corrupt, verify, none, switchover, isolate, witnessRestart, rollback

    func weight(_ options: SimOptions) -> Int {
        switch self {
        case .linkReset: 18
        case .partition: 10
        case .crash: 14
        case .restart: 4
        case .diskErrors: 6
        case .corrupt: 3
        case .verify: 8
        case .none: 10
        case .switchover: options.switchover ? 40 : 0
        case .isolate: options.witness ? 16 : 0
        case .witnessRestart: options.witness ? 4 : 0
        // With a witness too: the rollback waits for the witness's record (or the peer's), so a
        // rollback begun while the secondary is cut off no longer loses its notice while the
        // witness promotes the demoted node (seeds 37 and 232 of `--witness --barriers`).
        case .rollback: options.barriers ? 40 : 0
        }
    }
}

extension World {
    func injectFault() {
        var pick = rng.below(Fault.allCases.reduce(0) { $0 + $1.weight(options) })
        let fault = Fault.allCases.first { pick -= $0.weight(options); return pick < 0 }!
        switch fault {
        case .linkReset:
            guard let c = liveConnection() else { return }
            record(.fault("connection reset c\(c)"))
            count("fault reset")
            kill(c, noticeDelay: [rng.between(0, 2000) * SimTime.us, rng.between(0, 2000) * SimTime.us])
        case .partition:
            let duration = rng.chance(500) ? rng.between(5, 500) * SimTime.ms : rng.between(500, 3000) * SimTime.ms
            partitionUntil = max(partitionUntil, now + duration)
            record(.fault("partition for \(duration / SimTime.ms) ms"))
            count("fault partition")
            if duration > SimTime.peerTimeout, let c = liveConnection() {
                queue.push(now + SimTime.peerTimeout + rng.between(0, 200) * SimTime.ms, .partitionTimeout(conn: c))
            }
        case .crash:
            let i = rng.below(2)
            if !nodes[i].up && nodes[i].stoppedUnflushed { return powerLossWhileStopped(i) }
            // Single faults: the other node is up and has long noticed any earlier crash.
            guard nodes[i].up, options.doubleFaults || (nodes[other(i)].up && lastCrash.map { now >= $0 + SimTime.peerTimeout + 500 * SimTime.ms } ?? true) else { return }
            lastCrash = now
            crash(i, powerLoss: rng.below(2) == 0)
        case .restart:
            let i = rng.below(2)
            guard nodes[i].up, options.doubleFaults || (nodes[other(i)].up && lastCrash.map { now >= $0 + SimTime.peerTimeout + 500 * SimTime.ms } ?? true) else { return }
            lastCrash = now
            record(.fault("n\(i) stops cleanly and restarts"))
            count("fault clean restart")
            stop(i)
            queue.push(now + rng.between(50, 500) * SimTime.ms, .restart(node: i, life: nodes[i].life))
        case .diskErrors:
            let i = options.primaryDiskErrors ? rng.below(2) : other(primaryNode)
            // One failing disk at a time: with both detached no copy is consistent, and only an
            // operator forcing one primary (with data loss) gets out.
            guard !diskNeedsRepair(other(i)) else { return }
            let permille = 20 + rng.below(280)
            let duration = rng.between(50, 2000) * SimTime.ms
            record(.fault("n\(i) disk fails \(permille)/1000 of operations for \(duration / SimTime.ms) ms"))
            count("fault disk errors")
            nodes[i].disk.errorPermille = permille
            queue.push(now + duration, .diskHealthy(node: i))
        case .corrupt:
            let s = other(primaryNode)
            // Only where a verify from the primary finds it: with failover, switchover or a
            // detached primary the rotten copy may serve or become the resync source, and
            // nothing can tell.
            guard !options.failover, !options.primaryDiskErrors, !options.switchover, !options.witness, !options.barriers, nodes[s].up else { return }
            let b = rng.below(SimLayout.blocks)
            record(.fault("n\(s) block \(b) rots"))
            count("fault corruption")
            corruptionInjected = true
            nodes[s].disk.corrupt(b, value: 0xBAD0_0000_0000_0000 | UInt64(rng.below(1 << 20)))
        case .verify:
            if verify(blocks: rng.below(2) == 0 ? 0..<SimLayout.blocks : randomRange()) { count("verify") }
        case .none:
            break
        case .switchover:
            startSwitchover()
        case .isolate:
            // Mostly the primary: the interesting case is the witness promoting the other.
            let i = rng.chance(700) ? primaryNode : other(primaryNode)
            isolate(i, for: rng.chance(400) ? rng.between(100, 1000) * SimTime.ms : rng.between(1500, 6000) * SimTime.ms)
        case .witnessRestart:
            restartWitness(after: rng.between(50, 3000) * SimTime.ms)
        case .rollback:
            startRollback()
        }
    }

    /// The node's disk fails now, is detached, or waits for the resync that attaches it again.
    func diskNeedsRepair(_ i: Int) -> Bool {
        nodes[i].disk.errorPermille > 0 || nodes[i].meta.flags.contains(.resyncTarget) || (nodes[i].up && nodes[i].core.disk != .upToDate)
    }

    func randomRange() -> Range<Int> {
        let a = rng.below(SimLayout.blocks), b = rng.below(SimLayout.blocks)
        return min(a, b)..<max(a, b) + 1
    }

    func liveConnection() -> Int? {
        guard let c = nodes[0].connection ?? nodes[1].connection, conns[c].alive else { return nil }
        return c
    }

    /// Power loss (the cache is lost, writes in flight tear) or a killed process (the machine
    /// keeps its cache). With `failover`, a crashed primary's peer is restarted as primary.
    func crash(_ i: Int, powerLoss: Bool) {
        abortSwitchoverBeforeAFault()
        record(.fault("n\(i) \(powerLoss ? "loses power" : "process is killed")"))
        count(powerLoss ? "fault power loss" : "fault process crash")
        checkContinuously()
        guard !done else { return }
        let s = other(i)
        // Not during a rollback: the operator running it promotes the rolled-back node.
        let failingOver = options.failover && i == primaryNode && nodes[s].up && !rollingBack
        let redundant = isRedundant()
        // The primary's disk is detached, or the peer (a failover's target) is not UpToDate, or
        // this node answered writes the peer never acknowledged: it holds the only consistent
        // copy of the newest data. An old primary that demoted alone (its peer cut off, the
        // demotion's flush failed) for a rollback the peer, UpToDate but stale, never began: the
        // operator promotes it again, and the pair resyncs from it, with what its disk kept
        // (`--barriers --failover --double-faults --primary-disk-errors` 117100438). So does one
        // that demoted after its flush failed on its kept disk: it marked its activity log's
        // extents, and the pair resyncs them from what its disk kept.
        let onlyCopy = i != primaryNode && (!(nodes[s].up && nodes[s].core.disk == .upToDate) || nodes[i].wroteAlone || nodes[i].demotedUnflushed
            || nodes[i].stoppedUnflushed)
        dropClients(of: i)
        if onlyCopy && powerLoss {
            // As the device losing power: flushed data survives, unflushed writes may not.
            for b in 0..<SimLayout.blocks where floor[b] > stable[b] {
                floor[b] = stable[b]
                uncertain(b, upTo: maxSeq[b])
            }
            stabilized = ackLog.count
        }
        if i == primaryNode {
            if failingOver && !redundant {
                // The writes only the old primary had may be lost (the operator promotes the peer)
                // or come back (the old primary returns first and, as a crashed primary, resyncs
                // them to the peer before the promotion): either is allowed, nothing older.
                record(.note("failover onto a peer that was not up to date: its writes or the old primary's"))
                for b in 0..<SimLayout.blocks where nodes[s].disk.cache[b] != floor[b] {
                    floor[b] = min(floor[b], nodes[s].disk.cache[b])
                    // What the peer's cache holds there may be its own unflushed write (a primary
                    // cut off, or not yet demoted): its power loss keeps only its durable value.
                    stable[b] = min(stable[b], floor[b], nodes[s].disk.durable[b])
                    uncertain(b, upTo: maxSeq[b])
                }
                for b in 0..<SimLayout.blocks where nodes[s].disk.cache[b] == floor[b] {
                    // The peer holds the acknowledged write, maybe only in its cache: a FLUSH the
                    // old primary answered after the link dropped covered it there alone (its
                    // transfer log marked it out of sync), so the peer's power loss keeps only
                    // its durable value here too (`--failover --primary-disk-errors
                    // --double-faults --switchover`, seed 122).
                    stable[b] = min(stable[b], nodes[s].disk.durable[b])
                }
            }
            if powerLoss {
                // It comes back as primary with what its disk kept: flushed data at least.
                for b in 0..<SimLayout.blocks where floor[b] > stable[b] {
                    floor[b] = stable[b]
                    uncertain(b, upTo: maxSeq[b])
                }
                // A later flush covers nothing acknowledged before the crash: that may be gone.
                stabilized = ackLog.count
            }
        }
        if powerLoss {
            nodes[i].disk.powerLoss(rng: &rng)
            for b in 0..<SimLayout.blocks where floor[b] > stable[b] && nodes[i].disk.cache[b] != floor[b] { lostAtPowerLoss[i][b] = true }
        } else {
            nodes[i].disk.processCrash()
        }
        if powerLoss && options.barriers { nodes[i].undo.powerLoss(rng: &rng) }
        if let w = nodes[i].witnessConn {
            killWitnessLink(w, nodeDelay: 0, witnessDelay: powerLoss ? SimTime.peerTimeout + rng.between(0, 200) * SimTime.ms : rng.between(10, 1000) * SimTime.us)
        }
        let c = nodes[i].connection
        nodes[i].die()
        if let c {
            // A dead machine sends nothing: its peer notices at its ping timeout. A killed
            // process's kernel resets the connection at once.
            var delays = [UInt64(0), UInt64(0)]
            delays[s] = powerLoss ? SimTime.peerTimeout + rng.between(0, 200) * SimTime.ms : rng.between(10, 1000) * SimTime.us
            kill(c, noticeDelay: delays)
        }
        if failingOver {
            // The operator promotes the survivor once it has noticed the loss (`tandem primary`).
            record(.fault("failover: n\(s) is to be promoted"))
            count("failover")
            primaryNode = s
            queue.push(now + SimTime.peerTimeout + rng.between(10, 300) * SimTime.ms, .promote(node: s, life: nodes[s].life, tries: 0))
        }
        queue.push(now + rng.between(100, 1500) * SimTime.ms, .restart(node: i, life: nodes[i].life))
    }

    /// The machine of a node stopped after its final sync failed loses power before the restart:
    /// its disk keeps flushed data and maybe not the rest. As `crash`'s power loss of a primary,
    /// what no flush covered may be lost; the restart (a crashed primary's) resyncs the log's
    /// extents from what the disk kept.
    func powerLossWhileStopped(_ i: Int) {
        record(.fault("n\(i) loses power while stopped"))
        count("fault power loss while stopped")
        for b in 0..<SimLayout.blocks where floor[b] > stable[b] {
            floor[b] = stable[b]
            uncertain(b, upTo: maxSeq[b])
        }
        stabilized = ackLog.count
        nodes[i].disk.powerLoss(rng: &rng)
        for b in 0..<SimLayout.blocks where floor[b] > stable[b] && nodes[i].disk.cache[b] != floor[b] { lostAtPowerLoss[i][b] = true }
    }

    /// `ReplicatedNode.stop` in `tandem up`'s order: the link closed (`PeerConnection.close`
    /// calls `peerConnectionDown` at once, so the core marks what the peer may lack), what the
    /// local disk may lack marked (writes not done on it), metadata persisted; on a primary
    /// with its disk attached the device synced, then `wasPrimary` cleared only if that sync
    /// succeeded (a failing disk's sync may fail, its blocks left dirty, and the restart is then a
    /// crashed primary's); the machine stays up (writes in flight land) and the device is
    /// synced again when the loop ends (a sync after a failed one promises nothing: not modelled).
    func stop(_ i: Int) {
        abortSwitchoverBeforeAFault()
        if options.barriers { drainCopyOnWrite(i) }
        let c = nodes[i].connection
        if let c { linkNotice(i, c) }
        nodes[i].core.markUnfinishedLocalWrites()
        persistMetadata(i)
        // The writes in flight land in the cache first: the model keeps the one final sync,
        // which covered them before the node's sync moved ahead of the loop's end.
        nodes[i].disk.processCrash()
        var synced = true
        if nodes[i].core.role == .primary {
            if nodes[i].core.disk != .failed {
                synced = !(nodes[i].disk.errorPermille > 0 && rng.below(1000) < nodes[i].disk.errorPermille)
                if synced { nodes[i].disk.flushNow() }
            }
            if synced {
                nodes[i].superblockFlags.remove(.wasPrimary)
                persistMetadata(i)
            } else {
                // The model: until the pair is in sync again this disk is the source of its log's
                // extents, with what a power loss keeps of them (writes no flush covered).
                record(.note("n\(i) stops with its final sync failed: wasPrimary kept"))
                count("stop after a failed final sync: wasPrimary kept")
                nodes[i].stoppedUnflushed = true
            }
        }
        dropClients(of: i)
        if let w = nodes[i].witnessConn { killWitnessLink(w, nodeDelay: 0, witnessDelay: rng.between(10, 1000) * SimTime.us) }
        if synced { nodes[i].disk.flushNow() }
        nodes[i].die()
        if let c { kill(c, noticeDelay: [0, 0].map { _ in rng.between(10, 1000) * SimTime.us }) }
    }

    /// Online verify (`tandem verify`), at one instant: blocks that differ are marked out of
    /// sync, the bitmap persisted, and the marked blocks resynced from the primary.
    @discardableResult
    func verify(blocks: Range<Int>) -> Bool {
        let p = primaryNode, s = other(p)
        guard nodes[p].up, nodes[s].up, let c = nodes[p].connection, conns[c].alive, nodes[s].connection == c,
              nodes[p].core.role == .primary, nodes[p].core.link == .connected, nodes[p].core.sync == .established,
              nodes[p].core.disk == .upToDate, nodes[p].core.peerDisk == .upToDate
        else { return false }
        var differ = 0
        for b in blocks where nodes[p].disk.cache[b] != nodes[s].disk.cache[b] {
            nodes[p].core.markOutOfSync(offset: UInt64(b * SimLayout.blockBytes), length: UInt64(SimLayout.blockBytes))
            differ += 1
        }
        record(.fault("verify blocks \(blocks.lowerBound)..<\(blocks.upperBound): \(differ) differ"))
        persistMetadata(p)
        call(p) { core, a in core.resyncMarked(into: &a) }
        return true
    }

    // MARK: Healing and the end of a run

    /// Faults stop, the client is done: everything must come back to two equal replicas.
    func startHeal() {
        guard !healing else { return }
        healing = true
        healStarted = now
        lastNudge = now
        record(.note("faults stop; healing"))
        partitionUntil = now
        isolatedUntil = [now, now]
        if options.witness && !witness.up { startWitness(life: witness.life) }
        for i in 0..<2 {
            nodes[i].disk.errorPermille = 0
            if !nodes[i].up { queue.push(now + 10 * SimTime.ms, .restart(node: i, life: nodes[i].life)) }
        }
        queue.push(now + 100 * SimTime.ms, .healCheck)
    }

    /// Both nodes hold writes the other lacks, acknowledged (a split brain the core must find) or
    /// at least submitted to the disk alone (one it may find: `SimNode.submittedAlone`).
    var splitBrainTruth: Bool { nodes.allSatisfy { $0.wroteAlone || $0.submittedAlone } }

    func healCheck() {
        if let i = promoteAfterResync, nodes[i].up, nodes[i].core.role == .secondary, nodes[i].core.link == .connected,
           nodes[i].core.sync == .established, nodes[i].core.disk == .upToDate, nodes[i].core.bitmap.setBitCount == 0 {
            promoteAfterResync = nil
            queue.push(now + 10 * SimTime.ms, .promote(node: i, life: nodes[i].life, tries: 0))
        }
        if quiescent() {
            finalChecks()
            if done { return }
        } else if splitBrainTruth && nodes.allSatisfy({ $0.up && $0.core.link == .standalone }) {
            record(.note("split brain: both nodes stand alone, as they must"))
            count("split brain kept apart")
            done = true
            return
        } else if now - healStarted > SimTime.healDeadline {
            let states = nodes.map { n in n.up ? "n\(n.id) \(n.core.role) disk \(n.core.disk) peer \(n.core.peerDisk.map { "\($0)" } ?? "-") link \(n.core.link) \(n.core.sync) oos \(n.core.bitmap.setBitCount)" : "n\(n.id) down" }
            return fail("no convergence \(SimTime.healDeadline / 1_000_000_000) s after faults stopped: \(states.joined(separator: "; "))")
        } else if now - lastNudge > 5_000 * SimTime.ms {
            nudge()
        }
        queue.push(now + 100 * SimTime.ms, .healCheck)
    }

    /// What an operator does when the pair does not heal on its own.
    func nudge() {
        lastNudge = now
        for i in 0..<2 where nodes[i].up && nodes[i].core.disk == .failed {
            record(.fault("operator: n\(i) has a detached disk: restart it"))
            count("heal: restart a detached node")
            stop(i)
            queue.push(now + 50 * SimTime.ms, .restart(node: i, life: nodes[i].life))
            return
        }
        let p0 = primaryNode
        if switchover == nil, promoteAfterResync == nil, nodes[p0].up, nodes[p0].core.role == .secondary,
           !nodes.contains(where: { $0.up && $0.core.role == .primary }) {
            // Nobody serves: the node meant to be primary was demoted after the faults (the
            // witness deposed it on a record the old primary's demotion had not reached yet:
            // `--witness --barriers --switchover --primary-disk-errors` 304314). The operator
            // promotes it again; the promotion waits for the core and the witness to agree.
            record(.fault("operator: no node is primary: promote n\(p0) again"))
            count("heal: promote again")
            queue.push(now + 10 * SimTime.ms, .promote(node: p0, life: nodes[p0].life, tries: 0))
            return
        }
        if nodes[p0].up, nodes[p0].core.role == .primary, nodes[p0].core.roleConflict == .peerHoldsNewerData {
            // The survivor was promoted while the old primary held writes it lacks (they may be
            // lost or come back: `crash` allowed either); it wrote nothing since, or this would be
            // a split brain. Connecting would resync into it under its clients, so it refuses (as
            // DRBD's rr-conflict disconnect): the operator demotes it, it resyncs from the peer,
            // and is promoted again (seed 62106 of `--failover --double-faults --overlapping-writes`).
            if let refusal = demote(p0, flushResult: 0) {
                record(.note("operator: demoting n\(p0) (its peer holds newer data) refused: \(refusal)"))
                return
            }
            record(.fault("operator: n\(p0) is primary but its peer holds newer data: demote it to resync, then promote it again"))
            count("heal: demote a primary older than its peer")
            promoteAfterResync = p0
            return
        }
        // A node rolling back stands alone until it is done (it neither dials nor accepts); the
        // heal deadline still catches one that never finishes.
        if nodes.contains(where: { $0.up && $0.core.link == .standalone && $0.rollbackRun == nil }) {
            let states = nodes.map { n in n.up ? "n\(n.id) \(n.core.role) \(n.core.link) uuids \(n.core.uuids) wroteAlone \(n.wroteAlone) submittedAlone \(n.submittedAlone)" : "n\(n.id) down" }
            return fail("a node stands alone (split brain or unrelated data) though no split brain happened: \(states.joined(separator: "; "))")
        }
        let p = primaryNode
        if let c = liveConnection(), nodes[p].up, nodes[p].core.link == .connected, nodes[p].core.sync == .established, nodes[p].core.bitmap.setBitCount > 0 {
            // Only a write the peer failed leaves blocks out of sync on an established link (the
            // peer's disk is not detached for it); anything else is a resync that never started.
            guard peerWriteFailed else {
                return fail("connected and established with \(nodes[p].core.bitmap.setBitCount) blocks out of sync, and no resync starts")
            }
            record(.fault("operator: connected with \(nodes[p].core.bitmap.setBitCount) blocks out of sync: reconnect to resync"))
            count("heal: reconnect to resync")
            kill(c, noticeDelay: [SimTime.ms, SimTime.ms])
        }
    }

    func quiescent() -> Bool {
        guard pending.isEmpty, switchover == nil, let c = liveConnection(), conns[c].isDrained, nodes[primaryNode].up, nodes[primaryNode].core.role == .primary
        else { return false }
        for n in nodes {
            guard n.up, n.connection == c, n.waitingForLog.isEmpty, !n.disk.hasInFlight,
                  n.core.link == .connected, n.core.sync == .established, n.core.disk == .upToDate, n.core.peerDisk == .upToDate,
                  n.core.bitmap.setBitCount == 0, n.core.status.writesInFlight == 0
            else { return false }
        }
        return true
    }

    func finalChecks() {
        if options.barriers {
            checkBarrierImages()
            if done { return }
        }
        let p = primaryNode, s = other(p)
        let corrupt = nodes[s].disk.corrupt
        for b in 0..<SimLayout.blocks where !corrupt[b] && nodes[p].disk.cache[b] != nodes[s].disk.cache[b] {
            return fail("connected and in sync, but the replicas differ at block \(b): n\(p) holds \(nodes[p].disk.cache[b]), n\(s) holds \(nodes[s].disk.cache[b]) (\(expectation(b)))")
        }
        for b in 0..<SimLayout.blocks {
            if let problem = checkModel(b, nodes[p].disk.cache[b]) { return fail("at the end, the device \(problem)") }
        }
        if corrupt.contains(true) {
            guard !verifiedAfterCorruption else { return fail("a verify and resync left rotten blocks on n\(s)") }
            verifiedAfterCorruption = true
            verify(blocks: 0..<SimLayout.blocks)
            return
        }
        done = true
    }
}
