import Benchmark
import CTandem
import Glibc
import TandemIO

/// TLS 1.3 records through `TLSSession` over memory BIOs, as on the peer link: alpha (client,
/// like the dialing secondary's peer here) encrypts, beta decrypts, with mutual certificates from
/// a throwaway CA. A 4 KiB write is one record; 1 MiB is 64 records of 16 KiB. "encrypt" is
/// `write` + `takeOutput` (what the primary pays per replicated write); "encrypt + decrypt" adds
/// `feed` + `read` on the other session (what the secondary pays on top). GB/s = bytes / time.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal], maxDuration: .seconds(2))

    for (label, bytes, scaling) in [("4 KiB", 4096, BenchmarkScalingFactor.kilo), ("1 MiB", 1 << 20, .one)] {
        Benchmark("TLS record encrypt \(label)", configuration: .init(scalingFactor: scaling)) { benchmark in
            let pair = TLSPair()
            let plain = patternBuffer(bytes)
            defer { plain.deallocate() }
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                blackHole(pair.encrypt(plain, bytes))
            }
            benchmark.stopMeasurement()
        }

        // The same bytes, with the ciphertext taken out after every 16 KiB record, so OpenSSL's
        // output BIO never holds more than one record (compare with "encrypt" above).
        Benchmark("TLS record encrypt \(label), taken out per 16 KiB record", configuration: .init(scalingFactor: scaling)) { benchmark in
            let pair = TLSPair()
            let plain = patternBuffer(bytes)
            defer { plain.deallocate() }
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                var done = 0
                while done < bytes {
                    let n = min(16384, bytes - done)
                    blackHole(pair.encrypt(plain + done, n))
                    done += n
                }
            }
            benchmark.stopMeasurement()
        }

        Benchmark("TLS record encrypt + decrypt \(label)", configuration: .init(scalingFactor: scaling)) { benchmark in
            let pair = TLSPair()
            let plain = patternBuffer(bytes)
            defer { plain.deallocate() }
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                let n = pair.encrypt(plain, bytes)
                precondition(pair.decrypt(n) == bytes)
            }
            benchmark.stopMeasurement()
        }

        // As the peer link does now: Tandem's record layer seals into the send buffer (an output
        // window) and opens records where they landed (fed in place) into the reader's buffer.
        // Compare with "encrypt + decrypt" above (OpenSSL's record layer, memory BIOs).
        Benchmark("TLS record encrypt + decrypt \(label), Tandem's record layer in place", configuration: .init(scalingFactor: scaling)) { benchmark in
            let pair = TLSPair(recordOffload: true)
            let plain = patternBuffer(bytes)
            defer { plain.deallocate() }
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                let n = pair.encryptInPlace(plain, bytes)
                precondition(pair.decryptInPlace(n) == bytes)
            }
            benchmark.stopMeasurement()
        }
    }
}

/// Two sessions that finished a TLS 1.3 handshake in memory, and the buffers that carry records.
final class TLSPair {
    let sender: TLSSession
    let receiver: TLSSession
    let cipher: UnsafeMutableRawPointer
    let plain: UnsafeMutableRawPointer
    static let bufferBytes = 2 << 20

    init(recordOffload: Bool = false) {
        let dir = makePKI()
        func context(_ server: Bool, _ name: String) -> TLSContext {
            do {
                return try TLSContext(server: server, certificate: "\(dir)/\(name).pem", key: "\(dir)/\(name)-key.pem", ca: "\(dir)/ca.pem", requirePeerCertificate: true, tls13Only: true)
            } catch {
                fatalError("TLS context: \(error)")
            }
        }
        sender = TLSSession(context: context(false, "alpha"), expectedPeerName: "beta", recordOffload: recordOffload)
        receiver = TLSSession(context: context(true, "beta"), expectedPeerName: "alpha", recordOffload: recordOffload)
        _ = system("rm -rf '\(dir)'")
        cipher = .allocate(byteCount: Self.bufferBytes, alignment: 4096)
        plain = .allocate(byteCount: Self.bufferBytes, alignment: 4096)
        var s = TLSSession.Status.wantMore, r = TLSSession.Status.wantMore
        for _ in 0..<20 where s == .wantMore || r == .wantMore {
            if s == .wantMore { s = sender.handshake() }
            shuttle(sender, receiver)
            if r == .wantMore { r = receiver.handshake() }
            shuttle(receiver, sender)
        }
        precondition(s == .ok && r == .ok, "handshake: \(sender.lastError) \(receiver.lastError)")
        precondition(sender.version == "TLSv1.3")
        precondition(sender.recordsOffloaded == recordOffload && receiver.recordsOffloaded == recordOffload)
        // Session tickets and the like, so the first measured read sees only data records.
        var spare = 0
        repeat { spare = receiver.read(into: plain, count: Self.bufferBytes).0 } while spare > 0
        repeat { spare = sender.read(into: plain, count: Self.bufferBytes).0 } while spare > 0
        shuttle(sender, receiver)
        repeat { spare = receiver.read(into: plain, count: Self.bufferBytes).0 } while spare > 0
    }

