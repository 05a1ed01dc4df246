// swift-tools-version:6.0
import PackageDescription

// Targets that import the C shim see only its public header, which keeps liburing.h, libaio.h and
// OpenSSL out of Swift's module map (liburing.h redefines _GNU_SOURCE and clashes with SwiftGlibc).
let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]
// The I/O path's targets: release builds leave out the run-time exclusivity checks (3% of a
// node's time at 4 KiB writes, in swift_beginAccess); debug builds and tests keep them.
let hot: [SwiftSetting] = strict + [
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

let package = Package(
    name: "Tandem",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "tandem", targets: ["tandem"]),
        .library(name: "TandemCore", targets: ["TandemCore"]),
        .library(name: "TandemNBD", targets: ["TandemNBD"]),
        // For Benchmarks/ (io_uring, TLS records): the engines and the C shim they run on.
        .library(name: "TandemIO", targets: ["TandemIO", "CTandem"]),
        .library(name: "TandemSim", targets: ["TandemSim"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // 1.11: LogHandler.log(event:), which the JSON log handler implements.
        .package(url: "https://github.com/apple/swift-log", from: "1.11.0"),
    ],
    targets: [
        .target(
            name: "CTandem",
            cSettings: [.unsafeFlags(["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])],
            linkerSettings: [
                .linkedLibrary("uring"), .linkedLibrary("aio"),
                .linkedLibrary("ssl"), .linkedLibrary("crypto"),
            ]
        ),
        // CRC-32C with the CPU's instruction: pure computation, so the sans-I/O core may use it.
        .target(name: "CTandemCRC", cSettings: [.unsafeFlags(["-O2"])]),
        // Sans-I/O: no Glibc, no clock, no threads.
        .target(name: "TandemCore", dependencies: ["CTandemCRC"], swiftSettings: hot),
        .target(name: "TandemNBD", dependencies: ["TandemCore"], swiftSettings: hot),
        // The deterministic simulator: ReplicaCore on simulated disks, network and clock.
        .target(name: "TandemSim", dependencies: ["TandemCore"], swiftSettings: strict),
        .target(
            name: "TandemIO",
            dependencies: ["CTandem", "TandemCore", .product(name: "Logging", package: "swift-log")],
            swiftSettings: hot
        ),
        .target(
            name: "TandemNode",
            dependencies: [
                "CTandem", "TandemCore", "TandemNBD", "TandemIO",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: hot
        ),
        .executableTarget(
            name: "tandem",
            dependencies: [
                "CTandem", "TandemCore", "TandemNBD", "TandemIO", "TandemNode", "TandemSim",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        .testTarget(name: "TandemCoreTests", dependencies: ["TandemCore"], swiftSettings: strict),
        .testTarget(name: "TandemSimTests", dependencies: ["TandemSim", "TandemCore"], swiftSettings: strict),
        .testTarget(name: "TandemNBDTests", dependencies: ["TandemNBD", "TandemCore"], swiftSettings: strict),
        .testTarget(
            name: "TandemNodeTests",
            dependencies: ["TandemNode", "TandemIO", "TandemCore", "CTandem", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict
        ),
        .testTarget(
            name: "TandemIOTests",
            dependencies: ["TandemIO", "CTandem", "TandemCore"],
            swiftSettings: strict
        ),
    ],
    swiftLanguageModes: [.v6]
)
