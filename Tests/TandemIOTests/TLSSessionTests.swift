import CTandem
import Glibc
import Testing
@testable import TandemIO

/// Certificates made once per test in a temporary directory.
struct PKI {
    let dir: String

    init() throws {
        var template = Array("/tmp/tandem-pki-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw SystemError("mkdtemp", errno: errno) }
        dir = String(cString: made)
    }

    func path(_ name: String) -> String { "\(dir)/\(name)" }

    func makeCA(_ name: String) throws {
        var err = [CChar](repeating: 0, count: 256)
        guard ctandem_cert_make_ca("CA \(name)", 30, path("\(name)-ca.pem"), path("\(name)-ca-key.pem"), &err, err.count) == 0 else {
            throw TLSError(message: String(nulTerminated: err))
        }
    }

    func makeCert(_ name: String, ca: String, days: Int32 = 30) throws {
        var err = [CChar](repeating: 0, count: 256)
        guard ctandem_cert_make_signed(name, "127.0.0.1", days, path("\(ca)-ca.pem"), path("\(ca)-ca-key.pem"), path("\(name).pem"), path("\(name)-key.pem"), &err, err.count) == 0 else {
            throw TLSError(message: String(nulTerminated: err))
        }
    }

    func context(server: Bool, cert: String?, ca: String, requirePeer: Bool = true) throws -> TLSContext {
        try TLSContext(server: server, certificate: cert.map { path("\($0).pem") }, key: cert.map { path("\($0)-key.pem") }, ca: path("\(ca)-ca.pem"), requirePeerCertificate: requirePeer, tls13Only: true)
    }

    func remove() { _ = system("rm -rf '\(dir)'") }
}

/// Runs a handshake between two sessions by shuttling ciphertext in memory.
func handshake(_ client: TLSSession, _ server: TLSSession) -> (TLSSession.Status, TLSSession.Status) {
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 8)
    defer { buffer.deallocate() }
    var c = TLSSession.Status.wantMore, s = TLSSession.Status.wantMore
    for _ in 0..<20 {
        if c == .wantMore { c = client.handshake() }
        var n = client.takeOutput(into: buffer, count: 65536)
        if n > 0 { _ = server.feed(buffer, n) }
        if s == .wantMore { s = server.handshake() }
        n = server.takeOutput(into: buffer, count: 65536)
        if n > 0 { _ = client.feed(buffer, n) }
        if c != .wantMore && s != .wantMore { break }
    }
    // A client that finished may still learn of the server's refusal by reading.
    if c == .ok && s == .failed {
        let (_, status) = client.read(into: buffer, count: 16)
        if status == .failed || status == .closed { c = .failed }
    }
    return (c, s)
}

