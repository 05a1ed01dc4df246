import CTandem
import Glibc
import Logging
import TandemCore

/// Receives the results of the operations it started. `tag` is the handler's own word (a request
/// slot, or a constant for its socket operations); `result` is bytes or -errno.
public protocol IOHandler: AnyObject {
    func ioCompleted(tag: UInt32, result: Int32)
    /// Called once after the batch of completions in which the handler asked for it with
    /// `IOLoop.callAtBatchEnd`: the place to gather many replies into one send.
    func ioBatchEnded()
}

public extension IOHandler {
    func ioBatchEnded() {}
}

/// One thread's event loop: an engine, the table of handlers that own in-flight operations, and
/// timers. `userData` on the wire is `handler id << 32 | tag`: an index, never a retained closure,
/// so starting an operation allocates nothing. All completions of a batch are reaped before any
/// handler runs (bounded stack, no recursion).
public final class IOLoop {
    public let engine: any IOEngine
    public let pool: BufferPool
    public let logger: Logger
    private var handlers: [(any IOHandler)?] = []
    private var freeIDs: [UInt32] = []
    private var timers: [(deadline: UInt64, id: UInt32, tag: UInt32)] = []
    private var dueTimers: [(UInt32, UInt32)] = []
    private let completions: UnsafeMutableBufferPointer<ctandem_cqe>
    private var stopRequested = false
    private var batchEndIDs: [UInt32] = []
    private var batchEndScratch: [UInt32] = []
    private var batchEndRequested: [Bool] = []

    public init(engine: any IOEngine, pool: BufferPool, logger: Logger) {
        self.engine = engine
        self.pool = pool
        self.logger = logger
        completions = .allocate(capacity: Limits.completionBatchMax)
        if engine.registerBuffers(pool.registrationIOVecs()) { pool.markRegistered() }
        timers.reserveCapacity(Limits.timersMax)
        dueTimers.reserveCapacity(Limits.timersMax)
    }

    deinit { completions.deallocate() }

    // MARK: Handlers

    /// Registers a handler and returns its id, the high half of its operations' user data.
    public func register(_ handler: any IOHandler) -> UInt32 {
        if let id = freeIDs.popLast() {
            handlers[Int(id)] = handler
            return id
        }
        handlers.append(handler)
        batchEndRequested.append(false)
        batchEndIDs.reserveCapacity(handlers.count)
        batchEndScratch.reserveCapacity(handlers.count)
        return UInt32(handlers.count - 1)
    }

    /// Forgets a handler. It must have no operation in flight and no timer.
    public func unregister(_ id: UInt32) {
        precondition(handlers[Int(id)] != nil, "unregister of a free handler id")
        handlers[Int(id)] = nil
        timers.removeAll { $0.id == id }
        batchEndRequested[Int(id)] = false
        batchEndIDs.removeAll { $0 == id }
        freeIDs.append(id)
    }

    @inline(__always)
    public static func userData(_ id: UInt32, _ tag: UInt32) -> UInt64 { UInt64(id) << 32 | UInt64(tag) }

    /// Asks for `ioBatchEnded()` on handler `id` after the current batch of completions.
    public func callAtBatchEnd(_ id: UInt32) {
        if batchEndRequested[Int(id)] { return }
        batchEndRequested[Int(id)] = true
        batchEndIDs.append(id)
    }

    // MARK: Timers

    /// Calls `ioCompleted(tag:result: -ETIME)` on handler `id` after `nanos`.
    public func addTimer(id: UInt32, tag: UInt32, afterNanos nanos: UInt64) {
        precondition(timers.count < Limits.timersMax, "timer table over its bound")
        timers.append((monotonicNanos() &+ nanos, id, tag))
    }

    public func cancelTimers(id: UInt32, tag: UInt32) {
        timers.removeAll { $0.id == id && $0.tag == tag }
    }

    // MARK: Running

    public func stop() { stopRequested = true }

    /// Runs until `stop()`.
    public func run() {
        while !stopRequested { runOnce(timeoutNanos: nil) }
    }

    /// One iteration: submit, wait (at most until the next timer or `timeoutNanos`), dispatch.
    public func runOnce(timeoutNanos: UInt64?) {
        var timeout = timeoutNanos
        // Batch-end calls left over from the last iteration (asked for again in its last round)
        // run after this wait, and what they send may be what the peers wait for: no sleeping.
        if !batchEndIDs.isEmpty { timeout = 0 }
        if let next = timers.lazy.map(\.deadline).min() {
            let now = monotonicNanos()
            let untilNext = next > now ? next - now : 0
            timeout = min(timeout ?? untilNext, untilNext)
        }
        let n = engine.wait(into: completions, timeoutNanos: timeout)
        for i in 0..<n {
            let c = completions[i]
            let id = Int(c.user_data >> 32)
            guard id < handlers.count, let handler = handlers[id] else {
                preconditionFailure("completion for unknown handler \(id) (tag \(UInt32(truncatingIfNeeded: c.user_data)))")
            }
            handler.ioCompleted(tag: UInt32(truncatingIfNeeded: c.user_data), result: c.res)
        }
        fireTimers()
        // Handlers called here may ask again; those run in the next round of this loop.
        var rounds = 0
        while !batchEndIDs.isEmpty && rounds < 4 {
            rounds += 1
            swap(&batchEndIDs, &batchEndScratch)
            for id in batchEndScratch {
                batchEndRequested[Int(id)] = false
                handlers[Int(id)]?.ioBatchEnded()
            }
            batchEndScratch.removeAll(keepingCapacity: true)
        }
    }

    private func fireTimers() {
        guard !timers.isEmpty else { return }
        let now = monotonicNanos()
        guard timers.contains(where: { $0.deadline <= now }) else { return }
        dueTimers.removeAll(keepingCapacity: true)
        timers.removeAll { timer in
            if timer.deadline <= now {
                dueTimers.append((timer.id, timer.tag))
                return true
            }
            return false
        }
        for (id, tag) in dueTimers {
            handlers[Int(id)]?.ioCompleted(tag: tag, result: -ETIME)
        }
    }
}
