import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO

/// The node's control socket (a Unix stream socket): a client sends one request line, the node
/// answers with one JSON document and closes. Requests: `status`.
///
/// Bounded: one request of at most 4 KiB per connection, at most 16 connections at once. A
/// connection has `Limits.streamRequestTimeoutSeconds` to send its request line, and when all 16
/// are taken a new one replaces the one that has waited longest for its request (one answered
/// or being answered, and an events subscriber, stay).
final class ControlServer: IOHandler {
    private static let tagAccept: UInt32 = 0xFFFF_FFFF
    /// Set on a connection's key: its request timer.
    private static let tagTimer: UInt32 = 0x8000_0000
    private static let requestBytesMax = 4096
    private static let connectionsMax = 16

    let loop: IOLoop
    let path: String
    let logger: Logger
    private let listenFD: Int32
    private(set) var id: UInt32 = 0
    /// Answers a request line with a JSON document.
    private let handle: (String, @escaping (String) -> Void) -> Void
    private var clients: [UInt32: StreamClient] = [:]
    private var nextTag: UInt32 = 0
    private var stopping = false

    init(loop: IOLoop, path: String, logger: Logger, handle: @escaping (String, @escaping (String) -> Void) -> Void) throws(ServeError) {
        self.loop = loop
        self.path = path
        self.logger = logger
        self.handle = handle
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw ServeError("control socket path \(path) is too long") }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes + [0]) }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ServeError("cannot create the control socket: \(SystemError.text(errno))") }
        // A socket file left by a node that died is replaced; a live node's is refused.
        if access(path, F_OK) == 0 {
            if ControlClient.request(path: path, "ping") != nil {
                close(fd)
                throw ServeError("control socket \(path) is in use by a running node")
            }
            unlink(path)
        }
        let rc = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, Glibc.listen(fd, 16) == 0 else {
            let err = errno
            close(fd)
            throw ServeError("cannot listen on control socket \(path): \(SystemError.text(err))")
        }
        chmod(path, 0o600)
        listenFD = fd
        loop.engine.adoptSocket(fd)
    }

    func start() {
        id = loop.register(self)
        loop.engine.accept(fd: listenFD, userData: IOLoop.userData(id, Self.tagAccept))
    }

    func stop() {
        stopping = true
        shutdown(listenFD, Int32(SHUT_RDWR))
        unlink(path)
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        if tag == Self.tagAccept {
            if result >= 0 {
                if clients.count >= Self.connectionsMax && !stopping, let oldest = clients.oldestWaitingForItsRequest() {
                    finish(oldest)
                }
                if clients.count >= Self.connectionsMax || stopping {
                    close(result)
                } else {
                    loop.engine.adoptSocket(result)
                    let client = StreamClient(fd: result, capacity: ControlServer.requestBytesMax)
                    // Keys are even and below the timer bit (the send completion sets bit 0).
                    nextTag = (nextTag + 1) & 0x3FFF_FFFF
                    clients[nextTag << 1] = client
                    loop.addTimer(id: id, tag: nextTag << 1 | Self.tagTimer, afterNanos: UInt64(Limits.streamRequestTimeoutSeconds) * 1_000_000_000)
                    postRecv(nextTag << 1, client)
                }
            }
            if !stopping && result != -EINVAL { loop.engine.accept(fd: listenFD, userData: IOLoop.userData(id, Self.tagAccept)) }
            return
        }
        if tag & Self.tagTimer != 0 {
            let key = tag & ~Self.tagTimer
            if let client = clients[key], !client.requestDone { finish(key) }
            return
        }
        let key = tag & ~1
        guard let client = clients[key] else { return }
        if tag & 1 == 0 {
            // Received part of a request.
            guard result > 0 else { return finish(key) }
            client.received += Int(result)
            let text = String(decoding: UnsafeRawBufferPointer(start: client.buffer, count: client.received), as: UTF8.self)
            if client.streaming {
                // A subscriber says nothing more; anything it sends is ignored.
                client.received = 0
                return postRecv(key, client)
            }
            if let newline = text.firstIndex(of: "\n"), text[..<newline] == "events" {
                client.requestDone = true
                guard clients.values.filter(\.streaming).count < Self.subscribersMax else {
                    client.reply = Array("{\"error\":\"\(Self.subscribersMax) event subscribers already\"}\n".utf8)
                    return postSend(key, client)
                }
                client.streaming = true
                client.received = 0
                postRecv(key, client)
                if let first = subscribed?() { publish(first, to: key, client) }
            } else if let newline = text.firstIndex(of: "\n") {
                // The answer may come later (a demotion waits for its clients and a flush).
                client.requestDone = true
                handle(String(text[..<newline])) { [weak self, weak client] answer in
                    guard let self, let client, self.clients[key] === client, client.reply.isEmpty else { return }
                    client.reply = Array((answer + "\n").utf8)
                    self.postSend(key, client)
                }
            } else if client.received >= Self.requestBytesMax {
                client.requestDone = true
                client.reply = Array("{\"error\":\"request too long\"}\n".utf8)
                postSend(key, client)
            } else {
                postRecv(key, client)
            }
        } else {
            guard result > 0 else { return finish(key) }
            client.sent += Int(result)
            if client.sent < client.reply.count {
                postSend(key, client)
            } else if client.streaming {
                client.reply.removeAll(keepingCapacity: true)
                client.sent = 0
                client.sending = false
            } else {
                finish(key)
            }
        }
    }

    /// Subscribers to `events` at once, and the bytes one may have queued before it is dropped
    /// as too slow (the node never waits for a reader).
    static let subscribersMax = 8
    static let subscriberQueueBytesMax = 1 << 20
    /// The first line a new subscriber gets (the current state).
    var subscribed: (() -> String)?

    /// Sends one JSON line to every `events` subscriber.
    func broadcast(_ line: String) {
        for (key, client) in clients where client.streaming { publish(line, to: key, client) }
    }

    private func publish(_ line: String, to key: UInt32, _ client: StreamClient) {
        guard client.reply.count + line.utf8.count < Self.subscriberQueueBytesMax else {
            logger.warning("control: dropping an events subscriber that does not read")
            return finish(key)
        }
        client.reply.append(contentsOf: line.utf8)
        client.reply.append(0x0A)
        if !client.sending {
            client.sending = true
            postSend(key, client)
        }
    }

    private func postRecv(_ key: UInt32, _ client: StreamClient) {
        client.postRecv(loop, userData: IOLoop.userData(id, key))
    }

    private func postSend(_ key: UInt32, _ client: StreamClient) {
        client.postSend(loop, userData: IOLoop.userData(id, key | 1))
    }

    private func finish(_ key: UInt32) {
        guard let client = clients.removeValue(forKey: key) else { return }
        loop.cancelTimers(id: id, tag: key | Self.tagTimer)
        // A receive may still be posted (subscribers wait for EOF): wake it first.
        shutdown(client.fd, Int32(SHUT_RDWR))
        close(client.fd)
    }
}

