import ArgumentParser
import Glibc
import TandemCore
import TandemIO

/// `tandem link-probe` (hidden; `tools/bench` runs it): one TLS 1.3 stream over loopback through
/// Tandem's own TLS sessions, as the replication link moves data: the sender (alpha's
/// certificate, the TLS server) seals 256 KiB writes into its send buffer, the receiver (beta's)
/// opens them in place. Prints JSON: bytes, seconds, the CPU seconds this process spent moving
/// them (after the handshake), cipher and version. With `--openssl-records` OpenSSL runs the
/// record layer, as before Tandem ran its own.
struct LinkProbe: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "link-probe",
        abstract: "Measure one TLS 1.3 stream on loopback the way the replication link moves data.",
        shouldDisplay: false)

    @Option(help: "send or recv.") var role: String
    @Option(help: "Port on 127.0.0.1 (the sender listens).") var port: UInt16
    @Option(help: "Directory with ca-cert.pem, alpha-cert.pem/-key.pem and beta-cert.pem/-key.pem.") var pki: String
    @Option(help: "Bytes to move.") var bytes: Int
    @Flag(help: "Let OpenSSL seal and open the records.") var opensslRecords = false

    func validate() throws {
        guard role == "send" || role == "recv" else { throw ValidationError("--role is send or recv, not '\(role)'") }
        guard bytes > 0, bytes <= 1 << 40 else { throw ValidationError("--bytes must be between 1 and 1 TiB") }
    }

    static let plainBytes = 256 << 10
    static let cipherBytes = 1 << 20

    func run() throws {
        let send = role == "send"
        let me = send ? "alpha" : "beta"
        let context = try TLSContext(server: send, certificate: "\(pki)/\(me)-cert.pem", key: "\(pki)/\(me)-key.pem",
                                     ca: "\(pki)/ca-cert.pem", requirePeerCertificate: true, tls13Only: true)
        let tls = TLSSession(context: context, expectedPeerName: send ? "beta" : "alpha", recordOffload: !opensslRecords)
        let fd = try send ? accept() : connect()
        defer { closeDescriptor(fd) }
        let cipher = UnsafeMutableRawPointer.allocate(byteCount: Self.cipherBytes, alignment: 4096)
        let plain = UnsafeMutableRawPointer.allocate(byteCount: Self.plainBytes, alignment: 4096)
        plain.initializeMemory(as: UInt8.self, repeating: 0, count: Self.plainBytes)
        defer { cipher.deallocate(); plain.deallocate() }

        // Handshake: pump ciphertext both ways until both sides are done.
        while true {
            let status = tls.handshake()
            try drain(tls, fd, cipher)
            if status == .ok { break }
            guard status == .wantMore else { throw ValidationError("TLS handshake failed: \(tls.lastError)") }
            let n = recv(fd, cipher, Self.cipherBytes, 0)
            guard n > 0 else { throw ValidationError("connection closed during the handshake") }
            guard tls.feed(cipher, n) else { throw ValidationError("TLS: \(tls.lastError)") }
        }
        var start = timespec()
        clock_gettime(CLOCK_MONOTONIC, &start)
        let cpuAtStart = Self.cpuSeconds()
        var moved = 0
        if send {
            while moved < bytes {
                let n = min(Self.plainBytes, bytes - moved)
                tls.setOutputWindow(cipher, capacity: Self.cipherBytes)
                let ok = tls.write(plain, count: n)
                let sealed = tls.closeOutputWindow()
                guard ok else { throw ValidationError("TLS: \(tls.lastError)") }
                try sendAll(fd, cipher, sealed)
                try drain(tls, fd, cipher)
                moved += n
            }
            shutdown(fd, Int32(SHUT_WR))
            _ = recv(fd, cipher, 64, 0) // the receiver's "done"
        } else {
            let landing = UnsafeMutableRawPointer.allocate(byteCount: Self.cipherBytes, alignment: 4096)
            defer { landing.deallocate() }
            reading: while true {
                let k = recv(fd, landing, Self.cipherBytes, 0)
                if k <= 0 { break }
                guard tls.feedInPlace(landing, k) else { throw ValidationError("TLS: \(tls.lastError)") }
                while true {
                    let (n, status) = tls.read(into: cipher, count: Self.cipherBytes)
                    if n > 0 { moved += n; continue }
                    if status == .wantMore { break }
                    if status == .closed { break reading }
                    throw ValidationError("TLS: \(tls.lastError)")
                }
                guard tls.releaseInput() else { throw ValidationError("TLS: \(tls.lastError)") }
            }
            _ = "done".withCString { Glibc.send(fd, $0, 4, 0) }
        }
        var end = timespec()
        clock_gettime(CLOCK_MONOTONIC, &end)
        let seconds = Double(end.tv_sec - start.tv_sec) + Double(end.tv_nsec - start.tv_nsec) / 1e9
        let cpu = Self.cpuSeconds() - cpuAtStart
        print("{\"bytes\": \(moved), \"seconds\": \(seconds), \"cpu_s\": \(cpu), \"cipher\": \"\(tls.cipher)\", \"version\": \"\(tls.version)\", \"records_in_tandem\": \(tls.recordsOffloaded)}")
    }

    /// User and system CPU time of this process so far, in seconds.
    private static func cpuSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        func seconds(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }

    private func accept() throws -> Int32 {
        let (listener, _) = try Sockets.listen(host: "127.0.0.1", port: port, backlog: 1)
        defer { closeDescriptor(listener) }
        let fd = Glibc.accept(listener, nil, nil)
        guard fd >= 0 else { throw SystemError("accept", errno: errno) }
        // The replication link's own socket settings (ReplicatedNode.attach).
        Sockets.setSendBuffer(fd, bytes: Limits.linkSendBufferBytesDefault)
        return fd
    }

    private func connect() throws -> Int32 {
        let address = try SocketAddress(host: "127.0.0.1", port: port, passive: false)
        let fd = try Sockets.stream(family: address.family)
        guard address.withSockaddr({ Glibc.connect(fd, $0, $1) }) == 0 else {
            let err = errno
            closeDescriptor(fd)
            throw SystemError("connect to 127.0.0.1:\(port)", errno: err)
        }
        Sockets.setSendBuffer(fd, bytes: Limits.linkSendBufferBytesDefault)
        return fd
    }

    /// Sends what TLS queued (handshake messages, records that missed the window).
    private func drain(_ tls: TLSSession, _ fd: Int32, _ buffer: UnsafeMutableRawPointer) throws {
        while true {
            let n = tls.takeOutput(into: buffer, count: Self.cipherBytes)
            if n == 0 { return }
            try sendAll(fd, buffer, n)
        }
    }

    private func sendAll(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) throws {
        var at = 0
        while at < count {
            let n = Glibc.send(fd, buffer + at, count - at, Int32(MSG_NOSIGNAL))
            guard n > 0 else { throw SystemError("send", errno: errno) }
            at += n
        }
    }
}
