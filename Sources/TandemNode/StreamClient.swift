import Glibc
import TandemIO

/// One connection of a small request/answer server on the loop (the control socket, the
/// metrics endpoint): the request bytes received so far, the answer being sent, and the
/// iovec/msghdr the engine sends from (they must outlive the send, so they live here).
final class StreamClient {
    let fd: Int32
    let buffer: UnsafeMutableRawPointer
    let capacity: Int
    var received = 0
    var reply: [UInt8] = []
    var sent = 0
    /// Control socket only: an `events` subscriber, and whether a send is posted.
    var streaming = false
    var sending = false
    /// The request has arrived whole (it is being answered, or the client subscribed): the
    /// request timeout and the eviction of a full server no longer apply.
    var requestDone = false
    /// When the connection was accepted.
    let acceptedNanos = monotonicNanos()
    private let iov = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
    private let message = UnsafeMutablePointer<msghdr>.allocate(capacity: 1)

    init(fd: Int32, capacity: Int) {
        self.fd = fd
        self.capacity = capacity
        buffer = .allocate(byteCount: capacity, alignment: 8)
        message.initialize(to: msghdr())
    }

    deinit {
        buffer.deallocate()
        iov.deallocate()
        message.deallocate()
    }

    /// Receives more of the request after what arrived so far.
    func postRecv(_ loop: IOLoop, userData: UInt64) {
        loop.engine.recv(fd: fd, buffer: buffer + received, length: capacity - received, waitAll: false, userData: userData)
    }

    /// Sends the rest of `reply` from `sent` on.
    func postSend(_ loop: IOLoop, userData: UInt64) {
        reply.withUnsafeMutableBytes { raw in
            iov.pointee = iovec(iov_base: raw.baseAddress! + sent, iov_len: raw.count - sent)
        }
        message.pointee.msg_iov = iov
        message.pointee.msg_iovlen = 1
        loop.engine.sendmsg(fd: fd, message: message, userData: userData)
    }
}

/// The connections of a small server, by key.
extension Dictionary where Key == UInt32, Value == StreamClient {
    /// The connection that has waited longest without sending a whole request. A full server
    /// closes it to take a new one, so clients that connect and say nothing cannot lock the
    /// others out for longer than it takes the next one to connect.
    func oldestWaitingForItsRequest() -> UInt32? {
        var oldest: (key: UInt32, at: UInt64)?
        for (key, client) in self where !client.requestDone && client.acceptedNanos < oldest?.at ?? .max {
            oldest = (key, client.acceptedNanos)
        }
        return oldest?.key
    }
}
