// swift-tools-version:6.1
import PackageDescription

// Micro-benchmarks (ordo-one/benchmark), kept in their own package so that `swift build` and
// CI of the main package do not build the benchmark harness. Run from this directory:
// `swift package benchmark` (README.md). Throughput against other NBD servers is `tools/bench`.
//
// Only the "MallocInterposer" trait of benchmark: it gives the malloc counts every benchmark
// here checks. Its other default trait, "RuntimeInterposer" (ARC counters on Swift 6.3 Linux),
// needs a package this machine's mirror does not have, and no benchmark here reads ARC metrics.

// A path dependency's package identity is its folder's name ("main" in /work/main, something
// else in another clone), so the products are looked up under whatever the parent is called.
let tandem = String(Context.packageDirectory.split(separator: "/").dropLast().last ?? "main")

let package = Package(
    name: "TandemBenchmarks",
    platforms: [.macOS(.v13)],
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.0", traits: ["MallocInterposer"]),
    ],
    targets: [
        // The plugin runs the executable targets whose folder sits directly in a folder named
        // "Benchmarks", which this package's root is.
        benchmarkTarget("NBDCodec", ["TandemNBD", "TandemCore"]),
        benchmarkTarget("PeerCodec", ["TandemCore"]),
        benchmarkTarget("CRC32C", ["TandemCore"]),
        benchmarkTarget("DirtyBitmap", ["TandemCore"]),
        benchmarkTarget("ActivityLog", ["TandemCore"]),
        benchmarkTarget("IOUring", ["TandemIO"]),
        benchmarkTarget("TLSRecord", ["TandemIO"]),
    ]
)

func benchmarkTarget(_ name: String, _ products: [String]) -> Target {
    .executableTarget(
        name: name,
        dependencies: [.product(name: "Benchmark", package: "benchmark")]
            + products.map { .product(name: $0, package: tandem) },
        path: name,
        plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
    )
}
