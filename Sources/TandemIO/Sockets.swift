import CTandem
import Glibc

/// A resolved socket address, stored inline (no allocation once made).
public struct SocketAddress: CustomStringConvertible, @unchecked Sendable {
    public private(set) var storage = sockaddr_storage()
    public private(set) var length: socklen_t = 0

    /// Resolves `host` (numeric or a name) and `port`; the first address wins.
    public init(host: String, port: UInt16, passive: Bool = false) throws(SystemError) {
        var hints = addrinfo()
        hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &result)
        guard rc == 0, let info = result else {
            throw SystemError("cannot resolve \(host): \(String(cString: gai_strerror(rc)))", errno: EINVAL)
        }
        defer { freeaddrinfo(result) }
        length = info.pointee.ai_addrlen
        withUnsafeMutableBytes(of: &storage) { raw in
            raw.copyMemory(from: UnsafeRawBufferPointer(start: info.pointee.ai_addr, count: Int(info.pointee.ai_addrlen)))
        }
    }

    /// The address a socket is bound to (`peer`: connected to).
    public init?(of fd: Int32, peer: Bool) {
        length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                peer ? getpeername(fd, sa, &length) == 0 : getsockname(fd, sa, &length) == 0
            }
        }
        if !ok { return nil }
    }

    public var family: Int32 { Int32(storage.ss_family) }

    /// Calls `body` with a pointer valid only during the call: an engine's `connect` needs a
    /// `SocketAddress` stored where it outlives the operation (e.g. in the connecting object).
    public func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        try withUnsafePointer(to: storage) { p in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, length) }
        }
    }

    /// A pointer to the `sockaddr` inside a `SocketAddress` kept in stable memory, for engine
    /// operations (connect) that read the address after the call that starts them returns.
    public static func sockaddrPointer(_ p: UnsafeMutablePointer<SocketAddress>) -> UnsafePointer<sockaddr> {
        let offset = MemoryLayout<SocketAddress>.offset(of: \SocketAddress.storage)!
        return UnsafeRawPointer(p).advanced(by: offset).assumingMemoryBound(to: sockaddr.self)
    }

    /// `host:port`, or `[v6]:port`.
    public var description: String {
        withSockaddr { sa, len in
            var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            var service = [CChar](repeating: 0, count: Int(NI_MAXSERV))
            guard getnameinfo(sa, len, &host, socklen_t(host.count), &service, socklen_t(service.count), NI_NUMERICHOST | NI_NUMERICSERV) == 0 else { return "?" }
            let h = String(nulTerminated: host)
            return h.contains(":") ? "[\(h)]:\(String(nulTerminated: service))" : "\(h):\(String(nulTerminated: service))"
        }
    }
}

public enum Sockets {
    /// A TCP socket for `family`, close-on-exec.
    public static func stream(family: Int32) throws(SystemError) -> Int32 {
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw SystemError("socket", errno: errno) }
        return fd
    }

    /// Binds and listens on host:port. Returns the descriptor and the address actually bound
    /// (the kernel picks the port when 0 is asked for). "Port in use" reads as such.
    public static func listen(host: String, port: UInt16, backlog: Int32 = 128) throws(SystemError) -> (fd: Int32, bound: SocketAddress) {
        let address = try SocketAddress(host: host, port: port, passive: true)
        let fd = try stream(family: address.family)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = address.withSockaddr { bind(fd, $0, $1) }
        if rc != 0 {
            let err = errno
            closeDescriptor(fd)
            if err == EADDRINUSE { throw SystemError("cannot listen on \(host):\(port): the port is already in use", errno: err) }
            throw SystemError("cannot listen on \(host):\(port)", errno: err)
        }
        if Glibc.listen(fd, backlog) != 0 {
            let err = errno
            closeDescriptor(fd)
            throw SystemError("cannot listen on \(host):\(port)", errno: err)
        }
        return (fd, SocketAddress(of: fd, peer: false) ?? address)
    }

    /// SO_SNDBUF (which turns the kernel's autotuning of it off for this socket); 0 leaves the
    /// autotuning.
    public static func setSendBuffer(_ fd: Int32, bytes: Int) {
        guard bytes > 0 else { return }
        var value = Int32(clamping: bytes)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// TCP_NODELAY: replies and acks are small and must not wait for Nagle.
    public static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }
}
