public import CTandem
import Glibc
import TandemCore

/// io_uring for everything: disk reads and writes (registered buffers where the pool offers
/// them), fsync, fallocate, accept, recv and sendmsg on one ring, submitted in batches: an
/// operation is only queued; the ring is entered once per loop iteration.
public final class UringEngine: IOEngine {
    public let kind = IOEngineKind.uring
    public let reason: String
    private let ring: OpaquePointer
    /// Worker threads for offloaded page-cache writes with FUA, started on first use, and the
    /// eventfd they signal, watched by a poll on the ring.
    private var offloadPool: DiskThreadPool?
    /// Whether the pool has started (for tests).
    var offloadPoolStarted: Bool { offloadPool != nil }
    private var offloadEventFD: Int32 = -1
    private var offloadPollArmed = false
    /// Completions taken from the pool that did not fit the caller's array yet.
    private var offloaded: [ctandem_cqe] = []
    private static let offloadMarker = UInt64.max
    /// Page-cache writes cut in pieces (`write`): the request each belongs to, its pieces still
    /// in flight, the bytes they wrote and the first error. Slots are free when `piecesLeft` is 0.
    private var splits: [(userData: UInt64, piecesLeft: Int32, bytes: Int32, error: Int32)] = []
    private var freeSplits: [Int32] = []
    /// A piece's user data: this marker (no handler has the id) and its split's slot.
    private static let pieceMarker: UInt64 = 0xFFFF_FFFE << 32
    /// Whether a wait polls the ring before it sleeps (`PollPolicy`).
    private var poll: PollPolicy
    public var pollStats: PollStats { poll.stats }

    public init(reason: String, entries: Int = Limits.ringEntries, pollNanos: UInt64 = 0, busyLoops: BusyLoops? = nil) throws(SystemError) {
        poll = PollPolicy(budgetNanos: pollNanos, busy: busyLoops)
        var ring: OpaquePointer?
        let rc = ctandem_ring_create(UInt32(entries), &ring)
        if rc < 0 { throw SystemError("io_uring_setup", errno: -rc) }
        self.ring = ring!
        // Every operation Tandem uses must be there; say which one is missing otherwise.
        let needed: [(Int32, String)] = [
            (Int32(CTANDEM_OP_READ), "read"), (Int32(CTANDEM_OP_WRITE), "write"), (Int32(CTANDEM_OP_FSYNC), "fsync"),
            (Int32(CTANDEM_OP_FALLOCATE), "fallocate"), (Int32(CTANDEM_OP_ACCEPT), "accept"),
            (Int32(CTANDEM_OP_RECV), "recv"), (Int32(CTANDEM_OP_SENDMSG), "sendmsg"), (Int32(CTANDEM_OP_POLL), "poll"),
        ]
        for (op, name) in needed where ctandem_ring_supports_op(self.ring, op) == 0 {
            ctandem_ring_destroy(self.ring)
            throw SystemError("io_uring lacks the \(name) operation", errno: EOPNOTSUPP)
        }
        self.reason = reason
        splits = Array(repeating: (0, 0, 0, 0), count: Self.splitsMax)
        freeSplits = (0..<Int32(Self.splitsMax)).reversed()
    }

    /// Writes cut in pieces at once; past it a write goes whole. Each is a client's or peer's
    /// request in flight, bounded by the caller's own slots.
    static let splitsMax = 1024

    deinit {
        offloadPool?.stop()
        ctandem_ring_destroy(ring)
        if offloadEventFD >= 0 { close(offloadEventFD) }
    }

    private func startOffload() {
        if offloadPool != nil { return }
        offloadEventFD = ctandem_eventfd()
        precondition(offloadEventFD >= 0, "eventfd: \(SystemError.text(-offloadEventFD))")
        offloadPool = DiskThreadPool(threads: Limits.diskThreads, capacity: Limits.diskQueueDepthMax, eventFD: offloadEventFD)
        offloaded.reserveCapacity(Limits.diskQueueDepthMax)
        armOffloadPoll()
    }

    private func armOffloadPoll() {
        offloadPollArmed = true
        queue { ctandem_prep_poll(ring, offloadEventFD, UInt32(POLLIN), Self.offloadMarker) }
    }

