import CTandem
import Glibc

/// Which engine carries out I/O.
public enum IOEngineKind: String, Sendable, CaseIterable {
    /// io_uring for disk and sockets on one ring.
    case uring
    /// libaio for disk reads and writes (thread pool for fsync and fallocate), epoll for sockets.
    case aio
    /// A small thread pool doing pread/pwrite, epoll for sockets.
    case threads
}

/// A completion-based (proactor) I/O engine. Every operation carries a `userData` word that comes
/// back with its result (bytes, or -errno) through `wait`. Callers own all memory they pass until
/// the completion arrives. Operations never complete inside the call that starts them: results
/// always come from `wait`, so handlers never recurse.
extension IOEngine {
    /// A read the loop's thread may copy itself (direct I/O, small or internal reads).
    public func read(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, userData: UInt64) {
        read(fd: fd, buffer: buffer, length: length, offset: offset, fixedIndex: fixedIndex, offload: false, userData: userData)
    }

    public func writeNow(fd: Int32, buffer: UnsafeRawPointer, length: Int, offset: UInt64) -> Int32 {
        Int32(truncatingIfNeeded: ctandem_pwrite_flags(fd, buffer, length, offset, 0))
    }
}

public protocol IOEngine: AnyObject {
    var kind: IOEngineKind { get }
    /// Why this engine was chosen (logged at start-up).
    var reason: String { get }

    /// Offers the buffer pool's registration iovecs; returns whether they were registered.
    func registerBuffers(_ iovecs: [iovec]) -> Bool
    /// Prepares a freshly accepted or created socket for this engine (non-blocking for epoll).
    func adoptSocket(_ fd: Int32)

    /// Reads `length` bytes. `offload` marks a large read through the page cache: engines copy it
    /// off the loop's thread (an io-wq worker, or the engine's threads), in parallel with the
    /// loop's own copies into sockets, as a threaded server's reads are.
    func read(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, offload: Bool, userData: UInt64)
    /// Writes `length` bytes. `offload` marks a large write through the page cache, which must not
    /// copy on the loop's thread: io_uring hands it to its io-wq worker for the file (one at a
    /// time), or with FUA to the engine's threads, which wait for the disk in parallel; the epoll
    /// engine to its threads (libaio would block in io_submit). Without FUA it is written in
    /// pieces of at most `Limits.pageCacheWritePieceBytes` and completes once, for all of them.
    func write(fd: Int32, buffer: UnsafeRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, fua: Bool, offload: Bool, userData: UInt64)
    /// Writes into the page cache now, on the caller's thread: for small whole-page writes
    /// without FUA to a file opened without O_DIRECT, where a memcpy costs less than a trip
    /// through a worker and back (io_uring serializes buffered writes to one file on one io-wq
    /// worker). Returns bytes written or -errno; a fault-injecting engine applies its rules.
    func writeNow(fd: Int32, buffer: UnsafeRawPointer, length: Int, offset: UInt64) -> Int32
    func fsync(fd: Int32, datasync: Bool, userData: UInt64)
    func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, userData: UInt64)
    func accept(fd: Int32, userData: UInt64)
    /// Receives up to `length` bytes; with `waitAll`, completes only once all `length` arrived
    /// (or the peer closed, or an error), which saves round trips for large payloads.
    func recv(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, waitAll: Bool, userData: UInt64)
    func sendmsg(fd: Int32, message: UnsafePointer<msghdr>, userData: UInt64)
    /// Connects a socket the engine adopted; the caller keeps `address` alive until completion.
    func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, userData: UInt64)
    /// Completes with the poll mask once `fd` is readable (one shot).
    func pollReadable(fd: Int32, userData: UInt64)

    /// Submits what is queued, waits up to `timeoutNanos` (nil: forever, 0: not at all) for at
    /// least one completion, and copies up to `out.count` completions into `out`.
    func wait(into out: UnsafeMutableBufferPointer<ctandem_cqe>, timeoutNanos: UInt64?) -> Int
    /// What polling before sleeping did (`PollPolicy`); zeros when it is off.
    var pollStats: PollStats { get }
}

/// Picks the engine: the one asked for, or for `nil` the best that works here, with the reason.
public enum IOEngineFactory {
    /// `pollNanos`: how long a wait may poll before it sleeps (`PollPolicy`; 0: never);
    /// `busyLoops`: the server's loops, when the engine is one of several.
    public static func make(_ requested: IOEngineKind?, pollNanos: UInt64 = 0, busyLoops: BusyLoops? = nil) throws(SystemError) -> any IOEngine {
        switch requested {
        case .uring?:
            return try UringEngine(reason: "requested with --io-engine uring", pollNanos: pollNanos, busyLoops: busyLoops)
        case .aio?:
            return try EpollEngine(disk: .aio, reason: "requested with --io-engine aio", pollNanos: pollNanos, busyLoops: busyLoops)
        case .threads?:
            return try EpollEngine(disk: .threads, reason: "requested with --io-engine threads", pollNanos: pollNanos, busyLoops: busyLoops)
        case nil:
            let why: String
            do {
                return try UringEngine(reason: "io_uring is available", pollNanos: pollNanos, busyLoops: busyLoops)
            } catch {
                why = uringUnavailableReason(error)
            }
            do {
                return try EpollEngine(disk: .aio, reason: "io_uring unavailable (\(why)); using libaio", pollNanos: pollNanos, busyLoops: busyLoops)
            } catch {
                return try EpollEngine(
                    disk: .threads, reason: "io_uring unavailable (\(why)) and libaio unavailable (\(error)); using threads",
                    pollNanos: pollNanos, busyLoops: busyLoops)
            }
        }
    }

    /// Says plainly why io_uring cannot be used here.
    static func uringUnavailableReason(_ error: SystemError) -> String {
        switch error.errno {
        case ENOSYS: return "the kernel has no io_uring"
        case EPERM:
            let sysctl = (try? readTextFile("/proc/sys/kernel/io_uring_disabled", maxBytes: 64)) ?? "?"
            return "io_uring is forbidden (kernel.io_uring_disabled=\(sysctl.trimmingNewline), or a seccomp filter)"
        case ENOMEM: return "not enough locked memory for the ring (ulimit -l)"
        default: return error.description
        }
    }
}

extension String {
    var trimmingNewline: String {
        var s = self
        while s.last == "\n" || s.last == " " { s.removeLast() }
        return s
    }
}