@Suite(.serialized) struct TLSSessionTests {
    @Test func mutualTLSWithExpectedNameCarriesData() throws {
        let pki = try PKI()
        defer { pki.remove() }
        try pki.makeCA("good")
        try pki.makeCert("alpha", ca: "good")
        try pki.makeCert("beta", ca: "good")
        let client = TLSSession(context: try pki.context(server: false, cert: "alpha", ca: "good"), expectedPeerName: "beta")
        let server = TLSSession(context: try pki.context(server: true, cert: "beta", ca: "good"), expectedPeerName: "alpha")
        let (c, s) = handshake(client, server)
        #expect(c == .ok && s == .ok)
        #expect(client.version == "TLSv1.3")
        #expect(server.peerName == "alpha" && client.peerName == "beta")
        let message = Array("replicate me".utf8)
        #expect(message.withUnsafeBytes { client.write($0.baseAddress!, count: $0.count) })
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }
        let n = client.takeOutput(into: buffer, count: 4096)
        #expect(n > message.count, "ciphertext carries a record header and tag")
        #expect(server.feed(buffer, n))
        let plain = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 8)
        defer { plain.deallocate() }
        let (got, status) = server.read(into: plain, count: 64)
        #expect(status == .ok && Array(UnsafeRawBufferPointer(start: plain, count: got)) == message)
    }

    @Test func wrongCAIsRefused() throws {
        let pki = try PKI()
        defer { pki.remove() }
        try pki.makeCA("good")
        try pki.makeCA("evil")
        try pki.makeCert("alpha", ca: "good")
        try pki.makeCert("mallory", ca: "evil")
        let client = TLSSession(context: try pki.context(server: false, cert: "mallory", ca: "evil"), expectedPeerName: "alpha")
        let server = TLSSession(context: try pki.context(server: true, cert: "alpha", ca: "good"), expectedPeerName: "beta")
        let (c, s) = handshake(client, server)
        #expect(s == .failed)
        #expect(c != .ok)
        #expect(server.lastError.contains("certificate") || client.lastError.contains("certificate"))
    }

    @Test func expiredPeerIsRefusedWithTheReason() throws {
        let pki = try PKI()
        defer { pki.remove() }
        try pki.makeCA("good")
        try pki.makeCert("alpha", ca: "good")
        try pki.makeCert("old", ca: "good", days: -1)
        let client = TLSSession(context: try pki.context(server: false, cert: "old", ca: "good"))
        let server = TLSSession(context: try pki.context(server: true, cert: "alpha", ca: "good"))
        let (_, s) = handshake(client, server)
        #expect(s == .failed)
        #expect(server.lastError.contains("expired"), "reason: \(server.lastError)")
    }

    @Test func wrongNameIsRefused() throws {
        let pki = try PKI()
        defer { pki.remove() }
        try pki.makeCA("good")
        try pki.makeCert("alpha", ca: "good")
        try pki.makeCert("gamma", ca: "good")
        // The client expects to reach "beta" but "gamma" answers with a valid certificate.
        let client = TLSSession(context: try pki.context(server: false, cert: "alpha", ca: "good"), expectedPeerName: "beta")
        let server = TLSSession(context: try pki.context(server: true, cert: "gamma", ca: "good"))
        let (c, _) = handshake(client, server)
        #expect(c == .failed)
        #expect(client.lastError.contains("verification failed"), "reason: \(client.lastError)")
    }

    @Test func clientWithoutCertificateIsRefusedWhenRequired() throws {
        let pki = try PKI()
        defer { pki.remove() }
        try pki.makeCA("good")
        try pki.makeCert("alpha", ca: "good")
        let client = TLSSession(context: try pki.context(server: false, cert: nil, ca: "good"))
        let server = TLSSession(context: try pki.context(server: true, cert: "alpha", ca: "good"))
        let (_, s) = handshake(client, server)
        #expect(s == .failed)
    }
}

/// The record layer run in Tandem (`recordOffload`) against itself and against OpenSSL's: the
/// records on the wire are TLS 1.3 records either way.
@Suite(.serialized) struct TLSRecordOffloadTests {
    /// A connected pair; `offload` chooses which sides run the record layer themselves.
    static func pair(_ pki: PKI, clientOffload: Bool, serverOffload: Bool) throws -> (TLSSession, TLSSession) {
        try pki.makeCA("good")
        try pki.makeCert("alpha", ca: "good")
        try pki.makeCert("beta", ca: "good")
        let client = TLSSession(context: try pki.context(server: false, cert: "alpha", ca: "good"), expectedPeerName: "beta", recordOffload: clientOffload)
        let server = TLSSession(context: try pki.context(server: true, cert: "beta", ca: "good"), expectedPeerName: "alpha", recordOffload: serverOffload)
        let (c, s) = handshake(client, server)
        #expect(c == .ok && s == .ok)
        #expect(client.recordsOffloaded == clientOffload && server.recordsOffloaded == serverOffload)
        #expect(client.cipher == "TLS_AES_128_GCM_SHA256" && server.cipher == "TLS_AES_128_GCM_SHA256")
        return (client, server)
    }