    /// Replaces offload poll completions in `out[0..<n]` with the pool's results.
    private func mergeOffloaded(_ out: UnsafeMutableBufferPointer<ctandem_cqe>, _ n: Int) -> Int {
        var count = 0
        var sawMarker = false
        for i in 0..<n {
            if out[i].user_data == Self.offloadMarker {
                sawMarker = true
                continue
            }
            out[count] = out[i]
            count += 1
        }
        if sawMarker {
            ctandem_eventfd_drain(offloadEventFD)
            offloadPool!.reap { offloaded.append($0) }
            armOffloadPoll()
        }
        while count < out.count, let c = offloaded.popLast() {
            out[count] = c
            count += 1
        }
        return count
    }

    public func registerBuffers(_ iovecs: [iovec]) -> Bool {
        guard !iovecs.isEmpty else { return false }
        let rc = iovecs.withUnsafeBufferPointer { ctandem_ring_register_buffers(ring, $0.baseAddress, UInt32($0.count)) }
        return rc == 0
    }

    public func adoptSocket(_ fd: Int32) {}

    /// Runs `prep`; when the submission queue is full, submits what is there and tries again.
    @inline(__always)
    private func queue(_ prep: () -> Int32) {
        var rc = prep()
        while rc == -EBUSY {
            _ = ctandem_ring_submit_wait(ring, 0, -1)
            rc = prep()
        }
        precondition(rc == 0, "io_uring prep failed: \(rc)")
    }

    public func read(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, offload: Bool, userData: UInt64) {
        // Offloaded: IOSQE_ASYNC sends the read straight to an io-wq worker, which copies from the
        // page cache while this thread goes on (cached pages are otherwise copied inline here).
        queue { ctandem_prep_read(ring, fd, buffer, UInt32(length), offset, fixedIndex, offload ? 1 : 0, userData) }
    }

    /// An offloaded (page-cache) write without FUA goes to the ring: io-wq runs buffered writes to
    /// one file one at a time on one worker, which copies into the page cache without contending
    /// for the inode's lock. Eight pool threads copying in parallel were slower: 1 MiB QD16
    /// writes, alternating runs, 3714-4687 → 4950-5663 MiB/s at 1 connection (nbdkit 4252-5205)
    /// and 0.21-0.27 → 0.17-0.20 server CPU-s/GiB; at 4 connections 3365-4209 → 3647-4253.
    /// One with FUA still goes to the pool, whose threads wait for the disk side by side.
    /// Without FUA, a write larger than `Limits.pageCacheWritePieceBytes` goes as pieces of that
    /// size (`joinPieces` gives the caller one completion): the page cache makes a folio as
    /// large as the write that creates it, and every later small write into an ext4 folio walks
    /// all its block buffers.
    public func write(fd: Int32, buffer: UnsafeRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, fua: Bool, offload: Bool, userData: UInt64) {
        if offload && fua {
            startOffload()
            offloadPool!.submit(.init(op: .write, fd: fd, buffer: UnsafeMutableRawPointer(mutating: buffer), length: length, offset: offset, flags: fua ? ctandem_RWF_DSYNC : 0, userData: userData))
            return
        }
        if offload && length > Limits.pageCacheWritePieceBytes, let slot = freeSplits.popLast() {
            // io-wq runs the pieces one after another, in order, on the file's worker.
            let pieces = (length + Limits.pageCacheWritePieceBytes - 1) / Limits.pageCacheWritePieceBytes
            splits[Int(slot)] = (userData, Int32(pieces), 0, 0)
            var done = 0
            while done < length {
                let n = min(Limits.pageCacheWritePieceBytes, length - done)
                queue { ctandem_prep_write(ring, fd, buffer + done, UInt32(n), offset + UInt64(done), fixedIndex, 0, Self.pieceMarker | UInt64(slot)) }
                done += n
            }
            return
        }
        queue { ctandem_prep_write(ring, fd, buffer, UInt32(length), offset, fixedIndex, fua ? ctandem_RWF_DSYNC : 0, userData) }
    }

    public func fsync(fd: Int32, datasync: Bool, userData: UInt64) {
        queue { ctandem_prep_fsync(ring, fd, datasync ? 1 : 0, userData) }
    }

