import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO
import TandemNBD

/// One NBD client: handshake, optional TLS, then transmission with many requests in flight and
/// replies in completion order.
///
/// Bytes arrive in `input` (plaintext, straight from recv or out of TLS). Requests are parsed
/// there; a WRITE's payload goes into a pool buffer, by copy for what already arrived and by recv
/// straight into the buffer for the rest. Each request holds a slot (its buffer, its reply header)
/// from parsing until its reply is sent. Replies queue in completion order and leave in batches:
/// one sendmsg with many iovecs (header, data, header, ...). Nothing here allocates per request.
final class NBDConnection: IOHandler {
    private enum Phase: Equatable { case handshake, tlsHandshake, transmission }

    private enum SlotState: UInt8 { case free, payload, disk, reply }

    private enum WindowState: UInt8 { case none, waiting, counted }

    private struct Slot {
        var state = SlotState.free
        var request = NBDRequest(flags: 0, type: 0, cookie: 0, offset: 0, length: 0)
        var buffer: PoolBuffer?
        /// Bytes of a read or write (or zero-fill) done so far (short transfers are resubmitted).
        var done = 0
        var headerLength = 0
        var dataLength = 0
        /// An fdatasync must follow the current operation (FUA on TRIM/WRITE_ZEROES).
        var syncAfter = false
        var syncing = false
        /// WRITE_ZEROES emulated by writing zeros (the device cannot zero a range by itself).
        var zeroFill = false
        /// A large READ of cached pages: waiting for room in the read window, or counted in it
        /// (see `largeReadIsCached`).
        var window = WindowState.none
    }

    private static let tagRecv: UInt32 = 0x1000_0000
    private static let tagSend: UInt32 = 0x1000_0001
    private static let tagHandshakeTimer: UInt32 = 0x1000_0002

    unowned let server: NBDServer
    let loop: IOLoop
    let fd: Int32
    let peer: String
    private(set) var id: UInt32 = 0
    private var logger: Logger

    private var phase = Phase.handshake
    private var handshake: NBDHandshake
    private var session: NBDSession?
    private var tls: TLSSession?
    private var startTLSAfterSend = false
    /// SSL_read last asked for more ciphertext (so posting a recv will not overfill the BIO).
    private var tlsWantsCiphertext = true

    // Input.
    private let input: UnsafeMutableRawPointer
    private let inputCapacity = Limits.nbdReceiveBufferBytes
    private var inStart = 0
    private var inEnd = 0
    private var recvPosted = false
    private var recvDirect = false
    /// The last request parsed was a WRITE of `largeWriteBytes` or more: the next receive into
    /// `input` asks for `receiveAfterLargeWriteBytes` only (see `postRecv`).
    private var largeWriteLast = false
    static let largeWriteBytes = 64 * 1024
    static let receiveAfterLargeWriteBytes = 4096
    private var cipherIn: UnsafeMutableRawPointer?
    private var cipherOut: UnsafeMutableRawPointer?
    private var cipherOutLength = 0
    private var cipherOutSent = 0

    // Requests.
    private var slots: [Slot]
    private var freeSlots: [Int32]
    private let headers: UnsafeMutableRawPointer
    private var payloadSlot: Int32 = -1
    private var skipRemaining = 0
    /// The refused request whose payload is being skipped: answered once it has all been read.
    private var skipReply: (slot: Int32, error: NBD.Errno)?
    private var waitingForBuffer = false
    private var bufferBytesHeld = 0
    private var runs: [(length: UInt32, flags: UInt32)] = []
    /// BLOCK_STATUS chunks being encoded (allocated at the first request that needs it).
    private var blockStatusScratch: UnsafeMutableRawPointer?
    static let blockStatusScratchBytes = Limits.nbdMetaContextQueriesMax * (24 + 8 * Limits.nbdBlockStatusExtentsMax)

    // Output.
    private var replies: FixedQueue<Int32>
    private var control: [UInt8] = []
    private var controlSent = 0
    private var sendPosted = false
    private let iov: UnsafeMutablePointer<iovec>
    private let iovCapacity = 2 * Limits.nbdRepliesPerSendMax + 1
    private var iovCount = 0
    private var iovIndex = 0
    private let message: UnsafeMutablePointer<msghdr>
    private var sendingControlBytes = 0
    private var sendingReplies = 0
    /// TLS: bytes of the head reply already encrypted.
    private var tlsReplyOffset = 0

    /// Bytes of the windowed READs started and not yet answered, and the windowed READs parsed
    /// but not started yet (in arrival order; they hold a slot and a buffer but touch neither).
    private var readWindowUsed = 0
    private var readWindowQueue: FixedQueue<Int32>
    /// READs, large READs through the window, and large READs outside it because the page cache
    /// lacked part of their range (for the closing line).
    private var reads: UInt64 = 0
    private var windowedReads: UInt64 = 0
    private var largeReadsNotCached: UInt64 = 0

    // Lifecycle.
    private var opsInFlight = 0
    private var closing = false
    private var closeAfterSendReason: String?
    private var disconnectRequested = false
    private var finished = false

    /// Buffer bytes one connection may hold, so a client that never reads its replies cannot
    /// take the whole pool from the others.
    static let bufferBytesHeldMax = 96 << 20

    init(server: NBDServer, fd: Int32, peer: String) {
        self.server = server
        self.loop = server.loop
        self.fd = fd
        self.peer = peer
        var logger = server.logger
        logger[metadataKey: "client"] = "\(peer)"
        if let spread = server.spread { logger[metadataKey: "loop"] = "\(spread.index)" }
        self.logger = logger
        handshake = NBDHandshake(exports: [server.configuration.export], tlsMode: server.configuration.tlsMode)
        input = allocateAligned(inputCapacity)
        let slotCount = Limits.nbdRequestsInFlightMax
        slots = Array(repeating: Slot(), count: slotCount)
        freeSlots = (0..<Int32(slotCount)).reversed()
        headers = allocateAligned(slotCount * NBDTransmission.replyHeaderBytesMax)
        replies = FixedQueue(capacity: slotCount)
        readWindowQueue = FixedQueue(capacity: slotCount)
        iov = .allocate(capacity: iovCapacity)
        message = .allocate(capacity: 1)
        message.initialize(to: msghdr())
        runs.reserveCapacity(Limits.nbdBlockStatusExtentsMax)
        id = loop.register(self)
    }

