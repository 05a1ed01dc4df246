import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO

/// What a `PeerConnection` tells its owner.
protocol PeerConnectionDelegate: AnyObject {
    /// TLS is up and the peer's certificate verified (CA and expected name).
    func peerConnectionUp(_ connection: PeerConnection)
    /// A whole frame whose header and payload checksums matched. `payload` is valid only during
    /// the call: the owner copies what it keeps.
    func peerConnection(_ connection: PeerConnection, received header: PeerHeader, payload: UnsafeRawBufferPointer)
    /// A block frame's payload has been encrypted: its buffer may be reused.
    func peerConnection(_ connection: PeerConnection, releasedPayload token: UInt64)
    /// The link is gone (closed, failed verification, protocol error); nothing more will come.
    func peerConnectionDown(_ connection: PeerConnection, reason: String)
    /// A large block frame's header arrived: where to decrypt its payload straight to (the
    /// owner's buffer of `header.payloadLength` bytes, handed back as the payload of the
    /// `received` call), or nil to receive it in the link's own buffer and copy it.
    func peerConnection(_ connection: PeerConnection, sinkFor header: PeerHeader) -> UnsafeMutableRawPointer?
}

extension PeerConnectionDelegate {
    /// By default every payload arrives in the link's buffer.
    func peerConnection(_ connection: PeerConnection, sinkFor header: PeerHeader) -> UnsafeMutableRawPointer? { nil }
}

/// One replication link (Protocol/peer.md) on the event loop: TLS 1.3 with mutual certificate
/// verification against the resource's CA and the expected peer name, then frames.
///
/// Received ciphertext is decrypted into `input`, which holds at least one largest frame, and
/// whole frames are handed to the delegate after their checksums pass. Frames to send wait in a
/// bounded queue (control frames as encoded bytes; block frames as a 56-byte header plus the
/// owner's payload buffer, not copied until TLS encrypts it) and leave in order.
final class PeerConnection: IOHandler {
    private enum Item {
        case control([UInt8])
        /// A frame whose header (or whole small frame) sits in header slot `header`, followed by
        /// `length` bytes from the owner's `payload`; `token` (if any) is released after.
        case block(header: Int, headerLength: Int, payload: UnsafeRawPointer?, length: Int, token: UInt64?)
    }

    private static let tagRecv: UInt32 = 1
    private static let tagSend: UInt32 = 2
    /// Frames queued to send at once (Limits.peerSendQueueFramesMax).
    static let queueCapacity = Limits.peerSendQueueFramesMax
    private static let headerSlotBytes = 64

    let loop: IOLoop
    let fd: Int32
    let peerName: String
    private(set) var id: UInt32 = 0
    private weak var delegate: (any PeerConnectionDelegate)?
    private let tls: TLSSession
    private var up = false
    private var closing = false
    private var finished = false
    private var opsInFlight = 0

    private let cipherIn: UnsafeMutableRawPointer
    private let cipherOut: UnsafeMutableRawPointer
    /// One small frame (header and payload) gathered into a single TLS record.
    private let recordStage: UnsafeMutableRawPointer
    private let cipherBytes = Limits.tlsCiphertextBufferBytes
    private var cipherOutLength = 0
    private var cipherOutSent = 0
    private var recvPosted = false
    private var sendPosted = false
    private var tlsWantsCiphertext = true
    /// The owner holds as many of the peer's requests as it may (back-pressure): no frame is
    /// handed over and nothing more is received until `resumeReceiving`.
    private(set) var receivingPaused = false
    /// Set by `closeAfterSending`: close with this reason once the queue is sent.
    private var closeWhenSent: String?
    /// A frame whose payload is being decrypted into the owner's buffer.
    /// Its checksum runs as the plaintext lands, while the bytes are still in the cache.
    private var sink: (header: PeerHeader, destination: UnsafeMutableRawPointer, filled: Int, crc: CRC32C)?
    /// Payloads at least this big go to a sink (smaller ones are cheaper to copy).
    static let sinkBytesMin = 64 * 1024

    private let input: UnsafeMutableRawPointer
    private let inputCapacity = PeerProtocol.frameBytesMax + Limits.tlsCiphertextBufferBytes
    private var inStart = 0
    private var inEnd = 0

