import CTandem
import Glibc
import Logging
import Testing
import TandemCore
@testable import TandemIO
@testable import TandemNode

/// Records what a link reports.
final class LinkRecorder: PeerConnectionDelegate {
    var up = false
    var down: String?
    var frames: [(PeerHeader, [UInt8])] = []
    var released: [UInt64] = []
    /// When set, large payloads are decrypted straight into it (as the node's replicated writes).
    var sink: UnsafeMutableRawBufferPointer?
    var sunk = 0
    /// Stops the link's receiving after each frame (the node's back-pressure).
    var pauseAfterEach = false

    func peerConnectionUp(_ connection: PeerConnection) { up = true }
    func peerConnection(_ connection: PeerConnection, received header: PeerHeader, payload: UnsafeRawBufferPointer) {
        frames.append((header, Array(payload)))
        if pauseAfterEach { connection.pauseReceiving() }
    }
    func peerConnection(_ connection: PeerConnection, releasedPayload token: UInt64) { released.append(token) }
    func peerConnectionDown(_ connection: PeerConnection, reason: String) { down = reason }
    func peerConnection(_ connection: PeerConnection, sinkFor header: PeerHeader) -> UnsafeMutableRawPointer? {
        guard let sink, header.payloadLength <= sink.count else { return nil }
        sunk += 1
        return sink.baseAddress
    }
}

/// Two ends of a link on one loop, over a socketpair, with certificates from a fresh CA.
struct LinkPair {
    let loop: IOLoop
    let dir: String
    let a: PeerConnection, b: PeerConnection
    let ra = LinkRecorder(), rb = LinkRecorder()

    init(engine: IOEngineKind, bExpects: String = "alpha") throws {
        var template = Array("/tmp/tandem-link-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        self.dir = dir
        var err = [CChar](repeating: 0, count: 256)
        #expect(ctandem_cert_make_ca("CA", 30, "\(dir)/ca.pem", "\(dir)/ca-key.pem", &err, err.count) == 0)
        for name in ["alpha", "beta"] {
            #expect(ctandem_cert_make_signed(name, "", 30, "\(dir)/ca.pem", "\(dir)/ca-key.pem", "\(dir)/\(name).pem", "\(dir)/\(name)-key.pem", &err, err.count) == 0)
        }
        let context = { (server: Bool, name: String) in
            try TLSContext(server: server, certificate: "\(dir)/\(name).pem", key: "\(dir)/\(name)-key.pem", ca: "\(dir)/ca.pem", requirePeerCertificate: true, tls13Only: true)
        }
        loop = IOLoop(engine: try IOEngineFactory.make(engine), pool: BufferPool(classes: [.init(bytes: 4096, count: 1), .init(bytes: 32 << 20, count: 1)]), logger: Logger(label: "test"))
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
        loop.engine.adoptSocket(fds[0])
        loop.engine.adoptSocket(fds[1])
        // alpha dials (client), beta answers (server).
        a = PeerConnection(loop: loop, fd: fds[0], context: try context(false, "alpha"), expectedPeerName: "beta", delegate: ra)
        b = PeerConnection(loop: loop, fd: fds[1], context: try context(true, "beta"), expectedPeerName: bExpects, delegate: rb)
        b.start()
        a.start()
    }

    func run(until done: () -> Bool) {
        for _ in 0..<2000 where !done() { loop.runOnce(timeoutNanos: 10_000_000) }
    }

    func cleanup() { _ = system("rm -rf '\(dir)'") }
}

@Suite(.serialized) struct PeerConnectionTests {
    @Test(arguments: IOEngineKind.allCases)
    func framesCrossTheLinkIntact(engine: IOEngineKind) throws {
        let pair = try LinkPair(engine: engine)
        defer { pair.cleanup() }
        pair.run { pair.ra.up && pair.rb.up }
        #expect(pair.ra.up && pair.rb.up)
        pair.a.send(.ping(id: 7))
        // A 1 MiB replicated write: header and payload straight from the sender's buffer.
        let length = 1 << 20
        let payload = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 4096)
        defer { payload.deallocate() }
        for i in 0..<length { payload.storeBytes(of: UInt8(truncatingIfNeeded: i &* 31 &+ 7), toByteOffset: i, as: UInt8.self) }
        pair.a.sendBlock(type: .data, flags: 0, sequence: 42, block: PeerBlock(offset: 8192, epoch: 3, length: UInt32(length)), payload: payload, token: 99)
        pair.a.send(.flush(id: 43))
        pair.run { pair.rb.frames.count == 3 }
        #expect(pair.rb.frames.map(\.0.type) == [.ping, .data, .flush], "frames arrive whole and in order")
        let (header, bytes) = pair.rb.frames[1]
        #expect(header.sequence == 42 && header.block == PeerBlock(offset: 8192, epoch: 3, length: UInt32(length)))
        #expect(bytes.count == length && bytes.elementsEqual(UnsafeRawBufferPointer(start: payload, count: length)))
        #expect(pair.ra.released == [99], "the payload buffer is handed back once encrypted")
        pair.b.send(.writeAck(id: 42, result: 0))
        pair.run { pair.ra.frames.count == 1 }
        #expect(pair.ra.frames.first?.0.type == .writeAck)
        pair.a.close(reason: "test over")
        pair.run { pair.rb.down != nil }
        #expect(pair.rb.down != nil)
    }

