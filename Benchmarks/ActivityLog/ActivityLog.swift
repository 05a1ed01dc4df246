import Benchmark
import TandemCore

/// The activity log's per-write bookkeeping on a 1 TiB device with the default geometry (4 MiB
/// extents, 1237 hot at most, 8 ring slots). A write to a hot extent is the steady state of a
/// working set under about 4.8 GiB; a write to a cold extent costs a transaction and an eviction.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal], scalingFactor: .kilo, maxDuration: .seconds(2))

    let hot = Shared<HotLog>()
    let cold = Shared<ColdLog>()

    Benchmark(
        "ActivityLog beginWrite + endWrite, 4 KiB on a hot extent",
        configuration: .init(setup: { hot.value = HotLog() })
    ) { benchmark in
        // Moved out of the box for the loop, so the log's arrays stay uniquely referenced.
        var h = hot.value.take()!
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let offset = h.offsets[h.cursor & (h.offsets.count - 1)]
            h.cursor &+= 1
            guard h.log.beginWrite(offset: offset, length: 4096) == .proceed else { fatalError("hot extent not hot") }
            blackHole(h.log.endWrite(offset: offset, length: 4096))
        }
        benchmark.stopMeasurement()
        hot.value = h
    }

    // The miss path, for scale: begin, the transaction that makes the extent hot (evicting the
    // least recently used one, whose bitmap pages would be written first), encode it into the
    // 4 KiB block the node writes, persist, end.
    Benchmark(
        "ActivityLog miss: beginWrite + evict + encode transaction + endWrite, 4 KiB on a cold extent",
        configuration: .init(setup: { cold.value = ColdLog() })
    ) { benchmark in
        var c = cold.value.take()!
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: ActivityLog.transactionBytes, alignment: 4096)
        defer { block.deallocate() }
        benchmark.startMeasurement()
        var evicted = 0
        for _ in benchmark.scaledIterations {
            let offset = c.offsets[c.cursor & (c.offsets.count - 1)]
            c.cursor &+= 1
            switch c.log.beginWrite(offset: offset, length: 4096) {
            case .proceed:
                break
            case .needTransaction(let tx):
                c.log.forEachEvicted(of: tx) { _ in evicted += 1 }
                c.log.encode(tx, into: block)
                guard c.log.transactionPersisted(tx) == nil else { fatalError("a second transaction") }
            case let decision:
                fatalError("cold write: \(decision)")
            }
            c.log.endWrite(offset: offset, length: 4096)
        }
        benchmark.stopMeasurement()
        blackHole(evicted)
        cold.value = c
    }
}

let deviceBytes: UInt64 = 1 << 40
let extentBytes = Limits.activityLogExtentBytesDefault

/// Holds state a setup hook builds for the benchmark closure.
final class Shared<Value>: @unchecked Sendable {
    var value: Value?
}

/// A log whose whole capacity is hot (random extents of the device, persisted, idle), and 64 Ki
/// random 4 KiB writes inside those extents.
struct HotLog {
    var log = ActivityLog(deviceBytes: deviceBytes, nextSequence: 1)
    var offsets: [UInt64] = []
    var cursor = 0

    init() {
        var random = SplitMix64(seed: 1)
        let extentCount = UInt64(log.extentCount)
        var hotExtents: Set<UInt64> = []
        while hotExtents.count < log.capacity { hotExtents.insert(random.next() % extentCount) }
        for extent in hotExtents {
            let offset = extent * UInt64(extentBytes)
            switch log.beginWrite(offset: offset, length: 4096) {
            case .needTransaction(let tx):
                var next: ActivityLog.Transaction? = tx
                while let t = next { next = log.transactionPersisted(t) }
            case let decision:
                fatalError("warming extent \(extent): \(decision)")
            }
            log.endWrite(offset: offset, length: 4096)
        }
        precondition(log.extentsInUse == log.capacity)
        let hotList = Array(hotExtents)
        let blocksPerExtent = UInt64(extentBytes / 4096)
        offsets = (0..<(1 << 16)).map { _ in
            hotList[Int(random.next() % UInt64(hotList.count))] * UInt64(extentBytes)
                + (random.next() % blocksPerExtent) * 4096
        }
        log.checkInvariants()
    }
}

/// A full log (every slot used, so each miss evicts) and 64 Ki random 4 KiB writes anywhere on
/// the device: with 1237 of 262144 extents hot, almost all of them miss.
struct ColdLog {
    var log = ActivityLog(deviceBytes: deviceBytes, nextSequence: 1)
    var offsets: [UInt64] = []
    var cursor = 0

    init() {
        var random = SplitMix64(seed: 2)
        let blocks = deviceBytes / 4096
        for extent in 0..<log.capacity {
            let offset = UInt64(extent) * UInt64(extentBytes)
            guard case .needTransaction(let tx) = log.beginWrite(offset: offset, length: 4096) else { fatalError("fill") }
            _ = log.transactionPersisted(tx)
            log.endWrite(offset: offset, length: 4096)
        }
        offsets = (0..<(1 << 16)).map { _ in (random.next() % blocks) * 4096 }
    }
}

/// Steele, Lea and Flood's SplitMix64: a fixed sequence, so every run makes the same writes.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE5_E4B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
