import CTandem
import Glibc

/// A rule saying which disk operations fail, and with what error: for tests of how Tandem handles
/// a failing disk (detach, serve through the peer), without a branch in the core.
///
/// Text form (the `--inject-fault` option): `OP:ERRNO[:offset=START-END][:after=N][:count=N]`,
/// where OP is `read`, `write`, `flush`, `zero` or `any`; ERRNO is `EIO`, `ENOSPC`, `EROFS` or a
/// number (1-4095); `offset` limits it to operations touching bytes START..<END (suffixes K, M,
/// G); `after` lets the first N matching operations succeed; `count` fails at most N (a
/// transient error, as a writeback error reported once).
public struct FaultRule: Sendable, Equatable, CustomStringConvertible {
    public enum Operation: String, Sendable { case read, write, flush, zero, any }

    public var operation: Operation
    public var errno: Int32
    public var range: Range<UInt64>?
    public var after: Int
    /// Operations failed at most (nil: every matching one after `after`).
    public var count: Int?

    public init(_ text: String) throws(SystemError) {
        let parts = text.split(separator: ":").map(String.init)
        guard parts.count >= 2, let op = Operation(rawValue: parts[0]) else {
            throw SystemError("fault rule '\(text)': want OP:ERRNO[:offset=A-B][:after=N][:count=N] with OP read, write, flush, zero or any", errno: EINVAL)
        }
        operation = op
        switch parts[1].uppercased() {
        case "EIO": errno = EIO
        case "ENOSPC": errno = ENOSPC
        case "EROFS": errno = EROFS
        default:
            // A Linux errno is at most 4095 (MAX_ERRNO); a larger one would reach the peer in an
            // ack, whose result field refuses it (PeerProtocol.resultMax).
            guard let n = Int32(parts[1]), n > 0, n <= 4095 else { throw SystemError("fault rule '\(text)': unknown errno '\(parts[1])'", errno: EINVAL) }
            errno = n
        }
        range = nil
        after = 0
        count = nil
        for extra in parts.dropFirst(2) {
            if extra.hasPrefix("offset=") {
                let bounds = extra.dropFirst(7).split(separator: "-").map { Self.bytes(String($0)) }
                guard bounds.count == 2, let a = bounds[0], let b = bounds[1], a < b else {
                    throw SystemError("fault rule '\(text)': offset wants START-END", errno: EINVAL)
                }
                range = a..<b
            } else if extra.hasPrefix("after="), let n = Int(extra.dropFirst(6)), n >= 0 {
                after = n
            } else if extra.hasPrefix("count="), let n = Int(extra.dropFirst(6)), n >= 1 {
                count = n
            } else {
                throw SystemError("fault rule '\(text)': unknown part '\(extra)'", errno: EINVAL)
            }
        }
    }

    static func bytes(_ text: String) -> UInt64? {
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        if let last = text.last, let unit = units[last] { return UInt64(text.dropLast()).map { $0 * unit } }
        return UInt64(text)
    }

    public var description: String {
        "\(operation.rawValue):\(errno)\(range.map { ":offset=\($0.lowerBound)-\($0.upperBound)" } ?? "")\(after > 0 ? ":after=\(after)" : "")"
            + (count.map { ":count=\($0)" } ?? "")
    }

    func matches(_ op: Operation, offset: UInt64, length: UInt64) -> Bool {
        guard operation == .any || operation == op else { return false }
        guard let range else { return true }
        return offset < range.upperBound && range.lowerBound < offset + max(length, 1)
    }
}

/// Wraps an engine and fails the disk operations its rules name, as a real failing disk would:
/// the operation is not carried out and completes with -errno through `wait`. Socket operations
/// pass through untouched.
public final class FaultInjectingEngine: IOEngine {
    private let inner: any IOEngine
    private var rules: [FaultRule]
    private var seen: [Int]
    private var injected: [ctandem_cqe] = []
    /// Operations failed so far (for logs and tests).
    public private(set) var injectedCount = 0

