import TandemCore

/// The client: NBD writes (plain, FUA), trims, zeroes and flushes on the primary, a few in
/// flight at once, never overlapping a write still in flight unless the options say so.
extension World {
    func clientIssue() {
        guard !healing, !done else { return }
        if opsIssued < opsTotal {
            let p = primaryNode
            if nodes[p].up && nodes[p].core.role == .primary && pending.count < inFlightMax && switchover == nil { issue(on: p) }
            // The operator (or `[barriers] interval-minutes`) creates barriers under load.
            if options.barriers && switchover == nil && rng.chance(40) { createBarrier() }
            // A client refused for lack of quorum retries slowly.
            let backoff = options.witness && nodes[p].up && !hasQuorum(p) ? 20 * SimTime.ms : 0
            // With a witness, a slower client: the run lasts long enough for an isolation to
            // outlast the timeouts and the witness to promote the other node.
            let gap = options.witness ? rng.between(1000, 20_000) * SimTime.us : rng.between(50, 2000) * SimTime.us
            queue.push(now + backoff + gap, .clientIssue)
        } else if pending.isEmpty {
            startHeal()
        } else {
            queue.push(now + 5 * SimTime.ms, .clientIssue)
        }
    }

    func issue(on p: Int) {
        let r = rng.below(100)
        var op: ClientOp
        if r >= 78 {
            op = ClientOp(key: nextKey, kind: .flush, first: 0, count: 0, fua: false, seq: 0, flushMark: ackLog.count)
        } else {
            let kind: ClientOp.Kind = r < 62 ? .write : r < 70 ? .trim : .zeroes(noHole: rng.below(2) == 0)
            var placed: (Int, Int)?
            for _ in 0..<4 {
                let count = rng.chance(700) ? 1 + rng.below(4) : 1 + rng.below(SimLayout.writeBlocksMax)
                let first = rng.chance(600) ? rng.below(64 - count + 1) : rng.below(SimLayout.blocks - count + 1)
                if options.overlappingClientWrites || !pending.contains(where: { $0.isWrite && $0.first < first + count && first < $0.first + $0.count }) {
                    placed = (first, count)
                    break
                }
            }
            guard let (first, count) = placed else { return }
            op = ClientOp(key: nextKey, kind: kind, first: first, count: count, fua: rng.chance(150), seq: nextSeq)
            nextSeq += 1
            for b in first..<first + count { maxSeq[b] = max(maxSeq[b], op.seq) }
        }
        nextKey += 1
        opsIssued += 1
        pending.append(op)
        record(.issue(node: p, op: op))
        clientRequest(p, op)
    }

    /// `ReplicatedNode.clientRequest`: writes pass the activity log first, in order.
    func clientRequest(_ i: Int, _ op: ClientOp) {
        guard hasQuorum(i) else {
            // ReplicatedNode: without quorum the other side may be promoted; nothing is accepted.
            // (Not counted in the workload: the client tries again later.)
            pending.removeAll { $0.key == op.key }
            opsIssued -= 1
            record(.complete(node: i, op: op, result: -5))
            count("refused without quorum")
            if op.isWrite { for b in op.first..<op.first + op.count { uncertain(b, upTo: op.seq) } }
            return
        }
        if op.isWrite {
            guard nodes[i].waitingForLog.isEmpty, admitToLog(i, op) else {
                nodes[i].waitingForLog.append(op.key)
                flushPeerForRoom(i)
                return
            }
        }
        startClientRequest(i, op)
    }

    func admitToLog(_ i: Int, _ op: ClientOp) -> Bool {
        let offset = UInt64(op.first * SimLayout.blockBytes), length = UInt64(op.count * SimLayout.blockBytes)
        switch nodes[i].activityLog.beginWrite(offset: offset, length: length) {
        case .proceed:
            return true
        case .wait:
            return false
        case .waitForTransaction:
            fail("n\(i) activity log left a transaction in flight (the node persists them synchronously)")
            return false
        case .needTransaction(let first):
            var transaction: ActivityLog.Transaction? = first
            while let tx = transaction {
                persistTransaction(i, tx)
                transaction = nodes[i].activityLog.transactionPersisted(tx)
            }
            return true
        }
    }

    /// Bitmap pages before an eviction, then the transaction (Protocol/metadata.md, write ordering).
    func persistTransaction(_ i: Int, _ tx: ActivityLog.Transaction) {
        count("al transaction")
        if tx.evictedCount > 0 {
            count("al eviction")
            // As the node: a detached disk is not synced (its writes are marked instead), and
            // extents evicted before the detach's state change marked the log are marked here.
            if nodes[i].core.disk != .failed {
                nodes[i].disk.flushNow()
            } else if !nodes[i].logMarkedAtDetach {
                nodes[i].core.markExtentsEvictedFromDetachedDisk(nodes[i].activityLog, by: tx)
            }
            persistMetadata(i)
        }
        let bytes = nodes[i].activityLog.encoded(tx)
        let start = tx.slot * ActivityLog.transactionBytes
        nodes[i].meta.ring.replaceSubrange(start..<start + ActivityLog.transactionBytes, with: bytes)
    }