    private var queue = FixedQueue<Item>(capacity: PeerConnection.queueCapacity)
    private let headerSlots: UnsafeMutableRawPointer
    private var freeHeaderSlots: [Int]
    /// Payload bytes of the head block frame already encrypted, and whether its header was.
    private var headOffset = 0
    private var headHeaderSent = false
    private let iov: UnsafeMutablePointer<iovec>
    private let message: UnsafeMutablePointer<msghdr>

    init(loop: IOLoop, fd: Int32, context: TLSContext, expectedPeerName: String, delegate: any PeerConnectionDelegate) {
        self.loop = loop
        self.fd = fd
        self.peerName = expectedPeerName
        self.delegate = delegate
        tls = TLSSession(context: context, expectedPeerName: expectedPeerName, recordOffload: true)
        cipherIn = allocateAligned(cipherBytes)
        cipherOut = allocateAligned(cipherBytes)
        recordStage = allocateAligned(Limits.tlsRecordPlaintextMax)
        input = allocateAligned(inputCapacity)
        headerSlots = allocateAligned(Self.queueCapacity * Self.headerSlotBytes)
        freeHeaderSlots = Array((0..<Self.queueCapacity).reversed())
        iov = .allocate(capacity: 1)
        message = .allocate(capacity: 1)
        message.initialize(to: msghdr())
        id = loop.register(self)
    }

    deinit {
        freeAligned(cipherIn, cipherBytes)
        freeAligned(cipherOut, cipherBytes)
        freeAligned(recordStage, Limits.tlsRecordPlaintextMax)
        freeAligned(input, inputCapacity)
        freeAligned(headerSlots, Self.queueCapacity * Self.headerSlotBytes)
        iov.deallocate()
        message.deallocate()
    }

    /// The name in the peer's verified certificate (a witness accepts either data node).
    var certificateName: String { tls.peerName }
    /// "TLS_AES_128_GCM_SHA256, records sealed in Tandem" (for the log).
    var tlsDescription: String { "\(tls.version) \(tls.cipher)\(tls.recordsOffloaded ? ", records sealed and opened in Tandem" : "")" }

    /// Starts the TLS handshake (the client side speaks first; both sides just pump).
    func start() {
        pumpHandshake()
        postRecv()
    }

    /// Queues a control message. Small ones (acks, pings, barriers: the per-write traffic) are
    /// encoded into a header slot, so they allocate nothing.
    ///
    /// A `lazy` message does not start a send of its own: it waits in order for the next message
    /// that does (or `flushLazy`). Each send to the peer wakes it, and in a virtual machine a
    /// wake-up across cores costs tens of microseconds; a message nobody waits for rides along.
    func send(_ message: PeerMessage, lazy: Bool = false) {
        guard !closing, roomToQueue() else { return }
        let bytes = message.frameBytes
        guard bytes <= Self.headerSlotBytes, let slot = freeHeaderSlots.popLast() else { return sendControl(message) }
        message.encode(into: UnsafeMutableRawBufferPointer(start: headerSlots + slot * Self.headerSlotBytes, count: Self.headerSlotBytes))
        queue.push(.block(header: slot, headerLength: bytes, payload: nil, length: 0, token: nil))
        if lazy && queue.count < Self.lazyQueuedMax { return }
        loop.callAtBatchEnd(id)
    }

    /// Sends lazy messages still waiting (called on the node's tick, so none waits long).
    func flushLazy() {
        if !queue.isEmpty && !closing { loop.callAtBatchEnd(id) }
    }

    /// Past this many queued items a lazy message sends at once.
    static let lazyQueuedMax = 64

    /// Queues bytes that are already one or more encoded frames (tests inject raw frames here).
    func sendEncoded(_ bytes: [UInt8]) {
        guard !closing, roomToQueue() else { return }
        queue.push(.control(bytes))
        loop.callAtBatchEnd(id)
    }

