import ArgumentParser
import Glibc
import TandemSim

/// `tandem sim`: the deterministic simulator (ReplicaCore on simulated disks and network).
struct Sim: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the deterministic simulation of the replication core, from seeds.",
        discussion: """
            Every run derives from one 64-bit seed: the same seed replays the same run exactly.

            Examples:
              tandem sim --seeds 10000              # seeds 1 ... 10000, seeds per second at the end
              tandem sim --seeds 100000 --start 7000000
              tandem sim --seed 4242 --verbose       # replay one seed, printing every event
              tandem sim --seeds 1000 --failover     # also fail over (crash the primary, promote the peer)
              tandem sim --seeds 1000 --switchover   # also demote the primary and promote the secondary under load
              tandem sim --seeds 1000 --witness      # a witness: no two nodes may acknowledge writes apart
              tandem sim --seeds 1000 --barriers     # barriers under load, rollbacks: exactly the barrier's image
            """)

    @Option(help: "Run this one seed.")
    var seed: UInt64?

    @Option(help: "Run this many seeds.")
    var seeds: Int?

    @Option(help: "The first seed of --seeds.")
    var start: UInt64 = 1

    @Flag(help: "Print every event of the run (with --seed).")
    var verbose = false

    @Flag(help: "After a primary crash, promote the survivor (the old primary returns as secondary).")
    var failover = false

    @Flag(help: "Let the client send writes overlapping writes still in flight.")
    var overlappingWrites = false

    @Flag(help: "Let the primary's disk fail too (one disk at a time; a detached disk is resynced after a restart).")
    var primaryDiskErrors = false

    @Flag(help: "Crash a node while the other is down or has not noticed an earlier crash.")
    var doubleFaults = false

    @Flag(help: "Switch over during load: the primary demotes (drained, both sides flushed), the secondary is promoted.")
    var switchover = false

    @Flag(help: "Add a witness: quorum, fencing, automatic failover; nodes are cut off, the witness restarts.")
    var witness = false

    @Flag(help: "Create point-in-time barriers under load (undo stores, copy-on-write) and roll the secondary back to them.")
    var barriers = false

    @Option(help: "Stop after this many failing seeds (0: never).")
    var maxFailures: Int = 10

    func validate() throws {
        guard (seed == nil) != (seeds == nil) else { throw ValidationError("give either --seed N or --seeds COUNT") }
        if let seeds, seeds < 1 { throw ValidationError("--seeds must be at least 1") }
        if verbose && seed == nil { throw ValidationError("--verbose replays one seed: use it with --seed") }
        guard maxFailures >= 0 else { throw ValidationError("--max-failures must be 0 or more") }
    }

    func run() throws {
        SimCrashReporter.install()
        let options = SimOptions(failover: failover, overlappingClientWrites: overlappingWrites, primaryDiskErrors: primaryDiskErrors, doubleFaults: doubleFaults,
                                 switchover: switchover, witness: witness, barriers: barriers, verbose: verbose)
        if let seed {
            print("seed \(seed)")
            let report = Simulator.run(seed: seed, options: options)
            if let failure = report.failure {
                print(failure)
                throw fail("seed \(seed) broke an invariant: \(failure.message)")
            }
            let counts = report.counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            print("seed \(seed): ok, \(report.events) events, \(report.clientOps) client requests, \(Double(report.simNanos) / 1e9) s simulated")
            print("  \(counts)")
            return
        }
        let total = seeds!
        print("seeds \(start) ... \(start &+ UInt64(total - 1))")
        var failed: [UInt64] = []
        var events = 0
        let began = monotonicSeconds()
        var ran = 0
        for k in 0..<total {
            let s = start &+ UInt64(k)
            let report = Simulator.run(seed: s, options: options)
            ran += 1
            events += report.events
            if let failure = report.failure {
                failed.append(s)
                print(failure)
                if maxFailures > 0 && failed.count >= maxFailures { break }
            }
            if (k + 1) % 1000 == 0 {
                print("\(k + 1) seeds, \(failed.count) failed, \(Int(Double(k + 1) / (monotonicSeconds() - began))) seeds/s")
            }
        }
        let elapsed = monotonicSeconds() - began
        print("\(ran) seeds in \(Double(Int(elapsed * 10)) / 10) s: \(Int(Double(ran) / elapsed)) seeds/s, \(Int(Double(events) / elapsed)) events/s; \(failed.count) failed")
        if !failed.isEmpty {
            throw fail("\(failed.count) seeds broke an invariant: \(failed.map(String.init).joined(separator: " "))")
        }
    }

    private func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
