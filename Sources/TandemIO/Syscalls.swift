import CTandem
import Glibc

/// An errno value with its text, for operating errors that are reported rather than crashed on.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let errno: Int32
    public let operation: String

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation): \(String(cString: strerror(errno)))" }

    /// Text for an errno alone.
    public static func text(_ errno: Int32) -> String { String(cString: strerror(errno)) }
}

/// Runs a syscall that returns -1 with errno, retrying on EINTR; throws other errors.
@discardableResult
@inline(__always)
public func syscallRetrying<T: FixedWidthInteger>(_ operation: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let result = body()
        if result >= 0 { return result }
        let err = Glibc.errno
        if err == EINTR { continue }
        throw SystemError(operation(), errno: err)
    }
}

/// Nanoseconds on the monotonic clock (the I/O layer's only clock; the core never reads one).
@inline(__always)
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Closes a descriptor, ignoring EINTR (Linux always releases the descriptor).
@inline(__always)
public func closeDescriptor(_ fd: Int32) {
    _ = Glibc.close(fd)
}

/// Memory for I/O: page-aligned, zeroed, from mmap, returned with `freeAligned`.
public func allocateAligned(_ bytes: Int) -> UnsafeMutableRawPointer {
    precondition(bytes > 0)
    let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    guard let p, p != MAP_FAILED else { fatalError("mmap of \(bytes) bytes failed: \(SystemError.text(errno))") }
    return p
}

public func freeAligned(_ p: UnsafeMutableRawPointer, _ bytes: Int) {
    munmap(p, bytes)
}

extension String {
    /// A string from a NUL-terminated C buffer (C APIs that fill caller arrays).
    public init(nulTerminated chars: [CChar]) {
        let bytes = chars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
        self = String(decoding: bytes, as: UTF8.self)
    }
}

/// Reads a whole small text file (a resource file), refusing anything over `maxBytes`.
public func readTextFile(_ path: String, maxBytes: Int) throws(SystemError) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0 { throw SystemError("cannot open \(path)", errno: errno) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { throw SystemError("cannot read \(path)", errno: errno) }
        if n == 0 { break }
        bytes += chunk[0..<n]
        if bytes.count > maxBytes { throw SystemError("\(path) is larger than \(maxBytes) bytes", errno: EFBIG) }
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// What a thread started by `startThread` runs.
public protocol ThreadMain: AnyObject {
    func threadMain()
}

/// Holds the object a new thread runs, from pthread_create until the thread takes it.
private final class ThreadStart {
    let object: any ThreadMain
    init(_ object: any ThreadMain) { self.object = object }
}

/// Starts a thread that runs `object.threadMain()` and holds `object` until it returns.
public func startThread(_ object: any ThreadMain) throws(SystemError) -> pthread_t {
    let context = Unmanaged.passRetained(ThreadStart(object)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { context in
        Unmanaged<ThreadStart>.fromOpaque(context!).takeRetainedValue().object.threadMain()
        return nil
    }, context)
    guard rc == 0 else {
        Unmanaged<ThreadStart>.fromOpaque(context).release()
        throw SystemError("pthread_create", errno: rc)
    }
    return thread
}
