import CTandem
import Glibc
import Synchronization
import TandemCore

/// Decides whether the loop polls its ring for a short while before it sleeps.
///
/// A sleeping loop is woken by another CPU, and on a virtual machine that cross-CPU wake-up costs
/// tens of µs: at queue depth 1 it was the largest part of a 4 KiB write's round trip (tandem-page
/// p50 50-100 µs sleeping, 26-73 µs polling 50 µs first, in the same runs). Polling costs CPU, so
/// it adapts, as a hybrid of Linux's block-layer polling and an adaptive mutex:
/// - a poll that ends with a completion (a hit) keeps polling on;
/// - a poll that runs out of budget (a miss) sleeps through the next 1, 2, 4 .. 64 waits, doubling
///   on each miss in a row;
/// - a sleep that ended within the budget (polling would have caught it) polls again at once;
/// - a poll during which the scheduler preempted the thread backs off as a miss, hit or not:
///   another thread wanted the CPU, and with as many busy threads as cores (both nodes and the
///   client on two cores) polling takes CPU from the work it waits for (1 MiB replicated writes
///   lost 20% to 200 µs polls before this rule).
/// - a poll gives its CPU away (`sched_yield`) every `yieldNanos`, so a thread that waits for that
///   CPU runs then, not after the budget: often it is the very work the poll waits for (the peer
///   node, or the client). The scheduler rarely preempted a poll by itself (29% of a primary's
///   samples were polls in a replicated 4 KiB QD32 run). A yield that switched counts as a
///   preemption. Alternating runs on two cores: replicated 4 KiB random writes QD32 113 → 121
///   MiB/s median, replicated QD1 p50 232 → 162 µs.
/// - a wait does not poll at all while every CPU has an event loop with connections
///   (`BusyLoops`): then a poll can only take its CPU from another loop or from a client on the
///   same machine. Four clients on two cores, alternating runs, in a busy phase of the machine:
///   4 KiB write p50 at QD1 92-104 µs polling, 58-73 not (nbdkit 77-90); 4 KiB random reads
///   QD32 134-186k IOPS polling, 186-219k not. In a quiet phase it was within noise (p50 37-48
///   against 33-47), except O_DIRECT 4 KiB random writes QD32: 105-124k → 119-138k.
/// An idle loop so polls once per 64 wake-ups at most, and a loop whose completions come in
/// bursts polls only while they do. The struct is bookkeeping (tested alone); `pollFirst` and
/// `timeSleep` below read the clock and the preemption count for both engines.
public struct PollPolicy: Sendable {
    /// Nanoseconds one poll may last; 0 turns polling off.
    public let budgetNanos: UInt64
    /// Waits left to sleep through without polling.
    public private(set) var sleepsLeft = 0
    /// How many waits the next miss sleeps through.
    private var nextBackoff = 1
    public private(set) var stats = PollStats()

    /// The loops of the server this one belongs to, when it runs several: no poll while they
    /// keep every CPU.
    public let busy: BusyLoops?

    public static let backoffMax = 64
    /// How often a poll yields its CPU (see above).
    public static let yieldNanos: UInt64 = 8_000

    public init(budgetNanos: UInt64, busy: BusyLoops? = nil) {
        self.budgetNanos = budgetNanos
        self.busy = busy
    }

    public var enabled: Bool { budgetNanos > 0 }

    /// Whether the coming wait polls first. Counts down a backoff.
    public mutating func shouldPoll() -> Bool {
        guard enabled else { return false }
        if sleepsLeft > 0 {
            sleepsLeft -= 1
            return false
        }
        return true
    }

    /// A poll ended: with a completion after `nanos`, or (`hit == false`) when `nanos`, the
    /// budget or less when a timer was due sooner, ran out. `preempted`: the thread lost the
    /// CPU to another while it polled.
    public mutating func polled(hit: Bool, nanos: UInt64, preempted: Bool = false) {
        stats.pollNanos &+= nanos
        if hit { stats.hits &+= 1 } else { stats.misses &+= 1 }
        if preempted { stats.preempted &+= 1 }
        if hit && !preempted {
            nextBackoff = 1
        } else {
            sleepsLeft = nextBackoff
            nextBackoff = min(nextBackoff * 2, Self.backoffMax)
        }
    }