/// The client side: one request, one answer (used by `tandem status` and to detect live nodes).
public enum ControlClient {
    /// Sends `request` and hands every line of the answer to `onLine` until the node closes the
    /// connection (or `onLine` returns false). For `events`. False if the node did not answer.
    public static func stream(path: String, _ request: String, onLine: (String) -> Bool) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes + [0]) }
        let rc = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { return false }
        let line = Array((request + "\n").utf8)
        guard line.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == line.count else { return false }
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        var answered = false
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return answered }
            pending += buffer[0..<n]
            while let newline = pending.firstIndex(of: 0x0A) {
                answered = true
                let text = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                if !onLine(text) { return true }
            }
            if pending.count > 1 << 20 { return answered }
        }
    }


    /// Sends `request` and returns the answer, or nil when nobody answers.
    public static func request(path: String, _ request: String, timeoutSeconds: Int = 5) -> String? {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes + [0]) }
        let rc = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { return nil }
        let line = Array((request + "\n").utf8)
        guard line.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == line.count else { return nil }
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while answer.count < 1 << 20 {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            answer += chunk[0..<n]
        }
        return answer.isEmpty ? nil : String(decoding: answer, as: UTF8.self)
    }
}

/// `s` as a JSON string literal (quotes, backslashes and control characters escaped): for the
/// control socket's answers and the CLI's JSON output.
public func jsonString(_ s: String) -> String {
    var out = "\""
    for scalar in s.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case _ where scalar.value < 0x20:
            let hex = String(scalar.value, radix: 16)
            out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out + "\""
}