    deinit {
        freeAligned(input, inputCapacity)
        freeAligned(headers, Limits.nbdRequestsInFlightMax * NBDTransmission.replyHeaderBytesMax)
        if let cipherIn { freeAligned(cipherIn, Limits.tlsCiphertextBufferBytes) }
        if let cipherOut { freeAligned(cipherOut, Limits.tlsCiphertextBufferBytes) }
        if let blockStatusScratch { freeAligned(blockStatusScratch, Self.blockStatusScratchBytes) }
        iov.deallocate()
        message.deallocate()
    }

    func start() {
        queueControl(NBDHandshake.greeting())
        loop.addTimer(id: id, tag: Self.tagHandshakeTimer, afterNanos: UInt64(Limits.nbdHandshakeTimeoutSeconds) * 1_000_000_000)
        flushSend()
        postRecv()
    }

    // MARK: Completions

    func ioCompleted(tag: UInt32, result: Int32) {
        switch tag {
        case Self.tagRecv:
            opsInFlight -= 1
            recvPosted = false
            received(result)
        case Self.tagSend:
            opsInFlight -= 1
            sendPosted = false
            sent(result)
        case Self.tagHandshakeTimer:
            if phase != .transmission { close(reason: "handshake not finished within \(Limits.nbdHandshakeTimeoutSeconds) s") }
        default:
            opsInFlight -= 1
            diskCompleted(Int32(tag), result)
        }
        if closing { finishIfDone() }
    }

    func ioBatchEnded() {
        if !closing { flushSend() }
    }

    private func received(_ result: Int32) {
        let wasDirect = recvDirect
        recvDirect = false
        if closing { return }
        if result <= 0 {
            if result == 0 || result == -ECONNRESET {
                close(reason: phase == .transmission && !disconnectRequested ? "client disconnected without NBD_CMD_DISC" : "client disconnected")
            } else {
                close(reason: "receive failed: \(SystemError.text(-result))")
            }
            return
        }
        if wasDirect {
            slots[Int(payloadSlot)].done += Int(result)
        } else if let tls {
            // TLS reads the ciphertext where it landed; `postRecv` takes back what it left.
            guard tls.feedInPlace(cipherIn!, Int(result)) else { return close(reason: "TLS: cannot buffer ciphertext") }
            tlsWantsCiphertext = false
            if phase == .tlsHandshake { return driveTLSHandshake() }
        } else {
            inEnd += Int(result)
        }
        processInput()
    }

    // MARK: Input

    /// Parses and starts everything the received bytes allow, then keeps a receive posted.
    private func processInput() {
        while !closing {
            if skipRemaining > 0 {
                let n = min(skipRemaining, inEnd - inStart)
                inStart += n
                skipRemaining -= n
                if skipRemaining > 0 {
                    if pullTLS() { continue }
                    break
                }
                if let (slot, error) = skipReply {
                    skipReply = nil
                    reply(slot, error: error)
                }
            }
            if payloadSlot >= 0 {
                if !fillPayload() {
                    if pullTLS() { continue }
                    break
                }
                continue
            }
            let available = UnsafeRawBufferPointer(start: input + inStart, count: inEnd - inStart)
            if phase == .handshake {
                if closeAfterSendReason != nil { break }
                let (consumed, action) = handshake.receive(available)
                inStart += consumed
                if !handle(action) {
                    if action == .needMore && (consumed > 0 || pullTLS()) { continue }
                    break
                }
                continue
            }
            if phase != .transmission || disconnectRequested { break }
            if available.count < NBD.requestHeaderBytes {
                if pullTLS() { continue }
                break
            }
            if freeSlots.isEmpty || waitingForBuffer { break }
            switch NBDTransmission.decode(available) {
            case .needMore:
                preconditionFailure("decode wanted more than a header")
            case .invalid(let why):
                return close(reason: why)
            case .request(let request):
                guard start(request) else { break }
                inStart += NBD.requestHeaderBytes
                continue
            }
            break
        }
        // A receive in flight writes at `inEnd`: the buffer may only move when none is.
        if !receivingIntoInput {
            if inStart == inEnd {
                inStart = 0
                inEnd = 0
            } else if inStart > inputCapacity / 2 {
                input.copyMemory(from: input + inStart, byteCount: inEnd - inStart)
                inEnd -= inStart
                inStart = 0
            }
        }
        postRecv()
        loop.callAtBatchEnd(id)
    }

    /// Whether a plaintext receive into `input` is in flight (then `input` must not move).
    private var receivingIntoInput: Bool { recvPosted && !recvDirect && tls == nil }

    /// TLS only: decrypts buffered ciphertext into `input`. True when it produced bytes.
    private func pullTLS() -> Bool {
        guard let tls, phase != .tlsHandshake else { return false }
        if inStart == inEnd {
            inStart = 0
            inEnd = 0
        } else if inEnd == inputCapacity {
            input.copyMemory(from: input + inStart, byteCount: inEnd - inStart)
            inEnd -= inStart
            inStart = 0
        }
        guard inEnd < inputCapacity else { return false }
        // A WRITE's payload, with nothing of it parsed yet in `input`, is decrypted straight into
        // its buffer (as a plain connection receives it there).
        let direct = payloadSlot >= 0 && inStart == inEnd
        let (n, status) = direct
            ? tls.read(into: slots[Int(payloadSlot)].buffer!.pointer + slots[Int(payloadSlot)].done,
                       count: Int(slots[Int(payloadSlot)].request.length) - slots[Int(payloadSlot)].done)
            : tls.read(into: input + inEnd, count: inputCapacity - inEnd)
        switch status {
        case .ok:
            if direct {
                slots[Int(payloadSlot)].done += n
            } else {
                inEnd += n
            }
            return true
        case .wantMore:
            tlsWantsCiphertext = true
            return false
        case .closed:
            close(reason: "client closed the TLS session")
            return false
        case .failed:
            close(reason: "TLS: \(tls.lastError)")
            return false
        }
    }

