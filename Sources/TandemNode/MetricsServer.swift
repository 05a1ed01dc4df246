import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO

/// A minimal HTTP/1.0 responder for Prometheus: `GET /metrics` answers the text exposition
/// format from `render`, anything else 404; one request per connection. Bounded: 16
/// connections and 8 KiB of request each; a connection has `Limits.streamRequestTimeoutSeconds`
/// to send its request, and when all 16 are taken a new one replaces the one that has waited
/// longest for its request.
final class MetricsServer: IOHandler {
    private static let tagAccept: UInt32 = 0xFFFF_FFFF
    /// Set on a connection's key: its request timer.
    private static let tagTimer: UInt32 = 0x8000_0000
    private static let requestBytesMax = 8192
    private static let connectionsMax = 16

    let loop: IOLoop
    let logger: Logger
    let boundAddress: String
    private let listenFD: Int32
    private(set) var id: UInt32 = 0
    private var clients: [UInt32: StreamClient] = [:]
    private var nextKey: UInt32 = 0
    private var stopping = false
    private let render: () -> String

    init(loop: IOLoop, address: ResourceConfig.Address, logger: Logger, render: @escaping () -> String) throws(ServeError) {
        self.loop = loop
        self.logger = logger
        self.render = render
        do {
            let (fd, bound) = try Sockets.listen(host: address.hostText, port: address.port)
            listenFD = fd
            boundAddress = bound.description
        } catch {
            throw ServeError("metrics address \(address): \(error.errno == EADDRINUSE ? error.operation : error.description)")
        }
        loop.engine.adoptSocket(listenFD)
    }

    func start() {
        id = loop.register(self)
        loop.engine.accept(fd: listenFD, userData: IOLoop.userData(id, Self.tagAccept))
        logger.info("metrics: http://\(boundAddress)/metrics")
    }

    func stop() {
        stopping = true
        shutdown(listenFD, Int32(SHUT_RDWR))
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        if tag == Self.tagAccept {
            if result >= 0 {
                if clients.count >= Self.connectionsMax && !stopping, let oldest = clients.oldestWaitingForItsRequest() {
                    finish(oldest)
                }
                if clients.count >= Self.connectionsMax || stopping {
                    closeDescriptor(result)
                } else {
                    loop.engine.adoptSocket(result)
                    nextKey = (nextKey + 1) & 0x3FFF_FFFF
                    let client = StreamClient(fd: result, capacity: MetricsServer.requestBytesMax)
                    clients[nextKey << 1] = client
                    loop.addTimer(id: id, tag: nextKey << 1 | Self.tagTimer, afterNanos: UInt64(Limits.streamRequestTimeoutSeconds) * 1_000_000_000)
                    postRecv(nextKey << 1, client)
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
        guard result > 0 else { return finish(key) }
        if tag & 1 == 0 {
            client.received += Int(result)
            let text = String(decoding: UnsafeRawBufferPointer(start: client.buffer, count: client.received), as: UTF8.self)
            if text.contains("\r\n\r\n") || text.contains("\n\n") {
                let first = text.prefix { $0 != "\r" && $0 != "\n" }
                let parts = first.split(separator: " ")
                if parts.count >= 2, parts[0] == "GET", parts[1] == "/metrics" || parts[1].hasPrefix("/metrics?") {
                    respond(key, client, status: "200 OK", type: "text/plain; version=0.0.4; charset=utf-8", body: render())
                } else {
                    respond(key, client, status: "404 Not Found", type: "text/plain", body: "try GET /metrics\n")
                }
            } else if client.received >= Self.requestBytesMax {
                respond(key, client, status: "431 Request Header Fields Too Large", type: "text/plain", body: "request too large\n")
            } else {
                postRecv(key, client)
            }
        } else {
            client.sent += Int(result)
            if client.sent < client.reply.count { postSend(key, client) } else { finish(key) }
        }
    }

    private func respond(_ key: UInt32, _ client: StreamClient, status: String, type: String, body: String) {
        client.requestDone = true
        let bodyBytes = Array(body.utf8)
        client.reply = Array("HTTP/1.0 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(bodyBytes.count)\r\nConnection: close\r\n\r\n".utf8) + bodyBytes
        postSend(key, client)
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
        shutdown(client.fd, Int32(SHUT_RDWR))
        closeDescriptor(client.fd)
    }
}

/// A latency histogram with fixed buckets, updated without allocation.
struct LatencyHistogram {
    static let boundsSeconds: [Double] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
    private static let boundsNanos: [UInt64] = boundsSeconds.map { UInt64($0 * 1e9) }
    private(set) var counts = [UInt64](repeating: 0, count: boundsSeconds.count + 1)
    private(set) var sumNanos: UInt64 = 0
    private(set) var total: UInt64 = 0

    mutating func record(nanos: UInt64) {
        var i = 0
        while i < Self.boundsNanos.count && nanos > Self.boundsNanos[i] { i += 1 }
        counts[i] &+= 1
        sumNanos &+= nanos
        total &+= 1
    }

    /// Prometheus histogram lines for `name` with `labels` (without braces).
    func render(_ name: String, labels: String, into out: inout String) {
        var cumulative: UInt64 = 0
        for (i, bound) in Self.boundsSeconds.enumerated() {
            cumulative += counts[i]
            out += "\(name)_bucket{\(labels),le=\"\(bound)\"} \(cumulative)\n"
        }
        out += "\(name)_bucket{\(labels),le=\"+Inf\"} \(total)\n"
        out += "\(name)_sum{\(labels)} \(Double(sumNanos) / 1e9)\n"
        out += "\(name)_count{\(labels)} \(total)\n"
    }
}