    public func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, userData: UInt64) {
        queue { ctandem_prep_fallocate(ring, fd, mode, offset, length, userData) }
    }

    public func accept(fd: Int32, userData: UInt64) {
        queue { ctandem_prep_accept(ring, fd, userData) }
    }

    public func recv(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, waitAll: Bool, userData: UInt64) {
        queue { ctandem_prep_recv(ring, fd, buffer, UInt32(length), waitAll ? Int32(MSG_WAITALL) : 0, userData) }
    }

    public func sendmsg(fd: Int32, message: UnsafePointer<msghdr>, userData: UInt64) {
        queue { ctandem_prep_sendmsg(ring, fd, message, 0, userData) }
    }

    public func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, userData: UInt64) {
        queue { ctandem_prep_connect(ring, fd, address, length, userData) }
    }

    public func pollReadable(fd: Int32, userData: UInt64) {
        queue { ctandem_prep_poll(ring, fd, UInt32(POLLIN), userData) }
    }

    /// Queues an operation that does nothing and completes with 0: the ring's own cost per
    /// submission and completion, measured in `Benchmarks/IOUring`. Not part of `IOEngine`.
    public func nop(userData: UInt64) {
        queue { ctandem_prep_nop(ring, userData) }
    }

    public func wait(into out: UnsafeMutableBufferPointer<ctandem_cqe>, timeoutNanos: UInt64?) -> Int {
        // Completions already posted need no system call to wait for.
        var n = Int(ctandem_ring_reap(ring, out.baseAddress, UInt32(out.count)))
        if n > 0 || !offloaded.isEmpty {
            _ = ctandem_ring_submit_wait(ring, 0, -1)
            return finish(out, n)
        }
        let ring = ring
        let polled = poll.pollFirst(timeoutNanos: timeoutNanos) { budget in
            let spent = ctandem_ring_poll(ring, 1, Int64(min(budget, UInt64(Int64.max))))
            if spent < -1 { fatalError("io_uring_enter failed: \(SystemError.text(Int32(-spent)))") }
            return spent >= 0
        }
        if !polled.hit {
            let timeout: Int64 = polled.timeoutNanos.map { Int64(min($0, UInt64(Int64.max))) } ?? -1
            poll.timeSleep(timeoutNanos: polled.timeoutNanos) {
                let rc = ctandem_ring_submit_wait(ring, timeout == 0 ? 0 : 1, timeout)
                if rc < 0 && rc != -ETIME && rc != -EAGAIN && rc != -EBUSY {
                    fatalError("io_uring_enter failed: \(SystemError.text(-rc))")
                }
                return rc >= 0
            }
        }
        n = Int(ctandem_ring_reap(ring, out.baseAddress, UInt32(out.count)))
        return finish(out, n)
    }

    /// The completions reaped into `out[0..<n]` as the caller knows them: pieces joined into their
    /// writes, the offload pool's results merged.
    @inline(__always)
    private func finish(_ out: UnsafeMutableBufferPointer<ctandem_cqe>, _ n: Int) -> Int {
        let n = freeSplits.count == Self.splitsMax ? n : joinPieces(out, n)
        return offloadPool == nil ? n : mergeOffloaded(out, n)
    }

    /// Replaces the pieces' completions in `out[0..<n]` with one for each write whose last piece
    /// completed: the bytes all pieces wrote, or the first error. Never more than it took out.
    private func joinPieces(_ out: UnsafeMutableBufferPointer<ctandem_cqe>, _ n: Int) -> Int {
        var count = 0
        for i in 0..<n {
            let c = out[i]
            guard c.user_data & ~0xFFFF_FFFF == Self.pieceMarker else {
                out[count] = c
                count += 1
                continue
            }
            let slot = Int(c.user_data & 0xFFFF_FFFF)
            if c.res < 0 {
                if splits[slot].error == 0 { splits[slot].error = c.res }
            } else {
                splits[slot].bytes += c.res
            }
            splits[slot].piecesLeft -= 1
            guard splits[slot].piecesLeft == 0 else { continue }
            let split = splits[slot]
            out[count] = ctandem_cqe(user_data: split.userData, res: split.error != 0 ? split.error : split.bytes, flags: 0)
            count += 1
            freeSplits.append(Int32(slot))
        }
        return count
    }
}