    /// Copies buffered payload into the pending WRITE; submits it when complete. False when more
    /// bytes are needed.
    private func fillPayload() -> Bool {
        let index = Int(payloadSlot)
        let length = Int(slots[index].request.length)
        let n = min(length - slots[index].done, inEnd - inStart)
        if n > 0 {
            slots[index].buffer!.pointer.advanced(by: slots[index].done).copyMemory(from: input + inStart, byteCount: n)
            slots[index].done += n
            inStart += n
        }
        guard slots[index].done == length else { return false }
        payloadSlot = -1
        slots[index].done = 0
        slots[index].state = .disk
        if let replicator = server.replicator {
            opsInFlight += 1
            replicator.clientRequest(self, slot: index, slots[index].request)
            return true
        }
        submitWrite(index)
        return true
    }

    private func postRecv() {
        guard !recvPosted, !closing, closeAfterSendReason == nil, !(phase == .transmission && disconnectRequested && payloadSlot < 0 && skipRemaining == 0) else { return }
        if startTLSAfterSend { return }
        if tls != nil {
            // Only ask for ciphertext once OpenSSL has consumed what it has (bounds its buffer).
            guard tlsWantsCiphertext || phase == .tlsHandshake else { return }
            guard tls!.releaseInput() else { return close(reason: "TLS: cannot buffer ciphertext") }
            recvPosted = true
            opsInFlight += 1
            loop.engine.recv(fd: fd, buffer: cipherIn!, length: Limits.tlsCiphertextBufferBytes, waitAll: false, userData: IOLoop.userData(id, Self.tagRecv))
            return
        }
        if payloadSlot >= 0 && inStart == inEnd {
            let index = Int(payloadSlot)
            let remaining = Int(slots[index].request.length) - slots[index].done
            if remaining >= 16 * 1024 {
                recvDirect = true
                recvPosted = true
                opsInFlight += 1
                loop.engine.recv(fd: fd, buffer: slots[index].buffer!.pointer + slots[index].done, length: remaining, waitAll: true, userData: IOLoop.userData(id, Self.tagRecv))
                return
            }
        }
        if inEnd == inputCapacity {
            guard inStart > 0 else { return }  // full of unparsed requests: parsing resumes first
            input.copyMemory(from: input + inStart, byteCount: inEnd - inStart)
            inEnd -= inStart
            inStart = 0
        }
        // After a large WRITE the next request is likely one too: receiving a header and a little
        // more here leaves its payload to be received straight into its slot's buffer, where a
        // full-size receive would take up to 256 KiB of it into `input` to be copied out again
        // (3.3% of a replicating primary's samples under 1 MiB writes).
        let room = inputCapacity - inEnd
        recvPosted = true
        opsInFlight += 1
        loop.engine.recv(fd: fd, buffer: input + inEnd, length: largeWriteLast ? min(room, Self.receiveAfterLargeWriteBytes) : room,
                         waitAll: false, userData: IOLoop.userData(id, Self.tagRecv))
    }

    // MARK: Handshake

    /// Carries out a handshake action; false when processing must stop for now.
    private func handle(_ action: NBDHandshake.Action) -> Bool {
        switch action {
        case .needMore:
            return false
        case .send(let bytes):
            queueControl(bytes)
            return true
        case .sendThenStartTLS(let bytes):
            queueControl(bytes)
            if inStart != inEnd {
                // Plaintext sent after STARTTLS would be trusted as if it came over TLS.
                closeAfterSend(reason: "client sent data after STARTTLS before the TLS handshake")
                return false
            }
            startTLSAfterSend = true
            return false
        case .enterTransmission(let bytes, let session):
            queueControl(bytes)
            self.session = session
            phase = .transmission
            loop.cancelTimers(id: id, tag: Self.tagHandshakeTimer)
            logger.info("NBD client \(peer) attached to export \"\(session.export.name)\"\(tls.map { " over \($0.version) \($0.cipher)\($0.recordsOffloaded ? " (records sealed here)" : "")" } ?? "")\(session.structuredReplies ? ", structured replies" : "")")
            if server.refusingRequests { serverShuttingDown() }
            return true
        case .close(let bytes, let reason):
            queueControl(bytes)
            closeAfterSend(reason: reason)
            return false
        }
    }

    private func startTLS() {
        guard let context = server.tlsContext else { preconditionFailure("STARTTLS accepted without a TLS context") }
        startTLSAfterSend = false
        tls = TLSSession(context: context, recordOffload: true)
        cipherIn = allocateAligned(Limits.tlsCiphertextBufferBytes)
        cipherOut = allocateAligned(Limits.tlsCiphertextBufferBytes)
        phase = .tlsHandshake
        postRecv()
    }

    private func driveTLSHandshake() {
        guard let tls else { return }
        switch tls.handshake() {
        case .ok:
            phase = .handshake
            handshake.tlsEstablished()
            logger.debug("TLS \(tls.version) with \(peer)\(tls.peerName.isEmpty ? "" : " (\(Printable.quoted(tls.peerName)))")")
            tlsWantsCiphertext = false
            flushSend()
            processInput()
        case .wantMore:
            tlsWantsCiphertext = true
            flushSend()
            postRecv()
        case .closed, .failed:
            logger.warning("TLS handshake with \(peer) failed: \(tls.lastError)")
            // Send the alert OpenSSL produced, then close.
            closeAfterSend(reason: "TLS handshake failed")
            flushSend()
        }
    }