    /// Queues a large control message. Messages queued back to back share one item up to
    /// `controlItemBytesMax`, so a burst of any length (a bitmap is thousands of chunks; a 1 TiB
    /// one is 32 MiB) fits the bounded queue: once the queue overflowed with one item per chunk.
    private func sendControl(_ message: PeerMessage) {
        guard !closing else { return }
        var bytes: [UInt8] = []
        if case .control(let last)? = queue.last, last.count + message.frameBytes <= Self.controlItemBytesMax {
            // A control item goes to TLS whole, never half, so the newest one may still grow.
            // Taken off the queue first, so the array is uniquely referenced and grows in place.
            guard case .control(let taken)? = queue.popLast() else { preconditionFailure() }
            bytes = taken
        } else if !roomToQueue() {
            return
        }
        message.encode(appendingTo: &bytes)
        queue.push(.control(bytes))
        loop.callAtBatchEnd(id)
    }

    static let controlItemBytesMax = 1 << 20

    /// Whether one more item fits the send queue. A full queue means the peer stopped reading:
    /// everything the node has in flight fits it (`queueCapacity`), so only answers to a peer
    /// that keeps sending (pings, requests) and never reads fill it. Such a peer is dead to us:
    /// the link closes (the node reconnects), rather than stop reading ourselves, which would
    /// leave both sides waiting on each other until the peer timeout.
    private func roomToQueue() -> Bool {
        guard queue.isFull else { return true }
        close(reason: "protocol error: send queue full (\(queue.capacity) frames): the peer does not read what it is sent")
        return false
    }

    /// Queues a block frame whose payload stays in the owner's buffer until
    /// `releasedPayload(token)`.
    func sendBlock(type: PeerMessageType, flags: UInt16, sequence: UInt64, block: PeerBlock, payload: UnsafeRawPointer?, token: UInt64) {
        guard !closing, roomToQueue() else { return }
        let length = block.payloadLength(type: type, flags: flags)
        let crc = length == 0 ? 0 : PeerEncoder.payloadCRC(UnsafeRawBufferPointer(start: payload, count: length))
        let slot = freeHeaderSlots.popLast()!
        let bytes = PeerEncoder.encodeBlockHeader(type: type, flags: flags, sequence: sequence, block: block, payloadCRC: crc, into: headerSlots + slot * Self.headerSlotBytes)
        precondition(bytes == PeerProtocol.blockHeaderBytes)
        queue.push(.block(header: slot, headerLength: bytes, payload: payload, length: length, token: token))
        loop.callAtBatchEnd(id)
    }

    func ioBatchEnded() { flush() }

    func ioCompleted(tag: UInt32, result: Int32) {
        opsInFlight -= 1
        switch tag {
        case Self.tagRecv:
            recvPosted = false
            if !closing { received(result) }
        case Self.tagSend:
            sendPosted = false
            if !closing {
                if result < 0 {
                    close(reason: "send failed: \(SystemError.text(-result))")
                } else {
                    cipherOutSent += Int(result)
                    flush()
                }
            }
        default:
            preconditionFailure("PeerConnection: unknown tag \(tag)")
        }
        if closing { finishIfDone() }
    }

    // MARK: Receiving

    /// Stops handing frames to the delegate after the current one, and receiving ciphertext:
    /// the peer's frames wait in its send queue and the sockets (Limits.peerRequestsPendingMax).
    func pauseReceiving() {
        receivingPaused = true
    }

    /// Hands over the frames already received, then receives again. Not to be called from
    /// within the delegate's `received`.
    func resumeReceiving() {
        guard receivingPaused else { return }
        receivingPaused = false
        guard up, !closing else { return }
        readFrames()
    }

    private func received(_ result: Int32) {
        guard result > 0 else {
            return close(reason: result == 0 ? "peer closed the connection" : "receive failed: \(SystemError.text(-result))")
        }
        // OpenSSL reads the ciphertext where it landed; `postRecv` takes back what it left.
        guard tls.feedInPlace(cipherIn, Int(result)) else { return close(reason: "TLS: cannot buffer ciphertext") }
        tlsWantsCiphertext = false
        if !up {
            pumpHandshake()
            if !up || closing { return postRecv() }
        }
        readFrames()
    }

    private func pumpHandshake() {
        switch tls.handshake() {
        case .ok:
            guard tls.version == "TLSv1.3" else { return close(reason: "peer negotiated \(tls.version); the replication link needs TLS 1.3") }
            up = true
            tlsWantsCiphertext = true
            flush()
            delegate?.peerConnectionUp(self)
        case .wantMore:
            tlsWantsCiphertext = true
            flush()
        case .closed, .failed:
            let why = tls.lastError
            flush()
            close(reason: "TLS with \(peerName) failed: \(why)")
        }
    }

