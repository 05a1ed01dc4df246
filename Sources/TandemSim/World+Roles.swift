import TandemCore

/// A planned switchover, as an operator runs it: `tandem secondary` on the primary
/// (`ReplicatedNode.demote`: its clients drained, a flush of both sides, `ReplicaCore.demote`),
/// then `tandem primary` on the secondary once both are connected, it is UpToDate and has seen
/// the demotion. If the secondary does not get there (the link or a node failed meanwhile), the
/// operator promotes the old primary again: it holds every write it answered.
enum Switchover {
    case draining(from: Int, life: Int)
    case flushing(from: Int, life: Int)
    case promoting(to: Int, tries: Int)
    /// A rollback instead of the promotion (`--barriers`, `World+Barriers.swift`): the secondary
    /// waits to see the demoted peer, restores, then the pair resyncs from it.
    case rollingBack(to: Int, barrier: UInt64, tries: Int)
    /// With a witness: the rollback waits for its record (the witness's, or the peer's).
    case askingRollback(node: Int, barrier: UInt64, life: Int, tries: Int)
    case restoring(node: Int, barrier: UInt64)
    case afterRollback(node: Int, barrier: UInt64, tries: Int)
}

extension World {
    static let switchoverPromoteTriesMax = 30

    func startSwitchover() {
        let p = primaryNode, s = other(p)
        guard switchover == nil, nodes[p].up, nodes[s].up, nodes[p].core.role == .primary, nodes[p].core.replicating,
              nodes[p].core.peerDisk == .upToDate
        else { return }
        record(.fault("switchover: n\(p) demotes, then n\(s) is promoted"))
        count("switchover")
        switchover = .draining(from: p, life: nodes[p].life)
        queue.push(now + SimTime.ms, .switchoverStep)
    }

    func switchoverStep() {
        guard let step = switchover else { return }
        switch step {
        case .draining(let p, let life):
            guard nodes[p].up, nodes[p].life == life, nodes[p].core.role == .primary else { return abortSwitchover("n\(p) is gone") }
            // As the node's NBD drain: its own requests in flight finish first, answers held for
            // the witness's record included, even those of a client that left for the other node
            // (the witness promoted it): a demotion that left them held answered them at a later
            // promotion, data a resync had overwritten meanwhile
            // (`--witness --switchover --primary-disk-errors` 315969).
            // One demotion flush at a time: a demotion by the witness may be flushing already.
            if pending.isEmpty && nodes[p].clients.isEmpty && nodes[p].held.isEmpty && nodes[p].demotionFlushID == nil {
                // The node's clients are gone (writes waiting for the log with them); one flush
                // of both sides, then the demotion.
                let id = nodes[p].nextClientID
                nodes[p].nextClientID += 1
                nodes[p].demotionFlushID = id
                switchover = .flushing(from: p, life: life)
                record(.note("switchover: n\(p) drained, flushing both sides"))
                call(p) { core, a in core.clientFlush(id: id, into: &a) }
            }
        case .flushing(let p, let life):
            guard nodes[p].up, nodes[p].life == life else { return abortSwitchover("n\(p) is gone") }
        case .rollingBack, .askingRollback, .restoring, .afterRollback:
            return rollbackStep(step)
        case .promoting(let s, let tries):
            if nodes[s].up, nodes[s].core.role == .primary {
                // Promoted meanwhile another way (the witness's automatic failover).
                switchover = nil
                return
            }
            let core = nodes[s].core
            // The operator reads both nodes' status: the demoted one must be connected too, on the
            // same link. The secondary's own view may be stale: a partition it has not noticed
            // yet hides the peer's promotion, a write it answered alone once the link timed out
            // there, and its demotion; promoted on that view, it is a primary older than its
            // peer, which no resync may overwrite, and the two never connect again
            // (`--failover --primary-disk-errors --double-faults --switchover` 27437).
            let p = other(s)
            let bothConnected = nodes[p].up && nodes[p].connection != nil && nodes[p].connection == nodes[s].connection
                && nodes[p].core.role == .secondary && nodes[p].core.link == .connected
            if nodes[s].up, let core, core.role == .secondary, core.link == .connected, core.sync == .established, core.disk == .upToDate,
               core.peerRole == .secondary, bothConnected {
                var refusal: RoleChangeRefusal?
                let fresh = freshUUID()
                nodes[s].superblockFlags.insert(.wasPrimary)
                call(s) { core, a in refusal = core.promote(force: false, freshUUID: fresh, nowMillis: now / SimTime.ms, into: &a) }
                if let refusal {
                    nodes[s].superblockFlags.remove(.wasPrimary)
                    record(.note("switchover: promote n\(s) refused: \(refusal)"))
                } else {
                    persistMetadata(s)
                    record(.fault("switchover: n\(s) promoted"))
                    count("switchover done")
                    switchover = nil
                    return
                }
            }
            guard tries < Self.switchoverPromoteTriesMax else { return abortSwitchover("n\(s) did not become connected and UpToDate") }
            switchover = .promoting(to: s, tries: tries + 1)
        }
        queue.push(now + 20 * SimTime.ms, .switchoverStep)
    }

