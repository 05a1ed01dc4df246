import Benchmark
import TandemCore

/// CRC-32C (the SSE 4.2 instruction where present, else table-driven slicing-by-8) over a 4 KiB
/// block and a 1 MiB payload: every data frame on the peer link pays it once on each side. GB/s =
/// bytes / wall clock per iteration (README.md).
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal], maxDuration: .seconds(2))

    for (label, bytes, scaling) in [("4 KiB", 4096, BenchmarkScalingFactor.kilo), ("1 MiB", 1 << 20, .one)] {
        Benchmark("CRC32C.checksum \(label)", configuration: .init(scalingFactor: scaling)) { benchmark in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 4096)
            defer { buffer.deallocate() }
            for i in 0..<bytes { buffer[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
            let data = UnsafeRawBufferPointer(buffer)
            benchmark.startMeasurement()
            var seed: UInt32 = 0
            for _ in benchmark.scaledIterations {
                // Chained through the seed so no two iterations are the same computation.
                seed = CRC32C.checksum(data, seed: seed)
            }
            benchmark.stopMeasurement()
            blackHole(seed)
        }
    }
}
