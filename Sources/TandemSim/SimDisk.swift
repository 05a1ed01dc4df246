import TandemCore

/// A simulated block device with a volatile write cache, at 4 KiB block granularity (a 4Kn
/// drive: a block is the unit a write can tear at).
///
/// The content of a block is a `UInt64`: the sequence number of the client operation whose data
/// it holds (0: never written). Comparing replicas is comparing these arrays, and a value names
/// the write it came from in a failure report.
///
/// - A completed write lands in the cache (`cache`); `durable` is what survives a power loss.
///   A FUA write is durable when it completes.
/// - A flush makes durable the blocks that were dirty when it was *submitted* (what `fdatasync`
///   promises: writes completed before it), no more.
/// - The cache may write any dirty block back at any time (`writeback`).
/// - Power loss: each dirty block independently survives or not; each block of a write in
///   flight independently lands (durably) or not: torn writes.
/// - A process crash (the machine stays up) keeps the cache; writes in flight still land.
/// - Completions come back in any order (the world gives each operation its own latency).
/// - Injected errors: an operation fails with EIO; a failed write may have written any subset
///   of its blocks.
struct SimDisk {
    enum Payload: Equatable {
        /// Every block gets this value.
        case fill(UInt64)
        /// Block by block (resync data).
        case values([UInt64])

        func value(at index: Int) -> UInt64 {
            switch self {
            case .fill(let v): v
            case .values(let vs): vs[index]
            }
        }
    }

    enum Kind: Equatable {
        case write(Payload, fua: Bool)
        case read
        /// The blocks dirty when the flush was submitted.
        case flush([Int])
    }

    struct Op {
        var tag: LocalIO.Tag
        var kind: Kind
        var first: Int
        var count: Int
    }

    let blocks: Int
    private(set) var durable: [UInt64]
    /// What a read returns now (dirty blocks hold their cached value).
    private(set) var cache: [UInt64]
    private var dirty: [Bool]
    /// Blocks flipped behind the node's back (bit rot); cleared when the block is written.
    private(set) var corrupt: [Bool]
    /// Operations submitted and not completed, by operation number (ordered, for determinism).
    private(set) var inFlight: [(number: Int, op: Op)] = []
    private var nextNumber = 0
    /// Per mille of operations that fail with EIO (a failing disk), 0 normally.
    var errorPermille = 0

    init(blocks: Int) {
        self.blocks = blocks
        durable = Array(repeating: 0, count: blocks)
        cache = durable
        dirty = Array(repeating: false, count: blocks)
        corrupt = dirty
    }

    mutating func submit(_ op: Op) -> Int {
        precondition(op.first >= 0 && op.first + op.count <= blocks, "sim: operation outside the device")
        nextNumber += 1
        var op = op
        if case .flush = op.kind { op.kind = .flush((0..<blocks).filter { dirty[$0] }) }
        inFlight.append((nextNumber, op))
        return nextNumber
    }

    var hasInFlight: Bool { !inFlight.isEmpty }

    /// Completes operation `number`: its result, and the data for a read.
    mutating func complete(_ number: Int, rng: inout SplitMix64) -> (op: Op, result: Int32, read: [UInt64]?)? {
        guard let index = inFlight.firstIndex(where: { $0.number == number }) else { return nil }
        let op = inFlight.remove(at: index).op
        let failed = errorPermille > 0 && rng.below(1000) < errorPermille
        switch op.kind {
        case .write(let payload, let fua):
            for i in 0..<op.count where !failed || rng.below(2) == 0 {
                put(op.first + i, payload.value(at: i), durably: fua && !failed)
            }
            return (op, failed ? -5 : 0, nil)
        case .read:
            return (op, failed ? -5 : 0, failed ? nil : Array(cache[op.first..<op.first + op.count]))
        case .flush(let covered):
            if !failed { for b in covered where dirty[b] { durable[b] = cache[b]; dirty[b] = false } }
            return (op, failed ? -5 : 0, nil)
        }
    }

    private mutating func put(_ block: Int, _ value: UInt64, durably: Bool) {
        cache[block] = value
        corrupt[block] = false
        if durably {
            durable[block] = value
            dirty[block] = false
        } else {
            dirty[block] = true
        }
    }

    /// A synchronous buffered write (a rollback's restore, `pwrite`): into the cache.
    mutating func writeNow(_ block: Int, _ value: UInt64) {
        put(block, value, durably: false)
    }

    /// A synchronous `fdatasync` (the node's resync checkpoint): every completed write.
    mutating func flushNow() {
        for b in 0..<blocks where dirty[b] { durable[b] = cache[b]; dirty[b] = false }
    }

    /// The cache writes one dirty block back on its own.
    mutating func writeback(rng: inout SplitMix64) {
        let b = rng.below(blocks)
        if dirty[b] { durable[b] = cache[b]; dirty[b] = false }
    }

    /// Power is cut: the cache is gone except what it happened to write back; writes in flight
    /// are torn.
    mutating func powerLoss(rng: inout SplitMix64) {
        for b in 0..<blocks where dirty[b] {
            if rng.below(2) == 0 { durable[b] = cache[b] }
            dirty[b] = false
        }
        for (_, op) in inFlight {
            guard case .write(let payload, _) = op.kind else { continue }
            for i in 0..<op.count where rng.below(2) == 0 { durable[op.first + i] = payload.value(at: i) }
        }
        inFlight.removeAll()
        cache = durable
    }

    /// The process dies, the machine does not: writes in flight land in the cache, completions
    /// are lost.
    mutating func processCrash() {
        for (_, op) in inFlight {
            guard case .write(let payload, let fua) = op.kind else { continue }
            for i in 0..<op.count { put(op.first + i, payload.value(at: i), durably: fua) }
        }
        inFlight.removeAll()
    }

    /// Bit rot on one block (online verify is what finds it).
    mutating func corrupt(_ block: Int, value: UInt64) {
        cache[block] = value
        durable[block] = value
        dirty[block] = false
        corrupt[block] = true
    }
}
