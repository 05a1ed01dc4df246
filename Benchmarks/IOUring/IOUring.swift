import Benchmark
import CTandem
import TandemIO

/// The ring's own cost, with no disk or socket behind it: `UringEngine` no-ops submitted and
/// reaped the way the event loop does (queue, then one `wait` that enters the kernel and copies
/// completions into caller memory). One at a time is the floor of a QD1 request's engine cost;
/// a batch of 32 shows what batching saves per operation. Nothing here may allocate.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal], scalingFactor: .kilo, maxDuration: .seconds(2))

    Benchmark("io_uring nop: submit + complete, one at a time") { benchmark in
        // Made here, on the thread that submits: the ring may be single-issuer.
        let engine = makeEngine()
        let out = UnsafeMutableBufferPointer<ctandem_cqe>.allocate(capacity: 64)
        defer { out.deallocate() }
        benchmark.startMeasurement()
        for i in benchmark.scaledIterations {
            engine.nop(userData: UInt64(i))
            let n = engine.wait(into: out, timeoutNanos: nil)
            precondition(n == 1 && out[0].res == 0, "nop completed with \(out[0].res)")
        }
        benchmark.stopMeasurement()
    }

    // One operation of this benchmark is one no-op: the loop submits 32 and reaps 32 at a time.
    Benchmark("io_uring nop: submit + complete, batches of 32 (per nop)") { benchmark in
        let engine = makeEngine()
        let out = UnsafeMutableBufferPointer<ctandem_cqe>.allocate(capacity: 64)
        defer { out.deallocate() }
        let iterations = benchmark.scaledIterations
        benchmark.startMeasurement()
        for first in stride(from: iterations.lowerBound, to: iterations.upperBound, by: 32) {
            let batch = min(32, iterations.upperBound - first)
            for i in 0..<batch { engine.nop(userData: UInt64(first + i)) }
            var reaped = 0
            while reaped < batch { reaped += engine.wait(into: out, timeoutNanos: nil) }
        }
        benchmark.stopMeasurement()
    }
}

func makeEngine() -> UringEngine {
    do {
        return try UringEngine(reason: "benchmark", entries: 64)
    } catch {
        fatalError("io_uring is unavailable here: \(error)")
    }
}