    // MARK: Requests

    /// Starts one request. False when it has to wait for a buffer (the header stays unread).
    private func start(_ request: NBDRequest) -> Bool {
        let session = self.session!
        var error = NBDTransmission.validate(request, session)
        if error == .ok && server.refusingRequests && request.command != .disconnect { error = .shutdown }
        if error != .ok {
            logger.debug("request \(request.command.map { "\($0)" } ?? "type \(request.type)") offset \(request.offset) length \(request.length) flags 0x\(String(request.flags, radix: 16)): \(error)")
            let slot = takeSlot(request)
            if request.payloadLength > 0 {
                // Answered once its payload is read: a client still sending it may not expect
                // the reply yet (libnbd took a reply to a request it had not finished sending
                // for a stray cookie, "no matching cookie", and dropped the connection).
                skipRemaining = request.payloadLength
                skipReply = (slot, error)
            } else {
                reply(slot, error: error)
            }
            return true
        }
        let device = server.device
        largeWriteLast = request.command == .write && request.length >= Self.largeWriteBytes
        let cached = request.command == .read ? largeReadIsCached(request) : nil
        let windowed = cached == true
        switch request.command! {
        case .read, .write:
            guard let buffer = takeBuffer(Int(request.length)) else { return false }
            if request.command == .read {
                reads &+= 1
                if cached == false { largeReadsNotCached &+= 1 }
                server.readRequests &+= 1
                server.readBytes &+= UInt64(request.length)
            }
            let slot = takeSlot(request)
            slots[Int(slot)].buffer = buffer
            if windowed {
                windowedReads &+= 1
                if !readWindowHasRoom(for: request.length) {
                    // Started when the window has room; the requests behind it go on meanwhile.
                    slots[Int(slot)].window = .waiting
                    readWindowQueue.push(slot)
                    return true
                }
                slots[Int(slot)].window = .counted
                readWindowUsed += Int(request.length)
            }
            if request.command == .write {
                slots[Int(slot)].state = .payload
                payloadSlot = slot
            } else if let reader = server.imageReader {
                opsInFlight += 1
                let result = reader(request.offset, UnsafeMutableRawBufferPointer(start: buffer.pointer, count: Int(request.length)))
                replicatedReadCompleted(slot: Int(slot), result: result)
            } else if let replicator = server.replicator, replicator.readsFromPeer {
                opsInFlight += 1
                replicator.clientRead(self, slot: Int(slot), request)
            } else {
                submitRead(Int(slot))
            }
        case .flush where server.replicator != nil, .trim where server.replicator != nil, .writeZeroes where server.replicator != nil:
            let slot = takeSlot(request)
            opsInFlight += 1
            server.replicator!.clientRequest(self, slot: Int(slot), request)
        case .flush:
            let slot = takeSlot(request)
            opsInFlight += 1
            loop.engine.fsync(fd: device.fd, datasync: true, userData: IOLoop.userData(id, UInt32(slot)))
        case .trim, .writeZeroes:
            let slot = takeSlot(request)
            slots[Int(slot)].syncAfter = request.has(NBD.CommandFlag.fua)
            var mode = ctandem_FALLOC_FL_PUNCH_HOLE | ctandem_FALLOC_FL_KEEP_SIZE
            if request.command == .writeZeroes && request.has(NBD.CommandFlag.noHole) {
                mode = ctandem_FALLOC_FL_ZERO_RANGE | ctandem_FALLOC_FL_KEEP_SIZE
            }
            opsInFlight += 1
            loop.engine.fallocate(fd: device.fd, mode: mode, offset: request.offset, length: UInt64(request.length), userData: IOLoop.userData(id, UInt32(slot)))
        case .cache:
            let slot = takeSlot(request)
            if device.cache == .page {
                // Advice only: the kernel starts readahead and returns at once.
                _ = posix_fadvise(device.fd, Int(request.offset), Int(request.length), POSIX_FADV_WILLNEED)
            }
            reply(slot, error: .ok)
        case .blockStatus:
            // One chunk per selected context, in the order they were selected (proto.md
            // "Metadata querying"); the buffer has room for the most extents each may have.
            // The chunks are encoded into the connection's scratch first, then copied into a pool
            // buffer of their size (small, like the replies of the many block-status requests of
            // a copy tool).
            let maxExtents = request.has(NBD.CommandFlag.reqOne) ? 1 : Limits.nbdBlockStatusExtentsMax
            let contexts = session.contexts
            precondition(contexts.count <= Limits.nbdMetaContextQueriesMax)
            if blockStatusScratch == nil { blockStatusScratch = allocateAligned(Self.blockStatusScratchBytes) }
            let scratch = blockStatusScratch!
            var bytes = 0
            for (i, context) in contexts.enumerated() {
                runs.removeAll(keepingCapacity: true)
                switch context.kind {
                case .baseAllocation where server.imageReader != nil:
                    runs.append((request.length, 0))
                case .baseAllocation:
                    device.allocationRuns(offset: request.offset, length: UInt64(request.length), max: maxExtents, into: &runs)
                case .dirtyBitmap(let key):
                    let known = server.changedRuns?(key, request.offset, request.length, maxExtents, &runs) ?? false
                    if !known {
                        runs.removeAll(keepingCapacity: true)
                        runs.append((request.length, NBD.stateDirty))
                    }
                }
                precondition(!runs.isEmpty)
                // A run longer than 4 GiB - 4 KiB splits in two: REQ_ONE still gets one extent.
                if runs.count > maxExtents { runs.removeLast(runs.count - maxExtents) }
                bytes += runs.withUnsafeBufferPointer {
                    NBDTransmission.encodeBlockStatus(cookie: request.cookie, contextID: context.id, last: i == contexts.count - 1,
                                                      extents: $0, into: scratch + bytes)
                }
            }
            guard let buffer = takeBuffer(bytes) else { return false }
            buffer.pointer.copyMemory(from: scratch, byteCount: bytes)
            let slot = takeSlot(request)
            slots[Int(slot)].buffer = buffer
            slots[Int(slot)].headerLength = 0
            slots[Int(slot)].dataLength = bytes
            queueReply(slot)
        case .disconnect:
            disconnectRequested = true
            logger.debug("client \(peer) sent NBD_CMD_DISC")
            closeIfDisconnected()
        }
        return true
    }

