import Benchmark
import TandemCore

/// The out-of-sync bitmap of a 1 TiB device at 4 KiB granularity (2^28 bits, 32 MiB of words):
/// marking writes while the peer is away, and walking the set bits as a resync does.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal], maxDuration: .seconds(3))

    // Built in the setup hooks, not here: this closure runs in the process of every benchmark of
    // the target, and a 1 TiB bitmap takes 32 MiB and a moment to fill.
    let marking = Shared<Marking>()
    let scattered = Shared<DirtyBitmap>()
    let clustered = Shared<DirtyBitmap>()

    Benchmark(
        "DirtyBitmap.setRange 4 KiB at random offsets, 1 TiB",
        configuration: .init(scalingFactor: .kilo, setup: { marking.value = Marking() })
    ) { benchmark in
        // Moved out of the box for the loop: the bitmap's arrays stay uniquely referenced (no
        // copy on write) and the loop pays no exclusivity checks on the box.
        var m = marking.value.take()!
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(m.bitmap.setRange(offset: m.offsets[m.cursor & (m.offsets.count - 1)], length: 4096))
            m.cursor &+= 1
        }
        benchmark.stopMeasurement()
        marking.value = m
    }

    // A resync walks the bitmap with `firstRun` (one resync request per run, at most 32 MiB).
    let maxBits = PeerProtocol.dataPayloadBytesMax / bitmapGranularity
    Benchmark(
        "DirtyBitmap full scan, firstRun, 1 TiB with 1% set (scattered bits)",
        configuration: .init(setup: { scattered.value = scatteredBitmap() })
    ) { benchmark in
        let bitmap = scattered.value!
        benchmark.startMeasurement()
        blackHole(scanRuns(bitmap, maxBits: maxBits))
        benchmark.stopMeasurement()
    }

    Benchmark(
        "DirtyBitmap full scan, nextSetBit, 1 TiB with 1% set (scattered bits)",
        configuration: .init(setup: { scattered.value = scatteredBitmap() })
    ) { benchmark in
        let bitmap = scattered.value!
        benchmark.startMeasurement()
        var from = 0
        var found: UInt64 = 0
        while let bit = bitmap.nextSetBit(from: from) {
            found += 1
            from = bit + 1
        }
        guard found == bitmap.setBitCount else { fatalError("scan found \(found) of \(bitmap.setBitCount) bits") }
        benchmark.stopMeasurement()
    }

    Benchmark(
        "DirtyBitmap full scan, firstRun, 1 TiB with 1% set (1 MiB runs)",
        configuration: .init(setup: { clustered.value = clusteredBitmap() })
    ) { benchmark in
        let bitmap = clustered.value!
        benchmark.startMeasurement()
        blackHole(scanRuns(bitmap, maxBits: maxBits))
        benchmark.stopMeasurement()
    }
}

let deviceBytes: UInt64 = 1 << 40
let bitmapGranularity = 4096

/// Holds state a setup hook builds for the benchmark closure (the hooks and the closure run one
/// after the other on the runner's thread).
final class Shared<Value>: @unchecked Sendable {
    var value: Value?
}

/// State of the marking benchmark, kept across its iterations.
struct Marking {
    var bitmap = DirtyBitmap(deviceBytes: deviceBytes, granularityBytes: bitmapGranularity)
    /// 64 Ki random 4 KiB-aligned offsets (a power of two, so the index is a mask).
    var offsets: [UInt64]
    var cursor = 0

    init() {
        var random = SplitMix64(seed: 1)
        let blocks = deviceBytes / 4096
        offsets = (0..<(1 << 16)).map { _ in (random.next() % blocks) * 4096 }
    }
}

/// Walks every run of set bits as a resync would; returns how many runs. Checks that the runs
/// cover exactly the set bits.
func scanRuns(_ bitmap: DirtyBitmap, maxBits: Int) -> Int {
    var from = 0
    var runs = 0
    var bits = 0
    while let run = bitmap.firstRun(from: from, maxBits: maxBits) {
        runs += 1
        bits += run.count
        from = run.upperBound
    }
    guard bits == bitmap.setBitCount else { fatalError("scan found \(bits) of \(bitmap.setBitCount) bits") }
    return runs
}

/// 1% of the bits, each set at a random place (collisions make it slightly fewer): the worst case
/// for a scan, about one run per 100 bits.
func scatteredBitmap() -> DirtyBitmap {
    var bitmap = DirtyBitmap(deviceBytes: deviceBytes, granularityBytes: bitmapGranularity)
    var random = SplitMix64(seed: 2)
    let target = bitmap.bitCount / 100
    for _ in 0..<target { bitmap.setBit(Int(random.next() % UInt64(bitmap.bitCount))) }
    return bitmap
}

/// 1% of the bits as runs of 256 (1 MiB of device each) at random places: writes that are
/// larger or sequential.
func clusteredBitmap() -> DirtyBitmap {
    var bitmap = DirtyBitmap(deviceBytes: deviceBytes, granularityBytes: bitmapGranularity)
    var random = SplitMix64(seed: 3)
    let runBits = 256
    let runs = bitmap.bitCount / 100 / runBits
    for _ in 0..<runs {
        let start = Int(random.next() % UInt64(bitmap.bitCount / runBits)) * runBits
        bitmap.setBits(start..<(start + runBits))
    }
    return bitmap
}

/// Steele, Lea and Flood's SplitMix64: a fixed sequence, so every run marks the same offsets.
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