    public init(_ inner: any IOEngine, rules: [FaultRule]) {
        self.inner = inner
        self.rules = rules
        seen = Array(repeating: 0, count: rules.count)
        injected.reserveCapacity(1024)
    }

    public var kind: IOEngineKind { inner.kind }
    public var pollStats: PollStats { inner.pollStats }
    public var reason: String { inner.reason + "; injecting faults: " + rules.map(\.description).joined(separator: ", ") }

    /// Whether to fail this operation; counts it against `after`.
    private func fault(_ op: FaultRule.Operation, offset: UInt64, length: UInt64, userData: UInt64) -> Bool {
        guard let errno = failure(op, offset: offset, length: length) else { return false }
        injected.append(ctandem_cqe(user_data: userData, res: -errno, flags: 0))
        return true
    }

    /// The errno to fail this operation with, if a rule says so; counts it against `after`.
    private func failure(_ op: FaultRule.Operation, offset: UInt64, length: UInt64) -> Int32? {
        for i in rules.indices where rules[i].matches(op, offset: offset, length: length) {
            seen[i] += 1
            if seen[i] > rules[i].after, rules[i].count.map({ seen[i] <= rules[i].after + $0 }) ?? true {
                injectedCount += 1
                return rules[i].errno
            }
        }
        return nil
    }

    public func writeNow(fd: Int32, buffer: UnsafeRawPointer, length: Int, offset: UInt64) -> Int32 {
        if let errno = failure(.write, offset: offset, length: UInt64(length)) { return -errno }
        return inner.writeNow(fd: fd, buffer: buffer, length: length, offset: offset)
    }

    public func registerBuffers(_ iovecs: [iovec]) -> Bool { inner.registerBuffers(iovecs) }
    public func adoptSocket(_ fd: Int32) { inner.adoptSocket(fd) }

    public func read(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, offload: Bool, userData: UInt64) {
        if fault(.read, offset: offset, length: UInt64(length), userData: userData) { return }
        inner.read(fd: fd, buffer: buffer, length: length, offset: offset, fixedIndex: fixedIndex, offload: offload, userData: userData)
    }

    public func write(fd: Int32, buffer: UnsafeRawPointer, length: Int, offset: UInt64, fixedIndex: Int32, fua: Bool, offload: Bool, userData: UInt64) {
        if fault(.write, offset: offset, length: UInt64(length), userData: userData) { return }
        inner.write(fd: fd, buffer: buffer, length: length, offset: offset, fixedIndex: fixedIndex, fua: fua, offload: offload, userData: userData)
    }

    public func fsync(fd: Int32, datasync: Bool, userData: UInt64) {
        if fault(.flush, offset: 0, length: UInt64.max / 2, userData: userData) { return }
        inner.fsync(fd: fd, datasync: datasync, userData: userData)
    }

    public func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, userData: UInt64) {
        if fault(.zero, offset: offset, length: length, userData: userData) { return }
        inner.fallocate(fd: fd, mode: mode, offset: offset, length: length, userData: userData)
    }

    public func accept(fd: Int32, userData: UInt64) { inner.accept(fd: fd, userData: userData) }
    public func recv(fd: Int32, buffer: UnsafeMutableRawPointer, length: Int, waitAll: Bool, userData: UInt64) {
        inner.recv(fd: fd, buffer: buffer, length: length, waitAll: waitAll, userData: userData)
    }
    public func sendmsg(fd: Int32, message: UnsafePointer<msghdr>, userData: UInt64) { inner.sendmsg(fd: fd, message: message, userData: userData) }
    public func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, userData: UInt64) {
        inner.connect(fd: fd, address: address, length: length, userData: userData)
    }
    public func pollReadable(fd: Int32, userData: UInt64) { inner.pollReadable(fd: fd, userData: userData) }

    public func wait(into out: UnsafeMutableBufferPointer<ctandem_cqe>, timeoutNanos: UInt64?) -> Int {
        var n = inner.wait(into: out, timeoutNanos: injected.isEmpty ? timeoutNanos : 0)
        while n < out.count, let c = injected.popLast() {
            out[n] = c
            n += 1
        }
        return n
    }
}