    func admitWaitingWrites(_ i: Int) {
        while let key = nodes[i].waitingForLog.first, let op = pending.first(where: { $0.key == key }), admitToLog(i, op) {
            nodes[i].waitingForLog.removeFirst()
            startClientRequest(i, op)
        }
        if !nodes[i].waitingForLog.isEmpty { flushPeerForRoom(i) }
    }

    /// As the node: a write waiting for room asks the core to flush the peer, so that answered
    /// writes settle and release their extents.
    func flushPeerForRoom(_ i: Int) {
        call(i) { core, a in core.flushPeerToSettleWrites(into: &a) }
    }

    func startClientRequest(_ i: Int, _ op: ClientOp) {
        let id = nodes[i].nextClientID
        nodes[i].nextClientID += 1
        nodes[i].clients[id] = op.key
        let offset = UInt64(op.first * SimLayout.blockBytes), length = UInt32(op.count * SimLayout.blockBytes)
        call(i) { core, a in
            switch op.kind {
            case .write: core.clientWrite(id: id, offset: offset, length: length, kind: .write, fua: op.fua, into: &a)
            case .trim: core.clientWrite(id: id, offset: offset, length: length, kind: .trim, fua: op.fua, into: &a)
            case .zeroes(let noHole): core.clientWrite(id: id, offset: offset, length: length, kind: .zeroes(noHole: noHole), fua: op.fua, into: &a)
            case .flush: core.clientFlush(id: id, into: &a)
            }
        }
    }

    /// The client gets its answer: the model learns, and the answer is checked against both disks.
    func clientCompleted(_ i: Int, key: Int, clientID: UInt64, result: Int32) {
        guard let index = pending.firstIndex(where: { $0.key == key }) else {
            if let op = orphans.removeValue(forKey: key) { return orphanCompleted(i, op, clientID: clientID, result: result) }
            return fail("n\(i) answered request #\(key), which is not in flight")
        }
        let op = pending.remove(at: index)
        let acked = nodes[i].peerAcked.removeValue(forKey: clientID)
        record(.complete(node: i, op: op, result: result))
        guard op.isWrite else {
            if result == 0 { stabilize(upTo: op.flushMark) }
            return
        }
        let blocks = op.first..<op.first + op.count
        guard result == 0 else {
            // A failed write may have landed on some blocks, on either disk.
            for b in blocks { uncertain(b, upTo: op.seq) }
            return
        }
        for b in blocks {
            // Overlapping writes reach both disks in the order they were issued (the core keeps
            // it): a write answered after a newer one to the same block leaves the newer value.
            floor[b] = max(floor[b], op.seq)
            exact[b] = floor[b] >= unsettledSeq[b] && !pending.contains { $0.isWrite && $0.seq > floor[b] && $0.first <= b && b < $0.first + $0.count }
        }
        ackLog.append((op.first, op.count, op.seq))
        if op.fua { for b in blocks { stable[b] = max(stable[b], op.seq) } }
        // Alone: the peer never acknowledged it. A write the peer did acknowledge is not, even
        // if the link died before the local write completed (the node had not noticed): the peer
        // wrote it, as it did every write it acknowledged before; whether its copy survives a
        // power loss there is the durability model's concern (`crash`), not the generations'.
        if acked == nil { nodes[i].wroteAlone = true }
        checkQuorumAnswer(i, op)
        checkAcknowledged(i, op)
    }

    /// The old primary answers a request the client gave up on when it moved to the new one:
    /// the model learns nothing (its blocks are uncertain), but an acknowledgment still counts.
    func orphanCompleted(_ i: Int, _ op: ClientOp, clientID: UInt64, result: Int32) {
        let acked = nodes[i].peerAcked.removeValue(forKey: clientID)
        record(.complete(node: i, op: op, result: result))
        guard op.isWrite, result == 0 else { return }
        count("answer after the client moved")
        if acked == nil { nodes[i].wroteAlone = true }
        checkQuorumAnswer(i, op)
    }

    /// The client leaves node `i` (the witness promoted the other): its requests in flight may
    /// still be answered there, or not.
    func abandonClients(of i: Int) {
        for op in pending {
            orphans[op.key] = op
            if op.isWrite { for b in op.first..<op.first + op.count { uncertain(b, upTo: op.seq) } }
        }
        if !pending.isEmpty { record(.note("client abandons \(pending.count) requests in flight on n\(i)")) }
        pending.removeAll()
        nodes[i].waitingForLog.removeAll()
    }

    /// An acknowledged FLUSH makes durable every write acknowledged before it was sent.
    func stabilize(upTo mark: Int) {
        guard mark > stabilized else { return }
        for k in stabilized..<mark {
            let e = ackLog[k]
            for b in e.first..<e.first + e.count { stable[b] = max(stable[b], e.seq) }
        }
        stabilized = mark
    }

    /// The client loses the answers to its requests in flight on node `i` (it crashed or
    /// stopped): each may or may not have landed.
    func dropClients(of i: Int) {
        guard i == primaryNode else { return }
        for op in pending where op.isWrite {
            for b in op.first..<op.first + op.count { uncertain(b, upTo: op.seq) }
        }
        if !pending.isEmpty { record(.note("client loses \(pending.count) requests in flight")) }
        pending.removeAll()
    }
}