    private func takeBuffer(_ bytes: Int) -> PoolBuffer? {
        if bufferBytesHeld + bytes <= Self.bufferBytesHeldMax || bufferBytesHeld == 0, let buffer = loop.pool.take(bytes) {
            bufferBytesHeld += buffer.capacity
            return buffer
        }
        waitingForBuffer = true
        server.waitForBuffer(self)
        return nil
    }

    func resumeAfterBuffer() {
        guard waitingForBuffer, !closing else { return }
        waitingForBuffer = false
        processInput()
    }

    private func takeSlot(_ request: NBDRequest) -> Int32 {
        let slot = freeSlots.popLast()!
        precondition(slots[Int(slot)].state == .free)
        slots[Int(slot)] = Slot(state: .disk, request: request)
        return slot
    }

    private func releaseSlot(_ slot: Int32) {
        let index = Int(slot)
        leaveReadWindow(index)
        if let buffer = slots[index].buffer {
            loop.pool.release(buffer)
            bufferBytesHeld -= buffer.capacity
            server.bufferReleased()
        }
        slots[index] = Slot()
        freeSlots.append(slot)
    }

    private func submitRead(_ index: Int) {
        let s = slots[index]
        let buffer = s.buffer!
        opsInFlight += 1
        loop.engine.read(
            fd: server.device.fd, buffer: buffer.pointer + s.done, length: Int(s.request.length) - s.done,
            offset: s.request.offset + UInt64(s.done), fixedIndex: s.done == 0 ? buffer.fixedIndex : -1,
            offload: offloads(Int(s.request.length), atLeast: Self.offloadReadBytesMin) && !(s.window == .counted && server.everyCPUHasABusyLoop),
            userData: IOLoop.userData(id, UInt32(index)))
    }

    /// Large READs from the page cache go through a window: a connection starts one only while
    /// those it started and has not answered yet leave room for it in `readWindowBytes` (one
    /// always goes). A 1 MiB read is copied out of the page cache into a buffer and, once its
    /// reply's turn comes, from the buffer into the socket. With every request of QD16 read at
    /// once the buffers waited their turn for milliseconds, the 64 MiB of four such clients
    /// outgrew the 32 MiB L3, and both copies (and the client's receive) ran from memory: perf
    /// showed each copy costing 1.4-2x nbdkit's per byte. With the window the data is still in
    /// cache when it is sent. On 2 cores, 1 MiB QD16 reads, alternating runs: 4056-4155 → 4603-
    /// 4739 MiB/s at 1 connection (`--loops 1`) and 4818-4968 → 5273-5944 at 4 (nbdkit
    /// 5104-5464, 5322-5678). Windows of 1, 2, 3, 4 and 8 MiB were measured; 1 MiB was too few
    /// to keep reading and sending overlapped.
    ///
    /// READs that do not fit wait in arrival order (`readWindowQueue`), holding a slot and a
    /// buffer they do not touch yet, while the requests behind them go on: stopping the parser
    /// instead let a cached read hold back reads the disk answers (random 1 MiB reads from an
    /// evicted file, against that version: 2884-3709 → 3436-3939 MiB/s).
    ///
    /// Reads the disk must answer need their queue depth, not a window: only a range the page
    /// cache holds whole (cachestat, Linux 6.5) is windowed. A range evicted between the check and
    /// the read just waits for the disk inside the window. Kernels without cachestat get no window.
    /// The check is one system call per large read.
    ///
    /// Returns whether the page cache holds the whole range of a large local READ through the page
    /// cache (true: it goes through the window), or nil for every other READ.
    private func largeReadIsCached(_ request: NBDRequest) -> Bool? {
        guard request.length >= Self.readWindowReadBytesMin, server.device.cache == .page, server.imageReader == nil,
              !(server.replicator?.readsFromPeer ?? false), Self.kernelHasCachestat
        else { return nil }
        let end = request.offset + UInt64(request.length)
        let pages = Int64((end + 4095) / 4096 - request.offset / 4096)
        return ctandem_cached_pages(server.device.fd, request.offset, UInt64(request.length)) == pages
    }

    static let readWindowBytes = 2 << 20
    static let readWindowReadBytesMin: UInt32 = 64 << 10
    /// cachestat of no file fails with EBADF where the kernel has it, ENOSYS where not.
    static let kernelHasCachestat = ctandem_cached_pages(-1, 0, 4096) != -Int64(ENOSYS)

    /// One windowed READ always fits: the window bounds how many wait behind the first.
    private func readWindowHasRoom(for length: UInt32) -> Bool {
        readWindowUsed == 0 || readWindowUsed + Int(length) <= Self.readWindowBytes
    }

    /// Takes an answered READ out of the read window and starts those waiting that now fit.
    private func leaveReadWindow(_ index: Int) {
        guard slots[index].window == .counted else { return }
        slots[index].window = .none
        readWindowUsed -= Int(slots[index].request.length)
        // Bounded by the queue; each turn starts one READ or stops.
        while !closing, let next = readWindowQueue.first, readWindowHasRoom(for: slots[Int(next)].request.length) {
            _ = readWindowQueue.pop()
            slots[Int(next)].window = .counted
            readWindowUsed += Int(slots[Int(next)].request.length)
            submitRead(Int(next))
        }
    }

