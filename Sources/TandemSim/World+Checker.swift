import TandemCore

/// The invariants. The model holds, per block, what a client may read back:
/// - `floor`: the value of the last acknowledged write; `exact`: only that value is right (no
///   write to the block failed or was lost in flight since, no crash took unflushed data);
/// - otherwise any value from `floor` up to `maxSeq` (the newest write ever sent to the block);
/// - `stable`: the value an acknowledged FLUSH or FUA made durable (what a power loss keeps).
extension World {
    func checkModel(_ b: Int, _ v: UInt64) -> String? {
        if exact[b] ? v == floor[b] : (v >= floor[b] && v <= maxSeq[b]) { return nil }
        return "block \(b) holds \(v), but \(expectation(b))"
    }

    /// Block `b` may hold any value up to `seq` from now on (until a newer write is acknowledged).
    func uncertain(_ b: Int, upTo seq: UInt64) {
        exact[b] = false
        unsettledSeq[b] = max(unsettledSeq[b], seq)
    }

    func expectation(_ b: Int) -> String {
        exact[b] ? "the client was last acknowledged \(floor[b])" : "the client may read \(floor[b])...\(maxSeq[b]) (stable \(stable[b]))"
    }

    /// Blocks with a client write in flight: their value is not settled.
    func busyBlocks() -> [Bool] {
        var busy = Array(repeating: false, count: SimLayout.blocks)
        for op in pending where op.isWrite { for b in op.first..<op.first + op.count { busy[b] = true } }
        return busy
    }

    /// The primary believes its peer is a full copy: connected, in sync, nothing out of sync.
    func isRedundant() -> Bool {
        let p = primaryNode, s = other(p)
        guard nodes[p].up, nodes[s].up, let c = nodes[p].connection, conns[c].alive, nodes[s].connection == c else { return false }
        let core = nodes[p].core!
        return core.link == .connected && core.sync == .established && core.peerDisk == .upToDate && core.disk == .upToDate
            && core.bitmap.setBitCount == 0 && nodes[s].core.disk == .upToDate
    }

    /// Checked at every fault and before every crash:
    /// - what the client reads (the primary's disk, or the peer's when the primary's is detached)
    ///   is what it was acknowledged;
    /// - every write acknowledged survives losing the primary: while the primary is connected
    ///   and in sync, each block its bitmap calls in sync holds, on the peer, what the client
    ///   was acknowledged.
    func checkContinuously() {
        if options.barriers { checkBarrierImages() }
        let p = primaryNode, s = other(p)
        guard nodes[p].up, nodes[p].core.role == .primary else { return }
        let busy = busyBlocks()
        let core = nodes[p].core!
        let peerReadable = nodes[s].up && nodes[s].connection != nil && nodes[s].connection == nodes[p].connection
        let view: [UInt64]? = core.disk != .failed ? nodes[p].disk.cache : (peerReadable && core.readsFromPeer ? nodes[s].disk.cache : nil)
        // Reads through the peer may meet its rotten blocks: only a verify finds those.
        let rotten = core.disk != .failed ? Array(repeating: false, count: SimLayout.blocks) : nodes[s].disk.corrupt
        if let view {
            for b in 0..<SimLayout.blocks where !busy[b] && !rotten[b] {
                if let problem = checkModel(b, view[b]) { return fail("the device \(problem)") }
            }
        }
        guard peerReadable, let c = nodes[p].connection, conns[c].alive, core.link == .connected, core.sync == .established,
              core.peerDisk == .upToDate, nodes[s].core.disk == .upToDate
        else { return }
        let peer = nodes[s].disk
        for b in 0..<SimLayout.blocks where !busy[b] && !peer.corrupt[b] && !core.bitmap.isSet(bit: b) {
            if let problem = checkModel(b, peer.cache[b]) {
                return fail("n\(s), in sync per n\(p)'s bitmap, would lose an acknowledged write if n\(p) failed now: \(problem)")
            }
        }
    }

    /// Checked at every acknowledged write: the client reads it back, and if the primary says its
    /// peer is in sync for those blocks, the peer has it too (protocol C).
    func checkAcknowledged(_ p: Int, _ op: ClientOp) {
        guard op.isWrite, !options.overlappingClientWrites else { return }
        let s = other(p)
        let core = nodes[p].core!
        let peerReadable = nodes[s].up && nodes[s].connection != nil && nodes[s].connection == nodes[p].connection
            && conns[nodes[p].connection!].alive
        let view: [UInt64]? = core.disk != .failed ? nodes[p].disk.cache : (peerReadable ? nodes[s].disk.cache : nil)
        for b in op.first..<op.first + op.count {
            if let view, view[b] != op.seq {
                return fail("read after acknowledged \(op): block \(b) holds \(view[b])")
            }
        }
        // Also while resyncing as source: client writes go to the target too, and a block whose
        // bit is clear was copied already.
        guard peerReadable, core.link == .connected, core.sync != .syncTarget, core.peerDisk == .upToDate || core.peerDisk == .inconsistent
        else { return }
        for b in op.first..<op.first + op.count where !core.bitmap.isSet(bit: b) && !nodes[s].disk.corrupt[b] && nodes[s].disk.cache[b] != op.seq {
            return fail("acknowledged \(op) while n\(s) is in sync, but n\(s) holds \(nodes[s].disk.cache[b]) at block \(b) (acked before the peer wrote it?)")
        }
    }
}