    /// A wait that did not poll slept `nanos` before its completion came.
    public mutating func slept(nanos: UInt64) {
        if nanos <= budgetNanos {
            sleepsLeft = 0
            nextBackoff = 1
        }
    }
}

/// What polling did and cost, for metrics.
public struct PollStats: Sendable, Equatable {
    public var hits: UInt64 = 0
    public var misses: UInt64 = 0
    /// Polls (hits or misses) during which the thread was preempted.
    public var preempted: UInt64 = 0
    /// Time spent polling, hits and misses.
    public var pollNanos: UInt64 = 0
    /// Waits that did not poll because every CPU had a busy loop (`BusyLoops`).
    public var skipped: UInt64 = 0

    public init() {}
}

/// How an engine's wait uses the policy: the clock and the preemption count are read here, so
/// both engines book polls and sleeps the same way.
extension PollPolicy {
    /// Before a wait sleeps: when the policy says so, polls for at most the budget (or less when
    /// the timeout is shorter) in slices of `yieldNanos`: `attempt(slice)` polls for at most
    /// `slice` nanoseconds and says whether a completion came, and between slices the thread
    /// yields its CPU; not at all while `busy` says every CPU has a loop. Returns whether one
    /// came, and the timeout left for the sleep.
    mutating func pollFirst(timeoutNanos: UInt64?, _ attempt: (UInt64) -> Bool) -> (hit: Bool, timeoutNanos: UInt64?) {
        guard timeoutNanos != 0, enabled else { return (false, timeoutNanos) }
        if let busy, busy.everyCPUHasOne {
            stats.skipped &+= 1
            return (false, timeoutNanos)
        }
        guard shouldPoll() else { return (false, timeoutNanos) }
        let budget = min(budgetNanos, timeoutNanos ?? .max)
        let preemptions = ctandem_thread_preemptions()
        let start = monotonicNanos()
        var hit = false
        var elapsed: UInt64 = 0
        // Bounded: every slice ends within yieldNanos, and the clock is read after each.
        while true {
            hit = attempt(min(Self.yieldNanos, budget - elapsed))
            elapsed = monotonicNanos() &- start
            if hit || elapsed >= budget { break }
            sched_yield()
        }
        let spent = hit ? elapsed : budget
        polled(hit: hit, nanos: spent, preempted: ctandem_thread_preemptions() != preemptions)
        return (hit, timeoutNanos.map { $0 > spent ? $0 - spent : 0 })
    }

    /// A sleep of a wait that did not poll: `sleep()` sleeps and says whether a completion came;
    /// one that came within the budget makes the next wait poll.
    mutating func timeSleep(timeoutNanos: UInt64?, _ sleep: () -> Bool) {
        guard enabled && timeoutNanos != 0 else { _ = sleep(); return }
        let start = monotonicNanos()
        if sleep() { slept(nanos: monotonicNanos() &- start) }
    }
}

/// How many of one server's event loops have connections, kept by the loops' threads together
/// (`tandem serve --loops`). While every CPU has such a loop, the loops' waits do not poll
/// (`PollPolicy`), and a loop copies its cached reads itself (`NBDServer.everyCPUHasABusyLoop`).
public final class BusyLoops: Sendable {
    private let count = Atomic<Int>(0)
    /// CPUs online, at least one.
    public let cpus: Int

    public init(cpus: Int) {
        self.cpus = max(1, cpus)
    }

    /// A loop got its first connection (+1) or lost its last (-1).
    public func add(_ delta: Int) {
        count.add(delta, ordering: .relaxed)
    }

    public var value: Int { count.load(ordering: .relaxed) }

    public var everyCPUHasOne: Bool { value >= cpus }
}