    /// A large payload decrypted into the receiver's own buffer, its checksum taken as it lands:
    /// intact data passes, a flipped bit anywhere in it (here in its last record) drops the link.
    @Test(arguments: [false, true])
    func aSunkPayloadIsChecked(corrupt: Bool) throws {
        let pair = try LinkPair(engine: .uring)
        defer { pair.cleanup() }
        let sink = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { sink.deallocate() }
        pair.rb.sink = sink
        pair.run { pair.ra.up && pair.rb.up }
        let payload = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 3) }
        var frame = PeerMessage.data(PeerWrite(id: 1, offset: 0, length: UInt32(payload.count), epoch: 1), payload: payload).encoded()
        if corrupt { frame[frame.count - 5] ^= 0x10 }
        pair.a.sendEncoded(frame)
        pair.a.send(.ping(id: 2))
        pair.run { pair.rb.down != nil || pair.rb.frames.count == 2 }
        #expect(pair.rb.sunk == 1)
        if corrupt {
            #expect(pair.rb.down?.contains("checksum") == true, "reason: \(pair.rb.down ?? "none")")
            #expect(pair.rb.frames.isEmpty)
        } else {
            #expect(pair.rb.down == nil)
            #expect(pair.rb.frames.map(\.0.type) == [.data, .ping])
            #expect(pair.rb.frames.first?.1 == payload)
        }
    }

    @Test func aPeerWithTheWrongNameIsRefused() throws {
        let pair = try LinkPair(engine: .uring, bExpects: "gamma")
        defer { pair.cleanup() }
        pair.run { pair.ra.down != nil && pair.rb.down != nil }
        #expect(!pair.rb.up)
        #expect(pair.rb.down?.contains("verification failed") == true, "reason: \(pair.rb.down ?? "none")")
        #expect(pair.ra.down != nil)
    }

    @Test func garbageAfterTheHandshakeDropsTheLink() throws {
        let pair = try LinkPair(engine: .uring)
        defer { pair.cleanup() }
        pair.run { pair.ra.up && pair.rb.up }
        pair.a.sendEncoded(Array("GET / HTTP/1.1\r\nHost: tandem\r\n\r\n padding to a whole header".utf8))
        pair.run { pair.rb.down != nil }
        #expect(pair.rb.down?.contains("protocol error") == true, "reason: \(pair.rb.down ?? "none")")
        #expect(pair.rb.frames.isEmpty)
    }

    @Test func aCorruptedPayloadIsCaughtByItsChecksum() throws {
        let pair = try LinkPair(engine: .uring)
        defer { pair.cleanup() }
        pair.run { pair.ra.up && pair.rb.up }
        var frame = PeerMessage.data(PeerWrite(id: 1, offset: 0, length: 4096, epoch: 1), payload: [UInt8](repeating: 0x55, count: 4096)).encoded()
        frame[frame.count - 1] ^= 0x01
        pair.a.sendEncoded(frame)
        pair.run { pair.rb.down != nil }
        #expect(pair.rb.down?.contains("checksum") == true, "reason: \(pair.rb.down ?? "none")")
    }

    /// A peer that sends and never reads fills the send queue with answers: the link closes with
    /// the reason (the queue's push trapped, the whole node down).
    @Test func aFullSendQueueDropsTheLink() throws {
        let pair = try LinkPair(engine: .uring)
        defer { pair.cleanup() }
        pair.run { pair.ra.up && pair.rb.up }
        // Without running the loop nothing leaves the queue.
        for i in 0...PeerConnection.queueCapacity { pair.a.send(.pingAck(id: UInt64(i))) }
        #expect(pair.ra.down?.contains("send queue full") == true, "reason: \(pair.ra.down ?? "none")")
        pair.a.send(.ping(id: 1))
        pair.a.sendEncoded(PeerMessage.ping(id: 2).encoded())
    }

    /// Back-pressure: a paused link hands over no frame until it is resumed, and loses none.
    @Test func aPausedLinkHoldsFramesUntilResumed() throws {
        let pair = try LinkPair(engine: .uring)
        defer { pair.cleanup() }
        pair.run { pair.ra.up && pair.rb.up }
        pair.rb.pauseAfterEach = true
        for i in 0..<50 { pair.a.send(.ping(id: UInt64(i))) }
        pair.run { pair.rb.frames.count >= 1 }
        for _ in 0..<20 { pair.loop.runOnce(timeoutNanos: 1_000_000) }
        #expect(pair.rb.frames.count == 1 && pair.b.receivingPaused)
        pair.b.resumeReceiving()
        #expect(pair.rb.frames.count == 2, "the next frame already received is handed over at once")
        pair.rb.pauseAfterEach = false
        pair.b.resumeReceiving()
        pair.run { pair.rb.frames.count == 50 }
        #expect(pair.rb.frames.map(\.0.sequence) == (0..<50).map(UInt64.init), "in order, none lost")
        #expect(pair.rb.down == nil)
    }
}