    /// Large reads through the page cache are copied by kernel workers while the loop copies
    /// replies into the socket: inline, the loop's thread did both copies and was the limit
    /// (93% busy at 1 MiB QD16). Alternating runs, each on a freshly filled file: 1 MiB reads
    /// median 3329 → 3944 MiB/s at 1 connection, 3107 → 3249 at 4 (nbdkit: 3551, 3618); in
    /// `tandem bench --rounds 3` against nbdkit 0.83x → 0.92x at 1 connection, 0.89x → 1.03x at
    /// 4. Small reads stay inline: a hand-off costs more than copying 4 KiB. Sending large
    /// replies from io-wq too (IOSQE_ASYNC on sendmsg) was slower, 3111 → 2187 MiB/s in one run.
    static let offloadReadBytesMin = 256 << 10

    /// Whether an I/O through the page cache is large enough to copy off the loop's thread
    /// (`IOEngine.write`); smaller writes are copied on it (`writesInline`) or go to io_uring
    /// like any write. Reads: see above.
    private func offloads(_ length: Int, atLeast minimum: Int = offloadWriteBytesMin) -> Bool {
        server.device.cache == .page && length >= minimum
    }

    static let offloadWriteBytesMin = 64 << 10

    /// Small whole-page writes without FUA, in page-cache mode, are copied into the page cache
    /// right here: a 4 KiB memcpy costs less than handing the write to a kernel worker and back
    /// (about 20 us of latency at QD1). Nothing else may block the loop: FUA, partial pages (which
    /// may read the page first), large writes and every direct-I/O write go to the engine.
    private func writesInline(_ request: NBDRequest) -> Bool {
        server.device.cache == .page && !request.has(NBD.CommandFlag.fua) && Self.writesInline(offset: request.offset, length: request.length)
    }

    /// Small whole-page writes (the page-cache part of the rule above).
    static func writesInline(offset: UInt64, length: UInt32) -> Bool {
        length <= inlineWriteBytesMax && offset % 4096 == 0 && length % 4096 == 0
    }

    static let inlineWriteBytesMax: UInt32 = 16 << 10

    private func submitWrite(_ index: Int) {
        let s = slots[index]
        let buffer = s.buffer!
        if s.done == 0 && writesInline(s.request) {
            return diskCompleted(Int32(index), loop.engine.writeNow(fd: server.device.fd, buffer: buffer.pointer, length: Int(s.request.length), offset: s.request.offset))
        }
        opsInFlight += 1
        loop.engine.write(
            fd: server.device.fd, buffer: buffer.pointer + s.done, length: Int(s.request.length) - s.done,
            offset: s.request.offset + UInt64(s.done), fixedIndex: s.done == 0 ? buffer.fixedIndex : -1,
            fua: s.request.has(NBD.CommandFlag.fua), offload: offloads(Int(s.request.length) - s.done), userData: IOLoop.userData(id, UInt32(index)))
    }

    private func submitZeroFill(_ index: Int) {
        let s = slots[index]
        let chunk = min(Int(s.request.length) - s.done, NBDServer.zeroBufferBytes)
        opsInFlight += 1
        loop.engine.write(
            fd: server.device.fd, buffer: server.zeroBuffer, length: chunk, offset: s.request.offset + UInt64(s.done),
            fixedIndex: -1, fua: false, offload: offloads(chunk), userData: IOLoop.userData(id, UInt32(index)))
    }

    private func submitSync(_ index: Int) {
        slots[index].syncing = true
        opsInFlight += 1
        loop.engine.fsync(fd: server.device.fd, datasync: true, userData: IOLoop.userData(id, UInt32(index)))
    }

    /// The payload of a request slot (a WRITE's data), for the replicator.
    func payload(slot: Int) -> UnsafeMutableRawPointer? { slots[slot].buffer?.pointer }

    /// The payload's buffer: its registered index lets the disk write skip pinning its pages.
    func payloadBuffer(slot: Int) -> PoolBuffer? { slots[slot].buffer }

    /// Answers a READ whose data is in its slot's buffer.
    private func replyRead(_ index: Int) {
        let request = slots[index].request
        let header = headers + index * NBDTransmission.replyHeaderBytesMax
        if session!.structuredReplies {
            slots[index].headerLength = NBDTransmission.encodeReadChunkHeader(cookie: request.cookie, offset: request.offset, dataLength: Int(request.length), into: header)
        } else {
            slots[index].headerLength = NBDTransmission.encodeSimpleReply(cookie: request.cookie, error: .ok, into: header)
        }
        slots[index].dataLength = Int(request.length)
        queueReply(Int32(index))
    }

    /// The replicator answered a READ from the peer.
    func replicatedReadCompleted(slot: Int, result: Int32) {
        opsInFlight -= 1
        if closing {
            releaseSlot(Int32(slot))
            return finishIfDone()
        }
        if result < 0 { return reply(Int32(slot), error: NBD.Errno(localErrno: -result)) }
        replyRead(slot)
    }

    /// The replicator finished a request it took (protocol C: durable as the spec asks on both).
    func replicatedCompleted(slot: Int, result: Int32) {
        opsInFlight -= 1
        precondition(slots[slot].state == .disk, "replicated completion for a slot in state \(slots[slot].state)")
        if closing {
            releaseSlot(Int32(slot))
            return finishIfDone()
        }
        reply(Int32(slot), error: result < 0 ? NBD.Errno(localErrno: -result) : .ok)
    }