    /// Decrypts what TLS holds and hands every whole frame to the delegate.
    private func readFrames() {
        while !closing && !receivingPaused {
            if inEnd == inputCapacity || (inStart > 0 && inputCapacity - inEnd < Limits.tlsCiphertextBufferBytes) {
                input.copyMemory(from: input + inStart, byteCount: inEnd - inStart)
                inEnd -= inStart
                inStart = 0
            }
            var progressed = false
            if let current = sink {
                let (n, status) = tls.read(into: current.destination + current.filled, count: current.header.payloadLength - current.filled)
                switch status {
                case .ok:
                    progressed = true
                    sink!.crc.update(UnsafeRawBufferPointer(start: current.destination + current.filled, count: n))
                    sink!.filled += n
                    if sink!.filled == current.header.payloadLength {
                        let crc = sink!.crc.value
                        sink = nil
                        let payload = UnsafeRawBufferPointer(start: current.destination, count: current.header.payloadLength)
                        guard crc == current.header.payloadCRC else { return close(reason: "protocol error: payload checksum mismatch in \(current.header.type)") }
                        delegate?.peerConnection(self, received: current.header, payload: payload)
                    }
                    continue
                case .wantMore:
                    tlsWantsCiphertext = true
                    break
                case .closed:
                    return close(reason: "peer closed the TLS session")
                case .failed:
                    return close(reason: "TLS: \(tls.lastError)")
                }
                break
            }
            if inEnd < inputCapacity {
                let (n, status) = tls.read(into: input + inEnd, count: inputCapacity - inEnd)
                switch status {
                case .ok:
                    inEnd += n
                    progressed = true
                case .wantMore:
                    tlsWantsCiphertext = true
                case .closed:
                    return close(reason: "peer closed the TLS session")
                case .failed:
                    return close(reason: "TLS: \(tls.lastError)")
                }
            }
            while !closing && !receivingPaused {
                let available = UnsafeRawBufferPointer(start: input + inStart, count: inEnd - inStart)
                switch PeerDecoder.decodeHeader(available) {
                case .needMore:
                    break
                case .invalid(let why):
                    return close(reason: "protocol error: \(why)")
                case .header(let header):
                    if available.count < header.frameBytes, header.payloadLength >= Self.sinkBytesMin,
                       let destination = delegate?.peerConnection(self, sinkFor: header) {
                        // The rest of the payload is decrypted straight into the owner's buffer.
                        let have = available.count - header.headerBytes
                        destination.copyMemory(from: available.baseAddress! + header.headerBytes, byteCount: have)
                        inStart = inEnd
                        var crc = CRC32C()
                        crc.update(UnsafeRawBufferPointer(start: destination, count: have))
                        sink = (header, destination, have, crc)
                        break
                    }
                    guard available.count >= header.frameBytes else { break }
                    let payload = UnsafeRawBufferPointer(rebasing: available[header.headerBytes..<header.frameBytes])
                    guard header.verifyPayload(payload) else { return close(reason: "protocol error: payload checksum mismatch in \(header.type)") }
                    inStart += header.frameBytes
                    delegate?.peerConnection(self, received: header, payload: payload)
                    continue
                }
                break
            }
            if inStart == inEnd {
                inStart = 0
                inEnd = 0
            }
            if !progressed { break }
        }
        postRecv()
    }

    private func postRecv() {
        guard !recvPosted, !closing, !receivingPaused, tlsWantsCiphertext else { return }
        guard tls.releaseInput() else { return close(reason: "TLS: cannot buffer ciphertext") }
        recvPosted = true
        opsInFlight += 1
        loop.engine.recv(fd: fd, buffer: cipherIn, length: cipherBytes, waitAll: false, userData: IOLoop.userData(id, Self.tagRecv))
    }

    // MARK: Sending

