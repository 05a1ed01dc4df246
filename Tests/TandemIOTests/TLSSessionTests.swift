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