    private func diskCompleted(_ slot: Int32, _ result: Int32) {
        let index = Int(slot)
        precondition(slots[index].state == .disk, "disk completion for a slot in state \(slots[index].state)")
        if closing {
            releaseSlot(slot)
            return
        }
        let request = slots[index].request
        if result == -EINTR || result == -EAGAIN {
            return resubmit(index)
        }
        if slots[index].syncing {
            return reply(slot, error: result < 0 ? NBD.Errno(localErrno: -result) : .ok)
        }
        switch request.command! {
        case .read, .write:
            if result < 0 && request.command == .read, let replicator = server.replicator, replicator.localReadFailed() {
                // The local disk failed; the peer's copy answers instead (the client sees no error).
                slots[index].done = 0
                opsInFlight += 1
                return replicator.clientRead(self, slot: index, request)
            }
            if result < 0 { return reply(slot, error: NBD.Errno(localErrno: -result)) }
            if result == 0 { return reply(slot, error: .io) }
            slots[index].done += Int(result)
            if slots[index].done < Int(request.length) { return resubmit(index) }
            if request.command == .write { return reply(slot, error: .ok) }
            replyRead(index)
        case .flush:
            reply(slot, error: result < 0 ? NBD.Errno(localErrno: -result) : .ok)
        case .trim, .writeZeroes:
            if slots[index].zeroFill {
                if result < 0 { return reply(slot, error: NBD.Errno(localErrno: -result)) }
                slots[index].done += Int(result)
                if slots[index].done < Int(request.length) { return submitZeroFill(index) }
            } else if result == -EOPNOTSUPP || result == -EINVAL && server.device.isBlockDevice {
                if request.command == .trim {
                    // TRIM is advisory: a device that cannot discard still answers success.
                    return reply(slot, error: .ok)
                }
                if request.has(NBD.CommandFlag.fastZero) { return reply(slot, error: .notsup) }
                slots[index].zeroFill = true
                slots[index].syncAfter = slots[index].syncAfter || request.has(NBD.CommandFlag.fua)
                return submitZeroFill(index)
            } else if result < 0 {
                return reply(slot, error: NBD.Errno(localErrno: -result))
            }
            if slots[index].syncAfter { return submitSync(index) }
            reply(slot, error: .ok)
        case .cache, .blockStatus, .disconnect:
            preconditionFailure("\(request.command!) does no disk I/O")
        }
    }

    private func resubmit(_ index: Int) {
        if slots[index].syncing { return submitSync(index) }
        switch slots[index].request.command! {
        case .read: submitRead(index)
        case .write: submitWrite(index)
        case .flush: submitSync(index)
        case .trim, .writeZeroes:
            if slots[index].zeroFill { return submitZeroFill(index) }
            let r = slots[index].request
            var mode = ctandem_FALLOC_FL_PUNCH_HOLE | ctandem_FALLOC_FL_KEEP_SIZE
            if r.command == .writeZeroes && r.has(NBD.CommandFlag.noHole) { mode = ctandem_FALLOC_FL_ZERO_RANGE | ctandem_FALLOC_FL_KEEP_SIZE }
            opsInFlight += 1
            loop.engine.fallocate(fd: server.device.fd, mode: mode, offset: r.offset, length: UInt64(r.length), userData: IOLoop.userData(id, UInt32(index)))
        case .cache, .blockStatus, .disconnect:
            preconditionFailure("nothing to resubmit")
        }
    }

    // MARK: Replies

    /// Queues the status reply (no data) for a slot.
    private func reply(_ slot: Int32, error: NBD.Errno) {
        let index = Int(slot)
        if slots[index].request.command == .read, let buffer = slots[index].buffer {
            // A failed read sends no data: give its buffer back now.
            loop.pool.release(buffer)
            bufferBytesHeld -= buffer.capacity
            slots[index].buffer = nil
            server.bufferReleased()
        }
        let header = headers + index * NBDTransmission.replyHeaderBytesMax
        slots[index].headerLength = NBDTransmission.encodeStatusReply(slots[index].request, error: error, session: session!, into: header)
        slots[index].dataLength = 0
        queueReply(slot)
    }

    private func queueReply(_ slot: Int32) {
        slots[Int(slot)].state = .reply
        replies.push(slot)
        loop.callAtBatchEnd(id)
    }

    private func queueControl(_ bytes: [UInt8]) {
        guard !bytes.isEmpty else { return }
        if controlSent == control.count {
            control.removeAll(keepingCapacity: true)
            controlSent = 0
        }
        control += bytes
        loop.callAtBatchEnd(id)
    }

    /// Starts a send of what is queued, unless one is in flight.
    private func flushSend() {
        guard !sendPosted, !closing else { return }
        if tls != nil && !startTLSAfterSend { return flushSendTLS() }
        iovCount = 0
        iovIndex = 0
        sendingControlBytes = 0
        sendingReplies = 0
        if controlSent < control.count {
            control.withUnsafeMutableBytes { raw in
                iov[0] = iovec(iov_base: raw.baseAddress! + controlSent, iov_len: raw.count - controlSent)
            }
            sendingControlBytes = control.count - controlSent
            iovCount = 1
        }
        while sendingReplies < replies.count && sendingReplies < Limits.nbdRepliesPerSendMax {
            let index = Int(replies[sendingReplies])
            let s = slots[index]
            if s.headerLength > 0 {
                iov[iovCount] = iovec(iov_base: headers + index * NBDTransmission.replyHeaderBytesMax, iov_len: s.headerLength)
                iovCount += 1
            }
            if s.dataLength > 0 {
                iov[iovCount] = iovec(iov_base: s.buffer!.pointer, iov_len: s.dataLength)
                iovCount += 1
            }
            sendingReplies += 1
        }
        guard iovCount > 0 else { return afterSendDrained() }
        postSendmsg()
    }

    private func postSendmsg() {
        message.pointee.msg_iov = iov + iovIndex
        message.pointee.msg_iovlen = iovCount - iovIndex
        sendPosted = true
        opsInFlight += 1
        loop.engine.sendmsg(fd: fd, message: message, userData: IOLoop.userData(id, Self.tagSend))
    }

