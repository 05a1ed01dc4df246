import Testing
@testable import TandemIO

/// `PollPolicy`'s bookkeeping: when a wait polls, how misses back off, what a short sleep resets.
@Suite struct PollPolicyTests {
    @Test func aZeroBudgetNeverPolls() {
        var policy = PollPolicy(budgetNanos: 0)
        #expect(!policy.enabled)
        for _ in 0..<3 {
            let polls = policy.shouldPoll()
            #expect(!polls)
        }
        #expect(policy.stats == PollStats())
    }

    @Test func hitsKeepPollingAndAreCounted() {
        var policy = PollPolicy(budgetNanos: 50_000)
        for i in 0..<100 {
            let polls = policy.shouldPoll()
            #expect(polls, "wait \(i)")
            policy.polled(hit: true, nanos: 10_000)
        }
        #expect(policy.stats.hits == 100)
        #expect(policy.stats.misses == 0)
        #expect(policy.stats.pollNanos == 1_000_000)
    }

    /// Sleeps through 1, 2, 4 .. waits after misses in a row, capped at `backoffMax`.
    @Test func missesInARowBackOffExponentiallyUpToTheCap() {
        var policy = PollPolicy(budgetNanos: 50_000)
        var skipped: [Int] = []
        for _ in 0..<9 {
            let polls = policy.shouldPoll()
            #expect(polls)
            policy.polled(hit: false, nanos: 50_000)
            var n = 0
            while !policy.shouldPoll() {
                n += 1
                policy.slept(nanos: 1_000_000)  // long sleeps: polling would not have helped
                precondition(n <= 1000)
            }
            skipped.append(n)
            // shouldPoll() said yes: that wait polls and misses again at the top of the loop.
        }
        #expect(skipped == [1, 2, 4, 8, 16, 32, 64, 64, 64])
        #expect(policy.stats.misses == 9)
        #expect(policy.stats.pollNanos == 9 * 50_000)
    }

    @Test func aHitEndsTheBackoff() {
        var policy = PollPolicy(budgetNanos: 50_000)
        for _ in 0..<3 {
            let polls = policy.shouldPoll()
            #expect(polls)
            policy.polled(hit: false, nanos: 50_000)
            while !policy.shouldPoll() { policy.slept(nanos: 1_000_000) }
        }
        policy.polled(hit: true, nanos: 5_000)
        #expect(policy.sleepsLeft == 0)
        policy.polled(hit: false, nanos: 50_000)
        #expect(policy.sleepsLeft == 1, "the backoff starts again at one wait")
    }

    /// A wait that slept but got its completion within the budget shows polling would have
    /// caught it: the next wait polls at once, and the next miss backs off by one again.
    @Test func aShortSleepPollsAgainAtOnce() {
        var policy = PollPolicy(budgetNanos: 50_000)
        // Four misses in a row, each after sleeping through the backoff of the one before.
        for _ in 0..<4 {
            while !policy.shouldPoll() { policy.slept(nanos: 1_000_000) }
            policy.polled(hit: false, nanos: 50_000)
        }
        #expect(policy.sleepsLeft == 8)
        var polls = policy.shouldPoll()
        #expect(!polls)
        policy.slept(nanos: 60_000)
        #expect(policy.sleepsLeft == 7, "a sleep longer than the budget changes nothing")
        polls = policy.shouldPoll()
        #expect(!polls)
        policy.slept(nanos: 20_000)
        #expect(policy.sleepsLeft == 0)
        polls = policy.shouldPoll()
        #expect(polls)
        policy.polled(hit: false, nanos: 50_000)
        #expect(policy.sleepsLeft == 1)
    }

    /// A poll during which another thread took the CPU backs off as a miss would, even when it
    /// found its completion, and is counted as both.
    @Test func aPreemptedPollBacksOffEvenWhenItHits() {
        var policy = PollPolicy(budgetNanos: 50_000)
        var polls = policy.shouldPoll()
        #expect(polls)
        policy.polled(hit: true, nanos: 20_000, preempted: true)
        #expect(policy.sleepsLeft == 1)
        #expect(policy.stats.hits == 1 && policy.stats.preempted == 1 && policy.stats.misses == 0)
        polls = policy.shouldPoll()
        #expect(!polls)
        polls = policy.shouldPoll()
        #expect(polls)
        policy.polled(hit: true, nanos: 20_000, preempted: true)
        #expect(policy.sleepsLeft == 2, "preemptions in a row back off like misses in a row")
        while !policy.shouldPoll() { policy.slept(nanos: 1_000_000) }
        policy.polled(hit: true, nanos: 20_000)
        #expect(policy.sleepsLeft == 0)
        #expect(policy.stats.hits == 3 && policy.stats.preempted == 2)
    }

    /// With every CPU taken by a busy loop a wait neither polls nor spends its backoff; the
    /// backoff it had is still there once a CPU is spare.
    @Test func everyCPUBusySkipsPollingWithoutTouchingTheBackoff() {
        let busy = BusyLoops(cpus: 2)
        var policy = PollPolicy(budgetNanos: 50_000, busy: busy)
        policy.polled(hit: false, nanos: 50_000)
        #expect(policy.sleepsLeft == 1)
        busy.add(1)
        #expect(!busy.everyCPUHasOne)
        busy.add(1)
        #expect(busy.everyCPUHasOne && busy.value == 2)
        var attempts = 0
        for _ in 0..<3 {
            let (hit, timeout) = policy.pollFirst(timeoutNanos: 1_000_000) { _ in attempts += 1; return true }
            #expect(!hit && timeout == 1_000_000)
        }
        #expect(attempts == 0)
        #expect(policy.stats.skipped == 3)
        #expect(policy.sleepsLeft == 1, "skipped waits do not count down the backoff")
        busy.add(-1)
        _ = policy.pollFirst(timeoutNanos: 1_000_000) { _ in attempts += 1; return true }
        #expect(attempts == 0, "the backoff's one wait without polling")
        let (hit, _) = policy.pollFirst(timeoutNanos: 1_000_000) { _ in attempts += 1; return true }
        #expect(hit && attempts == 1)
        #expect(BusyLoops(cpus: 0).cpus == 1)
    }
}
