import CTandem

/// Certificates and keys for one side of TLS, loaded once (an OpenSSL SSL_CTX).
public final class TLSContext: @unchecked Sendable {
    let context: OpaquePointer

    /// - Parameters:
    ///   - requirePeerCertificate: a server demands and verifies a client certificate.
    ///   - tls13Only: refuse TLS 1.2 (the replication link); NBD clients may still use 1.2.
    public init(server: Bool, certificate: String?, key: String?, ca: String?, requirePeerCertificate: Bool, tls13Only: Bool) throws(TLSError) {
        var err = [CChar](repeating: 0, count: 512)
        let made = err.withUnsafeMutableBufferPointer { buf in
            ctandem_tls_ctx_new(server ? 1 : 0, certificate, key, ca, requirePeerCertificate ? 1 : 0, tls13Only ? 1 : 0, buf.baseAddress, buf.count)
        }
        guard let made else { throw TLSError(message: String(nulTerminated: err)) }
        context = made
    }

    deinit { ctandem_tls_ctx_free(context) }

    /// Replaces the TLS 1.3 suites ("TLS_AES_256_GCM_SHA384:..."); false when none is known.
    public func setCipherSuites(_ suites: String) -> Bool { ctandem_tls_ctx_set_suites(context, suites) == 0 }
}

public struct TLSError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public var description: String { message }
}

/// One TLS session over memory buffers: ciphertext goes in with `feed`, plaintext comes out of
/// `read`; plaintext goes in with `write`, ciphertext comes out of `takeOutput`. The owner moves
/// ciphertext with its engine, so TLS works the same on io_uring and epoll.
public final class TLSSession {
    public enum Status: Equatable { case ok, wantMore, closed, failed }

    private let session: OpaquePointer
    private let context: TLSContext

    /// - Parameter recordOffload: once the handshake is done, seal and open TLS 1.3 records here
    ///   instead of in OpenSSL, straight between the caller's buffers (`ctandem_tls_set_record_offload`).
    public init(context: TLSContext, expectedPeerName: String? = nil, recordOffload: Bool = false) {
        self.context = context
        guard let s = ctandem_tls_new(context.context, expectedPeerName) else { fatalError("out of memory creating a TLS session") }
        session = s
        if recordOffload { ctandem_tls_set_record_offload(s, 1) }
    }

    /// The record layer runs here, not in OpenSSL (after a handshake that allowed it).
    public var recordsOffloaded: Bool { ctandem_tls_record_offloaded(session) != 0 }

    /// Sends a KeyUpdate now (`requestPeer`: and asks the peer to update its own key).
    public func keyUpdate(requestPeer: Bool) -> Bool { ctandem_tls_key_update(session, requestPeer ? 1 : 0) == 0 }

    /// Send a KeyUpdate after this many records under one key.
    public func setKeyUpdateRecords(_ records: UInt64) { ctandem_tls_set_key_update_records(session, records) }

    deinit { ctandem_tls_free(session) }

    public func feed(_ bytes: UnsafeRawPointer, _ count: Int) -> Bool {
        ctandem_tls_feed(session, bytes, count) == Int32(count)
    }

    /// Hands over received ciphertext without copying it: the caller keeps the bytes unchanged
    /// until `releaseInput()` (or the next feed), which copies whatever is still unread.
    public func feedInPlace(_ bytes: UnsafeRawPointer, _ count: Int) -> Bool {
        ctandem_tls_feed_in_place(session, bytes, count) == Int32(count)
    }

    /// The caller is about to reuse the buffer it fed in place.
    public func releaseInput() -> Bool { ctandem_tls_release_input(session) == 0 }

    /// Until `closeOutputWindow`, ciphertext goes straight into `buffer` (what does not fit
    /// waits for `takeOutput`). Returns nothing; closing returns the bytes put into `buffer`.
    public func setOutputWindow(_ buffer: UnsafeMutableRawPointer, capacity: Int) {
        ctandem_tls_set_output_window(session, buffer, capacity)
    }

    public func closeOutputWindow() -> Int { ctandem_tls_close_output_window(session) }

    public func handshake() -> Status {
        switch ctandem_tls_handshake(session) {
        case Int32(CTANDEM_TLS_OK): return .ok
        case Int32(CTANDEM_TLS_WANT): return .wantMore
        default: return .failed
        }
    }

    /// Plaintext bytes read (> 0), or a status when none could be read.
    public func read(into buffer: UnsafeMutableRawPointer, count: Int) -> (Int, Status) {
        let n = ctandem_tls_read(session, buffer, count)
        if n > 0 { return (n, .ok) }
        switch n {
        case Int(CTANDEM_TLS_WANT): return (0, .wantMore)
        case Int(CTANDEM_TLS_CLOSED): return (0, .closed)
        default: return (0, .failed)
        }
    }

    /// Encrypts `count` bytes of plaintext; false when TLS failed.
    public func write(_ bytes: UnsafeRawPointer, count: Int) -> Bool {
        var done = 0
        while done < count {
            let n = ctandem_tls_write(session, bytes + done, count - done)
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    public var pendingOutput: Int { ctandem_tls_pending_out(session) }

    public func takeOutput(into buffer: UnsafeMutableRawPointer, count: Int) -> Int {
        ctandem_tls_take_out(session, buffer, count)
    }

    public func shutdown() { ctandem_tls_shutdown(session) }

    public var lastError: String { String(cString: ctandem_tls_error(session)) }
    public var peerName: String { String(cString: ctandem_tls_peer_name(session)) }
    public var version: String { String(cString: ctandem_tls_version(session)) }
    public var cipher: String { String(cString: ctandem_tls_cipher(session)) }
}
