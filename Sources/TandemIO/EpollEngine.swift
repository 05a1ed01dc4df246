import CTandem
import Glibc
import TandemCore

/// The fallback engine where io_uring is unavailable: epoll drives sockets (each operation is
/// tried at once and, on EAGAIN, parked until epoll reports the socket ready), and disk work goes
/// to libaio (reads and writes; fsync and fallocate to threads, since libaio's fsync is not
/// supported by most filesystems) or to a thread pool doing pread/pwrite. Both signal an eventfd
/// that epoll watches. Results are queued and handed out by `wait`, never delivered inside the
/// call that started the operation.
public final class EpollEngine: IOEngine {
    public enum Disk { case aio, threads }

    public let kind: IOEngineKind
    public let reason: String
    private let epfd: Int32
    private let diskEventFD: Int32
    private let pool: DiskThreadPool
    private let aio: OpaquePointer?
    private var aioFreeSlots: [UInt32]
    /// libaio slot of each in-flight aio operation, indexed by slot: the caller's user data.
    private var aioSlotUserData: [UInt64]
    private var ready: [ctandem_cqe] = []
    private var readyHead = 0
    private var sockets: [Int32: SocketOps] = [:]
    private var events: UnsafeMutablePointer<ctandem_epoll_event>
    private let eventsMax = 256
    private static let diskMarker: UInt64 = UInt64.max

    private struct SocketOps {
        var recvBuffer: UnsafeMutableRawPointer?
        var recvLength = 0
        var recvUserData: UInt64 = 0
        var message: UnsafePointer<msghdr>?
        var sendUserData: UInt64 = 0
        var acceptUserData: UInt64?
        var connectUserData: UInt64?
        var pollUserData: UInt64?
        var registered: UInt32 = 0
        var added = false

        var wanted: UInt32 {
            var mask: UInt32 = 0
            if recvBuffer != nil || acceptUserData != nil || pollUserData != nil { mask |= UInt32(CTANDEM_EPOLLIN) }
            if message != nil || connectUserData != nil { mask |= UInt32(CTANDEM_EPOLLOUT) }
            return mask
        }
    }

    /// Whether a wait polls epoll before it sleeps (`PollPolicy`).
    private var poll: PollPolicy
    public var pollStats: PollStats { poll.stats }

    public init(disk: Disk, reason: String, pollNanos: UInt64 = 0, busyLoops: BusyLoops? = nil) throws(SystemError) {
        poll = PollPolicy(budgetNanos: pollNanos, busy: busyLoops)
        let depth = Limits.diskQueueDepthMax
        epfd = ctandem_epoll_create()
        if epfd < 0 { throw SystemError("epoll_create1", errno: -epfd) }
        let efd = ctandem_eventfd()
        if efd < 0 {
            close(epfd)
            throw SystemError("eventfd", errno: -efd)
        }
        diskEventFD = efd
        var aioContext: OpaquePointer?
        if disk == .aio {
            let rc = ctandem_aio_create(UInt32(depth), efd, &aioContext)
            if rc < 0 {
                close(epfd)
                close(efd)
                throw SystemError("io_setup (libaio)", errno: -rc)
            }
        }
        aio = aioContext
        kind = disk == .aio ? .aio : .threads
        self.reason = reason
        aioFreeSlots = disk == .aio ? (0..<UInt32(depth)).reversed() : []
        aioSlotUserData = disk == .aio ? [UInt64](repeating: 0, count: depth) : []
        pool = DiskThreadPool(threads: Limits.diskThreads, capacity: depth, eventFD: efd)
        ready.reserveCapacity(depth + 1024)
        events = .allocate(capacity: eventsMax)
        let rc = ctandem_epoll_ctl(epfd, Int32(CTANDEM_EPOLL_ADD), efd, UInt32(CTANDEM_EPOLLIN), Self.diskMarker)
        if rc < 0 { fatalError("epoll_ctl eventfd: \(SystemError.text(-rc))") }
    }

    deinit {
        pool.stop()
        if let aio { ctandem_aio_destroy(aio) }
        close(diskEventFD)
        close(epfd)
        events.deallocate()
    }

    public func registerBuffers(_ iovecs: [iovec]) -> Bool { false }

    public func adoptSocket(_ fd: Int32) {
        _ = ctandem_set_nonblocking(fd, 1)
    }

    @inline(__always)
    private func complete(_ userData: UInt64, _ result: Int32) {
        ready.append(ctandem_cqe(user_data: userData, res: result, flags: 0))
    }

    // MARK: Disk