    static func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
        var x = seed | 1
        return (0..<count).map { _ in
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            return UInt8(truncatingIfNeeded: x)
        }
    }

    /// Moves everything `from` has sealed to `to`, in pieces of `chunk` bytes fed in place (the
    /// receive buffer reused after each), reading plaintext `readSize` bytes at a time.
    static func carry(from: TLSSession, to: TLSSession, chunk: Int, readSize: Int) -> (bytes: [UInt8], status: TLSSession.Status) {
        var cipher: [UInt8] = []
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 8)
        defer { buffer.deallocate() }
        while true {
            let n = from.takeOutput(into: buffer, count: 1 << 16)
            if n == 0 { break }
            cipher += UnsafeRawBufferPointer(start: buffer, count: n)
        }
        let landing = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 8)
        let plain = UnsafeMutableRawPointer.allocate(byteCount: readSize, alignment: 8)
        defer { landing.deallocate(); plain.deallocate() }
        var out: [UInt8] = []
        var status = TLSSession.Status.wantMore
        var at = 0
        while at < cipher.count {
            let n = min(chunk, cipher.count - at)
            cipher.withUnsafeBytes { landing.copyMemory(from: $0.baseAddress! + at, byteCount: n) }
            at += n
            guard to.feedInPlace(landing, n) else { return (out, .failed) }
            while true {
                let (got, s) = to.read(into: plain, count: readSize)
                if got > 0 { out += UnsafeRawBufferPointer(start: plain, count: got); continue }
                status = s
                break
            }
            if status == .failed || status == .closed { return (out, status) }
            guard to.releaseInput() else { return (out, .failed) }
            landing.initializeMemory(as: UInt8.self, repeating: 0xEE, count: chunk) // reused
        }
        return (out, status)
    }

    /// Where two byte strings differ, or nil. Not `#expect(a == b)`: on megabytes that differ,
    /// Swift Testing's diff of the two arrays runs for hours.
    static func mismatch(_ got: [UInt8], _ want: [UInt8]) -> String? {
        if let i = want.indices.first(where: { $0 >= got.count || got[$0] != want[$0] }) {
            return "first difference at byte \(i) of \(want.count) (got \(got.count) bytes)"
        }
        return got.count == want.count ? nil : "got \(got.count) bytes, wanted \(want.count)"
    }

    static func send(_ bytes: [UInt8], _ session: TLSSession, pieces: Int = 1) -> Bool {
        bytes.withUnsafeBytes { raw in
            var at = 0
            let step = max(1, bytes.count / pieces)
            while at < bytes.count {
                let n = min(step, bytes.count - at)
                guard session.write(raw.baseAddress! + at, count: n) else { return false }
                at += n
            }
            return true
        }
    }

    @Test(arguments: [(true, true), (true, false), (false, true)])
    func dataCrossesBothWaysWhicheverSideOffloads(clientOffload: Bool, serverOffload: Bool) throws {
        let pki = try PKI()
        defer { pki.remove() }
        let (client, server) = try Self.pair(pki, clientOffload: clientOffload, serverOffload: serverOffload)
        // Records of every size, fed in odd pieces so records straddle receive buffers, read into
        // buffers smaller and larger than a record.
        for (size, chunk, readSize) in [(3 << 20, 65_537, 1 << 20), (100_000, 7, 1000), (16_384, 16_405, 16_384), (1, 1, 1)] {
            let message = Self.pattern(size, seed: UInt64(size))
            #expect(Self.send(message, client, pieces: 5))
            let (got, s1) = Self.carry(from: client, to: server, chunk: chunk, readSize: readSize)
            #expect(s1 == .wantMore)
            #expect(Self.mismatch(got, message) == nil, "client to server, \(size) bytes")
            #expect(Self.send(message, server, pieces: 3))
            let (back, s2) = Self.carry(from: server, to: client, chunk: chunk, readSize: readSize)
            #expect(s2 == .wantMore)
            #expect(Self.mismatch(back, message) == nil, "server to client, \(size) bytes")
        }
    }

    @Test(arguments: [(true, false), (false, true), (true, true)])
    func keyUpdatesAreSentAndFollowed(senderOffloads: Bool, receiverOffloads: Bool) throws {
        let pki = try PKI()
        defer { pki.remove() }
        let (client, server) = try Self.pair(pki, clientOffload: senderOffloads, serverOffload: receiverOffloads)
        // A key per 3 records: 40 records need 13 updates, each followed by the receiver.
        client.setKeyUpdateRecords(3)
        let message = Self.pattern(40 * 16_384, seed: 7)
        #expect(Self.send(message, client))
        let (got, _) = Self.carry(from: client, to: server, chunk: 50_000, readSize: 1 << 20)
        #expect(Self.mismatch(got, message) == nil)
        // An update the receiver asks for: the sender updates too, and both keep talking.
        #expect(server.keyUpdate(requestPeer: true))
        let ping = Self.pattern(1000, seed: 9)
        #expect(Self.send(ping, server))
        let (p1, _) = Self.carry(from: server, to: client, chunk: 4096, readSize: 4096)
        #expect(Self.mismatch(p1, ping) == nil)
        #expect(Self.send(message, client))
        let (p2, _) = Self.carry(from: client, to: server, chunk: 65_536, readSize: 65_536)
        #expect(Self.mismatch(p2, message) == nil)
    }

    @Test(arguments: ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
    func everySuiteIsOffloadedAndInteroperates(suite: String) throws {
        let pki = try PKI()
        defer { pki.remove() }
        try pki.makeCA("good")
        try pki.makeCert("alpha", ca: "good")
        try pki.makeCert("beta", ca: "good")
        let clientContext = try pki.context(server: false, cert: "alpha", ca: "good")
        let serverContext = try pki.context(server: true, cert: "beta", ca: "good")
        #expect(clientContext.setCipherSuites(suite) && serverContext.setCipherSuites(suite))
        for (clientOffload, serverOffload) in [(true, true), (true, false), (false, true)] {
            let client = TLSSession(context: clientContext, recordOffload: clientOffload)
            let server = TLSSession(context: serverContext, recordOffload: serverOffload)
            let (c, s) = handshake(client, server)
            #expect(c == .ok && s == .ok && client.cipher == suite)
            #expect(client.recordsOffloaded == clientOffload && server.recordsOffloaded == serverOffload)
            let message = Self.pattern(200_000, seed: 5)
            #expect(Self.send(message, client))
            #expect(Self.mismatch(Self.carry(from: client, to: server, chunk: 30_000, readSize: 70_000).bytes, message) == nil)
            #expect(Self.send(message, server))
            #expect(Self.mismatch(Self.carry(from: server, to: client, chunk: 30_000, readSize: 70_000).bytes, message) == nil)
        }
    }

    @Test func aTamperedRecordIsRefused() throws {
        let pki = try PKI()
        defer { pki.remove() }
        let (client, server) = try Self.pair(pki, clientOffload: true, serverOffload: true)
        #expect(Self.send(Self.pattern(5000, seed: 3), client))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 8)
        defer { buffer.deallocate() }
        let n = client.takeOutput(into: buffer, count: 65536)
        #expect(n == 5 + 5000 + 1 + 16)
        buffer.storeBytes(of: buffer.load(fromByteOffset: 100, as: UInt8.self) ^ 1, toByteOffset: 100, as: UInt8.self)
        #expect(server.feed(buffer, n))
        let (got, status) = server.read(into: buffer + n, count: 8192)
        #expect(got == 0 && status == .failed)
        #expect(server.lastError.contains("bad record MAC"), "reason: \(server.lastError)")
        // A record longer than TLS allows is refused before any decryption.
        let pki2 = try PKI()
        defer { pki2.remove() }
        let (_, s2) = try Self.pair(pki2, clientOffload: true, serverOffload: true)
        var huge: [UInt8] = [23, 3, 3, 0x48, 0x00] + [UInt8](repeating: 0, count: 64)
        #expect(huge.withUnsafeMutableBytes { s2.feed($0.baseAddress!, $0.count) })
        let (g2, st2) = s2.read(into: buffer, count: 8192)
        #expect(g2 == 0 && st2 == .failed)
        #expect(s2.lastError.contains("out of bounds"), "reason: \(s2.lastError)")
    }

    @Test(arguments: [(true, false), (false, true)])
    func closeNotifyEndsTheStream(closerOffloads: Bool, readerOffloads: Bool) throws {
        let pki = try PKI()
        defer { pki.remove() }
        let (client, server) = try Self.pair(pki, clientOffload: closerOffloads, serverOffload: readerOffloads)
        let tail = Self.pattern(3000, seed: 11)
        #expect(Self.send(tail, client))
        client.shutdown()
        let (got, status) = Self.carry(from: client, to: server, chunk: 1 << 16, readSize: 1 << 16)
        #expect(Self.mismatch(got, tail) == nil, "data before close_notify is delivered")
        #expect(status == .closed)
    }
}

/// The record layer's own AES-GCM (VAES and VPCLMULQDQ) against OpenSSL's, byte for byte. On a
/// CPU without those instructions the record layer uses OpenSSL's, and there is nothing to check.
@Suite struct AESGCMTests {
    @Test(.enabled(if: ctandem_gcm_check(0, 0, nil, 0) == 0, "the CPU has VAES and VPCLMULQDQ"))
    func sealsAndOpensAsOpenSSLDoes() {
        var why = [CChar](repeating: 0, count: 256)
        let failures = ctandem_gcm_check(0x7a6e_6465_6d31, 2000, &why, why.count)
        #expect(failures == 0, "\(String(decoding: why.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))")
    }
}