    /// Encrypts queued frames (bounded per round) and sends the ciphertext, one send at a time.
    private func flush() {
        guard !sendPosted, !closing else { return }
        if cipherOutSent < cipherOutLength { return postSend() }
        cipherOutLength = 0
        cipherOutSent = 0
        if up && tls.pendingOutput < cipherBytes / 2 {
            cipherOutLength = tls.takeOutput(into: cipherOut, count: cipherBytes)
            // Records are encrypted straight into the send buffer (a record that does not fit
            // waits in TLS's queue); the budget leaves room for the last one to overshoot.
            tls.setOutputWindow(cipherOut + cipherOutLength, capacity: cipherBytes - cipherOutLength)
            defer { cipherOutLength += tls.closeOutputWindow() }
            var budget = cipherBytes / 2
            while budget > 0, let head = queue.first {
                switch head {
                case .control(let bytes):
                    guard bytes.withUnsafeBytes({ tls.write($0.baseAddress!, count: $0.count) }) else { return close(reason: "TLS: \(tls.lastError)") }
                    budget -= bytes.count
                    queue.pop()
                case .block(let slot, let headerLength, let payload, let length, let token):
                    if !headHeaderSent && length > 0 && headerLength + length <= Limits.tlsRecordPlaintextMax {
                        // A small frame goes as one record: copying 4 KiB costs less than a
                        // second record's seal here and open on the peer.
                        recordStage.copyMemory(from: headerSlots + slot * Self.headerSlotBytes, byteCount: headerLength)
                        (recordStage + headerLength).copyMemory(from: payload!, byteCount: length)
                        guard tls.write(recordStage, count: headerLength + length) else { return close(reason: "TLS: \(tls.lastError)") }
                        budget -= headerLength + length
                        queue.pop()
                        freeHeaderSlots.append(slot)
                        if let token { delegate?.peerConnection(self, releasedPayload: token) }
                        continue
                    }
                    if !headHeaderSent {
                        guard tls.write(headerSlots + slot * Self.headerSlotBytes, count: headerLength) else { return close(reason: "TLS: \(tls.lastError)") }
                        headHeaderSent = true
                        budget -= headerLength
                    }
                    // One TLS record at a time, its ciphertext put straight into the send buffer:
                    // OpenSSL's memory BIO slows down badly when ciphertext piles up in it
                    // (Benchmarks/TLSRecord).
                    let n = min(length - headOffset, max(budget, 0), Limits.tlsRecordPlaintextMax)
                    if n > 0 {
                        guard tls.write(payload! + headOffset, count: n) else { return close(reason: "TLS: \(tls.lastError)") }
                        headOffset += n
                        budget -= n
                    }
                    if headOffset == length {
                        headOffset = 0
                        headHeaderSent = false
                        queue.pop()
                        freeHeaderSlots.append(slot)
                        if let token { delegate?.peerConnection(self, releasedPayload: token) }
                    }
                }
            }
        }
        cipherOutLength += tls.takeOutput(into: cipherOut + cipherOutLength, count: cipherBytes - cipherOutLength)
        if cipherOutLength > 0 {
            postSend()
        } else if let reason = closeWhenSent, queue.isEmpty {
            close(reason: reason)
        }
    }

    /// Closes once everything queued is on the wire (a `disconnect` message the peer must read
    /// before the link goes). A link that cannot drain is closed by the peer timeout.
    func closeAfterSending(reason: String) {
        guard !closing, closeWhenSent == nil else { return }
        closeWhenSent = reason
        if up { loop.callAtBatchEnd(id) } else { close(reason: reason) }
    }

    private func postSend() {
        iov.pointee = iovec(iov_base: cipherOut + cipherOutSent, iov_len: cipherOutLength - cipherOutSent)
        message.pointee.msg_iov = iov
        message.pointee.msg_iovlen = 1
        sendPosted = true
        opsInFlight += 1
        loop.engine.sendmsg(fd: fd, message: message, userData: IOLoop.userData(id, Self.tagSend))
    }

    // MARK: Closing

    func close(reason: String) {
        guard !closing else { return }
        closing = true
        shutdown(fd, Int32(SHUT_RDWR))
        // Payloads still queued are no longer needed by this link.
        while let item = queue.pop() {
            if case .block(let slot, _, _, _, let token) = item {
                freeHeaderSlots.append(slot)
                if let token { delegate?.peerConnection(self, releasedPayload: token) }
            }
        }
        headOffset = 0
        headHeaderSent = false
        delegate?.peerConnectionDown(self, reason: reason)
        finishIfDone()
    }

    private func finishIfDone() {
        guard closing, opsInFlight == 0, !finished else { return }
        finished = true
        closeDescriptor(fd)
        loop.unregister(id)
    }
}