    public func read(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, offload: Bool, userData: UInt64) {
        // libaio copies a page-cache read inside io_submit, on this thread: offloaded reads go to
        // the threads.
        if !offload, let aio, let slot = aioFreeSlots.popLast() {
            aioSlotUserData[Int(slot)] = userData
            let rc = ctandem_aio_submit_rw(aio, slot, 0, fd, buffer, length, offset, 0, UInt64(slot))
            if rc < 0 {
                aioFreeSlots.append(slot)
                complete(userData, rc)
            }
            return
        }
        pool.submit(.init(op: .read, fd: fd, buffer: buffer, length: length, offset: offset, userData: userData))
    }

    public func write(fd: Int32, buffer: UnsafeRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, fua: Bool, offload: Bool, userData: UInt64) {
        let flags = fua ? ctandem_RWF_DSYNC : 0
        if !offload, let aio, let slot = aioFreeSlots.popLast() {
            aioSlotUserData[Int(slot)] = userData
            let rc = ctandem_aio_submit_rw(aio, slot, 1, fd, UnsafeMutableRawPointer(mutating: buffer), length, offset, flags, UInt64(slot))
            if rc < 0 {
                aioFreeSlots.append(slot)
                complete(userData, rc)
            }
            return
        }
        pool.submit(.init(op: .write, fd: fd, buffer: UnsafeMutableRawPointer(mutating: buffer), length: length, offset: offset, flags: flags,
                          pieceBytes: offload && !fua ? Limits.pageCacheWritePieceBytes : 0, userData: userData))
    }

    public func fsync(fd: Int32, datasync: Bool, userData: UInt64) {
        pool.submit(.init(op: datasync ? .fdatasync : .fsync, fd: fd, userData: userData))
    }