    private func sent(_ result: Int32) {
        if closing { return }
        if result < 0 {
            return close(reason: result == -EPIPE || result == -ECONNRESET ? "client went away" : "send failed: \(SystemError.text(-result))")
        }
        if tls != nil && !startTLSAfterSend {
            cipherOutSent += Int(result)
            flushSend()
            return
        }
        // Advance through the iovecs; resend the rest of a partial send.
        var left = Int(result)
        while left > 0 && iovIndex < iovCount {
            let length = iov[iovIndex].iov_len
            if left >= length {
                left -= length
                iovIndex += 1
            } else {
                iov[iovIndex].iov_base += left
                iov[iovIndex].iov_len -= left
                left = 0
            }
        }
        if iovIndex < iovCount { return postSendmsg() }
        controlSent += sendingControlBytes
        for _ in 0..<sendingReplies { releaseSlot(replies.pop()!) }
        if startTLSAfterSend && controlSent == control.count {
            return startTLS()
        }
        flushSend()
        if !closing && (waitingForBuffer == false) { processInputIfStalled() }
    }

    /// Resumes parsing that stopped for lack of a free slot.
    private func processInputIfStalled() {
        if phase == .transmission && !disconnectRequested && !freeSlots.isEmpty {
            processInput()
        } else {
            postRecv()
        }
    }

    private func flushSendTLS() {
        guard let tls, let cipherOut else { return }
        if cipherOutSent < cipherOutLength {
            iov[0] = iovec(iov_base: cipherOut + cipherOutSent, iov_len: cipherOutLength - cipherOutSent)
            iovCount = 1
            iovIndex = 0
            return postSendmsg()
        }
        cipherOutLength = 0
        cipherOutSent = 0
        let budget = Limits.tlsCiphertextBufferBytes / 2
        var failed = false
        if phase != .tlsHandshake {
            // Records are sealed straight into the send buffer (one that does not fit waits in
            // TLS's queue, taken first next time); the budget leaves room for the last to overshoot.
            cipherOutLength = tls.takeOutput(into: cipherOut, count: Limits.tlsCiphertextBufferBytes)
            tls.setOutputWindow(cipherOut + cipherOutLength, capacity: Limits.tlsCiphertextBufferBytes - cipherOutLength)
            defer { cipherOutLength += tls.closeOutputWindow() }
            var encrypted = 0
            if controlSent < control.count {
                let n = control.count - controlSent
                failed = !control.withUnsafeBytes { tls.write($0.baseAddress! + controlSent, count: n) }
                controlSent = control.count
                encrypted += n
            }
            while !failed && encrypted < budget, let head = replies.first {
                let index = Int(head)
                let s = slots[index]
                let total = s.headerLength + s.dataLength
                while tlsReplyOffset < total && encrypted < budget && !failed {
                    let piece: UnsafeRawPointer
                    let n: Int
                    if tlsReplyOffset < s.headerLength {
                        piece = UnsafeRawPointer(headers + index * NBDTransmission.replyHeaderBytesMax + tlsReplyOffset)
                        n = s.headerLength - tlsReplyOffset
                    } else {
                        let at = tlsReplyOffset - s.headerLength
                        piece = UnsafeRawPointer(s.buffer!.pointer + at)
                        n = min(s.dataLength - at, Limits.tlsRecordPlaintextMax * 4)
                    }
                    failed = !tls.write(piece, count: n)
                    tlsReplyOffset += n
                    encrypted += n
                }
                if tlsReplyOffset == total {
                    tlsReplyOffset = 0
                    releaseSlot(replies.pop()!)
                }
            }
        }
        if failed { return close(reason: "TLS: \(tls.lastError)") }
        if cipherOutLength == 0 { cipherOutLength = tls.takeOutput(into: cipherOut, count: Limits.tlsCiphertextBufferBytes) }
        if cipherOutLength > 0 {
            iov[0] = iovec(iov_base: cipherOut, iov_len: cipherOutLength)
            iovCount = 1
            iovIndex = 0
            return postSendmsg()
        }
        afterSendDrained()
        if !closing { processInputIfStalled() }
    }

    /// Everything queued has been sent.
    private func afterSendDrained() {
        if let reason = closeAfterSendReason { return close(reason: reason) }
        closeIfDisconnected()
    }

    // MARK: Closing

    /// After NBD_CMD_DISC: close once every request in flight has been answered.
    private func closeIfDisconnected() {
        guard disconnectRequested || (server.refusingRequests && phase == .transmission) else { return }
        if freeSlots.count == slots.count && replies.isEmpty && !sendPosted && (controlSent == control.count) && payloadSlot < 0 {
            if disconnectRequested {
                close(reason: "client disconnected")
            } else if inEnd - inStart < NBD.requestHeaderBytes {
                close(reason: "server shut down")
            }
        }
    }

    func serverShuttingDown() {
        if phase != .transmission { return close(reason: "server shut down during the handshake") }
        // New requests get ESHUTDOWN; close when nothing is in flight.
        processInput()
        closeIfDisconnected()
    }

    private func closeAfterSend(reason: String) {
        closeAfterSendReason = reason
        loop.callAtBatchEnd(id)
    }

    func close(reason: String) {
        guard !closing else { return }
        closing = true
        if reason == "client disconnected" || reason == "server shut down" {
            logger.info("NBD client \(peer) disconnected\(readsText)")
        } else {
            logger.notice("closing NBD client \(peer): \(reason)\(readsText)")
        }
        shutdown(fd, Int32(SHUT_RDWR))
        finishIfDone()
    }

    /// How many READs the connection had, and how many large ones the page cache did not hold
    /// (see `largeReadIsCached`).
    private var readsText: String {
        reads == 0 ? "" : " after \(reads) read\(reads == 1 ? "" : "s") (\(windowedReads) windowed, \(largeReadsNotCached) large not cached)"
    }

    private func finishIfDone() {
        guard closing, opsInFlight == 0, !finished else { return }
        finished = true
        for i in 0..<slots.count where slots[i].state != .free { releaseSlot(Int32(i)) }
        replies.removeAll()
        readWindowQueue.removeAll()
        payloadSlot = -1
        closeDescriptor(fd)
        loop.unregister(id)
        server.connectionClosed(self)
    }
}