    deinit {
        cipher.deallocate()
        plain.deallocate()
    }

    private func shuttle(_ from: TLSSession, _ to: TLSSession) {
        let n = from.takeOutput(into: cipher, count: Self.bufferBytes)
        if n > 0 { precondition(to.feed(cipher, n)) }
    }

    /// Encrypts `bytes` of `data` into records; returns the ciphertext's size (in `cipher`).
    @inline(__always)
    func encrypt(_ data: UnsafeMutableRawPointer, _ bytes: Int) -> Int {
        precondition(sender.write(data, count: bytes))
        let n = sender.takeOutput(into: cipher, count: Self.bufferBytes)
        precondition(n > bytes && sender.pendingOutput == 0)
        return n
    }

    /// Seals `bytes` of `data` straight into `cipher` (an output window); returns its size.
    @inline(__always)
    func encryptInPlace(_ data: UnsafeMutableRawPointer, _ bytes: Int) -> Int {
        sender.setOutputWindow(cipher, capacity: Self.bufferBytes)
        precondition(sender.write(data, count: bytes))
        let n = sender.closeOutputWindow()
        precondition(n > bytes && sender.pendingOutput == 0)
        return n
    }

    /// Opens `count` bytes of `cipher` where they are (fed in place) into `plain`.
    @inline(__always)
    func decryptInPlace(_ count: Int) -> Int {
        precondition(receiver.feedInPlace(cipher, count))
        var total = 0
        while true {
            let (n, status) = receiver.read(into: plain + total, count: Self.bufferBytes - total)
            if n == 0 {
                precondition(status == .wantMore, "read: \(status) \(receiver.lastError)")
                precondition(receiver.releaseInput())
                return total
            }
            total += n
        }
    }

    /// Feeds `count` bytes of `cipher` to the receiver and reads all the plaintext out.
    @inline(__always)
    func decrypt(_ count: Int) -> Int {
        precondition(receiver.feed(cipher, count))
        var total = 0
        while true {
            let (n, status) = receiver.read(into: plain + total, count: Self.bufferBytes - total)
            if n == 0 {
                precondition(status == .wantMore, "read: \(status) \(receiver.lastError)")
                return total
            }
            total += n
        }
    }
}

/// A CA and two node certificates in a fresh temporary directory.
func makePKI() -> String {
    var template = Array("/tmp/tandem-bench-pki-XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { fatalError("mkdtemp: \(errno)") }
    let dir = String(cString: made)
    var err = [CChar](repeating: 0, count: 256)
    precondition(ctandem_cert_make_ca("Bench CA", 2, "\(dir)/ca.pem", "\(dir)/ca-key.pem", &err, err.count) == 0)
    for name in ["alpha", "beta"] {
        precondition(ctandem_cert_make_signed(name, "127.0.0.1", 2, "\(dir)/ca.pem", "\(dir)/ca-key.pem", "\(dir)/\(name).pem", "\(dir)/\(name)-key.pem", &err, err.count) == 0)
    }
    return dir
}

func patternBuffer(_ bytes: Int) -> UnsafeMutableRawPointer {
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
    for i in 0..<bytes { buffer.storeBytes(of: UInt8(truncatingIfNeeded: i &* 31 &+ 7), toByteOffset: i, as: UInt8.self) }
    return buffer
}