    public func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, userData: UInt64) {
        pool.submit(.init(op: .fallocate, fd: fd, length: Int(length), offset: offset, flags: mode, userData: userData))
    }

    // MARK: Sockets

    public func accept(fd: Int32, userData: UInt64) {
        let rc = ctandem_accept(fd, 1)
        if rc != -EAGAIN {
            complete(userData, rc)
            return
        }
        sockets[fd, default: SocketOps()].acceptUserData = userData
        update(fd)
    }

    /// `waitAll` is ignored: a partial receive completes, and the caller posts the rest.
    public func recv(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, waitAll: Bool, userData: UInt64) {
        let n = Glibc.recv(fd, buffer, length, Int32(MSG_DONTWAIT))
        if n >= 0 || (errno != EAGAIN && errno != EINTR) {
            complete(userData, n >= 0 ? Int32(n) : -errno)
            return
        }
        var ops = sockets[fd, default: SocketOps()]
        ops.recvBuffer = buffer
        ops.recvLength = length
        ops.recvUserData = userData
        sockets[fd] = ops
        update(fd)
    }

    public func sendmsg(fd: Int32, message: UnsafePointer<msghdr>, userData: UInt64) {
        let n = Glibc.sendmsg(fd, message, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
        if n >= 0 || (errno != EAGAIN && errno != EINTR) {
            complete(userData, n >= 0 ? Int32(n) : -errno)
            return
        }
        var ops = sockets[fd, default: SocketOps()]
        ops.message = message
        ops.sendUserData = userData
        sockets[fd] = ops
        update(fd)
    }

    public func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, userData: UInt64) {
        let rc = ctandem_connect(fd, address, length)
        if rc != -EINPROGRESS {
            complete(userData, rc)
            return
        }
        sockets[fd, default: SocketOps()].connectUserData = userData
        update(fd)
    }

    public func pollReadable(fd: Int32, userData: UInt64) {
        sockets[fd, default: SocketOps()].pollUserData = userData
        update(fd)
    }

    /// Brings epoll's interest for `fd` in line with the operations parked on it.
    private func update(_ fd: Int32) {
        guard var ops = sockets[fd] else { return }
        let wanted = ops.wanted
        if wanted == ops.registered && ops.added { return }
        let data = UInt64(UInt32(bitPattern: fd))
        if wanted == 0 {
            if ops.added { _ = ctandem_epoll_ctl(epfd, Int32(CTANDEM_EPOLL_DEL), fd, 0, data) }
            sockets[fd] = nil
            return
        }
        let rc = ctandem_epoll_ctl(epfd, Int32(ops.added ? CTANDEM_EPOLL_MOD : CTANDEM_EPOLL_ADD), fd, wanted, data)
        if rc < 0 {
            // The socket is gone (closed under us): fail what waits on it.
            let err = rc
            if ops.recvBuffer != nil { complete(ops.recvUserData, err) }
            if ops.message != nil { complete(ops.sendUserData, err) }
            if let a = ops.acceptUserData { complete(a, err) }
            if let p = ops.pollUserData { complete(p, err) }
            if let c = ops.connectUserData { complete(c, err) }
            sockets[fd] = nil
            return
        }
        ops.added = true
        ops.registered = wanted
        sockets[fd] = ops
    }

    private func socketReady(_ fd: Int32, _ mask: UInt32) {
        guard var ops = sockets[fd] else { return }
        let readable = mask & (UInt32(CTANDEM_EPOLLIN) | UInt32(CTANDEM_EPOLLERR) | UInt32(CTANDEM_EPOLLHUP)) != 0
        let writable = mask & (UInt32(CTANDEM_EPOLLOUT) | UInt32(CTANDEM_EPOLLERR) | UInt32(CTANDEM_EPOLLHUP)) != 0
        if readable, let buffer = ops.recvBuffer {
            let n = Glibc.recv(fd, buffer, ops.recvLength, Int32(MSG_DONTWAIT))
            if n >= 0 || (errno != EAGAIN && errno != EINTR) {
                complete(ops.recvUserData, n >= 0 ? Int32(n) : -errno)
                ops.recvBuffer = nil
            }
        }
        if readable, let userData = ops.acceptUserData {
            let rc = ctandem_accept(fd, 1)
            if rc != -EAGAIN {
                complete(userData, rc)
                ops.acceptUserData = nil
            }
        }
        if readable, let userData = ops.pollUserData {
            complete(userData, Int32(bitPattern: mask))
            ops.pollUserData = nil
        }
        if writable, let userData = ops.connectUserData {
            complete(userData, ctandem_socket_error(fd))
            ops.connectUserData = nil
        }
        if writable, let message = ops.message {
            let n = Glibc.sendmsg(fd, message, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
            if n >= 0 || (errno != EAGAIN && errno != EINTR) {
                complete(ops.sendUserData, n >= 0 ? Int32(n) : -errno)
                ops.message = nil
            }
        }
        sockets[fd] = ops
        update(fd)
    }

    // MARK: Waiting

    public func wait(into out: UnsafeMutableBufferPointer<ctandem_cqe>, timeoutNanos: UInt64?) -> Int {
        if ready.count > readyHead {
            waitEvents(timeoutMs: 0)
        } else {
            let polled = poll.pollFirst(timeoutNanos: timeoutNanos) { budget in
                // Bounded by the budget; each round is one epoll_wait that does not sleep.
                let start = monotonicNanos()
                repeat { waitEvents(timeoutMs: 0) } while ready.count == readyHead && monotonicNanos() &- start < budget
                return ready.count > readyHead
            }
            if !polled.hit {
                let timeoutMs = polled.timeoutNanos.map { Int32(min(($0 + 999_999) / 1_000_000, UInt64(Int32.max))) } ?? -1
                poll.timeSleep(timeoutNanos: polled.timeoutNanos) {
                    waitEvents(timeoutMs: timeoutMs)
                    return ready.count > readyHead
                }
            }
        }
        let count = min(out.count, ready.count - readyHead)
        for i in 0..<count { out[i] = ready[readyHead + i] }
        readyHead += count
        if readyHead == ready.count {
            ready.removeAll(keepingCapacity: true)
            readyHead = 0
        }
        return count
    }

    /// One epoll_wait, and what its events complete.
    private func waitEvents(timeoutMs: Int32) {
        let n = ctandem_epoll_wait(epfd, events, Int32(eventsMax), timeoutMs)
        if n < 0 { fatalError("epoll_wait: \(SystemError.text(-n))") }
        for i in 0..<Int(n) {
            let ev = events[i]
            if ev.data == Self.diskMarker {
                ctandem_eventfd_drain(diskEventFD)
                reapDisk()
            } else {
                socketReady(Int32(truncatingIfNeeded: ev.data), ev.events)
            }
        }
    }

    private func reapDisk() {
        if let aio {
            withUnsafeTemporaryAllocation(of: ctandem_cqe.self, capacity: 256) { buf in
                while true {
                    let n = ctandem_aio_reap(aio, buf.baseAddress, 256)
                    if n <= 0 { break }
                    for i in 0..<Int(n) {
                        let slot = UInt32(buf[i].user_data)
                        complete(aioSlotUserData[Int(slot)], buf[i].res)
                        aioFreeSlots.append(slot)
                    }
                    if n < 256 { break }
                }
            }
        }
        pool.reap { complete($0.user_data, $0.res) }
    }
}