    /// `ReplicaCore.demote` as the node does it: a clean demotion clears wasPrimary (its bitmap
    /// is on disk), and one whose flush failed on the kept disk marks the activity log's extents
    /// (`ReplicaCore.markLogExtentsAfterFailedDemotionFlush`). Nil when the node demoted.
    func demote(_ i: Int, flushResult: Int32) -> RoleChangeRefusal? {
        var refusal: RoleChangeRefusal?
        let log = nodes[i].activityLog
        call(i) { core, a in
            refusal = core.demote(into: &a)
            if refusal == nil && flushResult < 0 && core.disk != .failed { core.markLogExtentsAfterFailedDemotionFlush(log) }
        }
        if refusal == nil && flushResult < 0 && nodes[i].core.disk != .failed {
            // The model: this disk is the source of those blocks at the next connect, with what
            // its power loss keeps of them (unflushed writes may go, as NBD allows).
            nodes[i].demotedUnflushed = true
            count("demotion after a failed flush: log marked")
        }
        if refusal == nil {
            nodes[i].superblockFlags.remove(.wasPrimary)
            persistMetadata(i)
        }
        return refusal
    }

    /// The demotion's flush is done (whatever its result: the node demotes anyway).
    func demoteAfterFlush(_ p: Int, result: Int32) {
        guard case .flushing(p, _) = switchover else { return fail("n\(p) finished a demotion flush no switchover waits for") }
        if let refusal = demote(p, flushResult: result) { return abortSwitchover("demotion refused: \(refusal)") }
        record(.fault("switchover: n\(p) demoted (flush \(result))"))
        primaryNode = other(p)
        if let id = rollbackBarrier {
            rollbackBarrier = nil
            switchover = .rollingBack(to: other(p), barrier: id, tries: 0)
            return
        }
        switchover = .promoting(to: other(p), tries: 0)
    }

    func abortSwitchover(_ why: String) {
        guard let step = switchover else { return }
        switchover = nil
        rollbackBarrier = nil
        record(.note("switchover abandoned: \(why)"))
        count("switchover abandoned")
        if case .promoting(let s, _) = step, !(nodes[s].up && nodes[s].core.role == .primary) {
            // The old primary took every answered write with it into the demotion: promote it again.
            let p = other(s)
            primaryNode = p
            if nodes[p].up { queue.push(now + 10 * SimTime.ms, .promote(node: p, life: nodes[p].life, tries: 0)) }
        }
    }

    /// A crash or stop ends a switchover that waits for the promotion (the model of who serves
    /// must not change under the fault).
    func abortSwitchoverBeforeAFault() {
        if case .promoting = switchover { abortSwitchover("a node fails") }
    }
}
