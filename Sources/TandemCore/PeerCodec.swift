/// Encoding and decoding of the peer protocol (Protocol/peer.md), sans-I/O over caller memory.
///
/// The receive path is in two steps, so a payload of up to 32 MiB can land straight in an I/O
/// buffer: `PeerDecoder.decodeHeader` validates the header (and, for block messages, the block
/// extension) against its CRC and every bound before the caller commits any memory; the caller
/// then receives `payloadLength` bytes where it wants them, checks them with
/// `PeerHeader.verifyPayload`, and decodes control payloads with `PeerMessage.decode`.
/// Nothing in the header path or in the encoders allocates.

/// A validated frame header (peer.md "Header" and "Block extension").
public struct PeerHeader: Sendable, Equatable {
    public var type: PeerMessageType
    /// Type-specific `PeerFlags` bits (validated against `type.allowedFlags`).
    public var flags: UInt16
    /// The identifier the type defines (write id, flush id, ping id...), or 0.
    public var sequence: UInt64
    /// Bytes of payload after the header (and block extension); within `type.payloadBytesRange`.
    public var payloadLength: Int
    /// CRC-32C of the payload; 0 for an empty one.
    public var payloadCRC: UInt32
    /// The block extension of `data`, `trim`, `zeroes` and `resyncData`; nil for other types.
    public var block: PeerBlock?

    public init(type: PeerMessageType, flags: UInt16, sequence: UInt64, payloadLength: Int,
                payloadCRC: UInt32, block: PeerBlock?) {
        self.type = type
        self.flags = flags
        self.sequence = sequence
        self.payloadLength = payloadLength
        self.payloadCRC = payloadCRC
        self.block = block
    }

    /// Bytes `decodeHeader` consumed: 32, or 56 with the block extension.
    public var headerBytes: Int { type.headerBytes }
    /// Bytes of the whole frame.
    public var frameBytes: Int { headerBytes + payloadLength }

    public func has(_ flag: UInt16) -> Bool { flags & flag != 0 }

    /// Whether `payload` is the payload this header announced (length and CRC-32C).
    @inline(__always)
    public func verifyPayload(_ payload: UnsafeRawBufferPointer) -> Bool {
        payload.count == payloadLength && PeerEncoder.payloadCRC(payload) == payloadCRC
    }
}

// MARK: Decoding

public enum PeerDecoder {
    public enum HeaderResult: Sendable, Equatable {
        /// Fewer bytes than the header needs (32, or 56 once the type says block message).
        case needMore
        /// A header that passed every check; `header.headerBytes` bytes are consumed.
        case header(PeerHeader)
        /// The stream is corrupt or speaks something else: the link must be dropped.
        case invalid(String)
    }

    public enum FrameResult: Sendable, Equatable {
        case needMore
        /// A whole frame; `header.frameBytes` bytes are consumed.
        case frame(PeerHeader, PeerMessage)
        case invalid(String)
    }

    /// Decodes and validates the header at the start of `bytes` (peer.md "Validation"). Checks,
    /// in order: magic, version, known type, header CRC, reserved field, flags, payload length
    /// against the type's bounds, sequence, empty-payload CRC, and the block extension.
    public static func decodeHeader(_ bytes: UnsafeRawBufferPointer) -> HeaderResult {
        guard bytes.count >= PeerProtocol.headerBytes else { return .needMore }
        let magic = bytes.loadBE32(at: 0)
        guard magic == PeerProtocol.magic else { return .invalid("bad magic 0x\(String(magic, radix: 16))") }
        let version = bytes.loadBE16(at: 4)
        guard version == PeerProtocol.version else { return .invalid("unsupported frame version \(version)") }
        let rawType = bytes.loadBE16(at: 6)
        guard let type = PeerMessageType(rawValue: rawType) else { return .invalid("unknown message type \(rawType)") }
        guard bytes.count >= type.headerBytes else { return .needMore }

        let headerCRC = bytes.loadBE32(at: 24)
        let computedCRC = PeerEncoder.headerCRC(UnsafeRawBufferPointer(rebasing: bytes[0..<type.headerBytes]))
        guard headerCRC == computedCRC else { return .invalid("\(type): header crc mismatch") }

        let flags = bytes.loadBE16(at: 8)
        let reserved = bytes.loadBE16(at: 10)
        let payloadLength = Int(bytes.loadBE32(at: 12))
        let sequence = bytes.loadBE64(at: 16)
        let payloadCRC = bytes.loadBE32(at: 28)

        guard reserved == 0 else { return .invalid("\(type): reserved header field is \(reserved)") }
        guard flags & ~type.allowedFlags == 0 else {
            return .invalid("\(type): flags 0x\(String(flags, radix: 16)) not allowed")
        }
        guard type.payloadBytesRange.contains(payloadLength) else {
            return .invalid("\(type): payload length \(payloadLength) outside \(type.payloadBytesRange)")
        }
        if type.sequenceIsZero && sequence != 0 { return .invalid("\(type): sequence must be 0") }
        if payloadLength == 0 && payloadCRC != 0 { return .invalid("\(type): empty payload with crc") }

        switch type {
        case .resyncRequest:
            if sequence == 0 { return .invalid("resyncRequest: id must not be 0") }
        case .stateChange:
            if flags & PeerFlags.State.reply != 0 && sequence == 0 { return .invalid("stateChange: reply without id") }
            if flags & PeerFlags.State.refused != 0 && flags & PeerFlags.State.reply == 0 {
                return .invalid("stateChange: refused outside a reply")
            }
        default:
            break
        }

        var block: PeerBlock?
        if type.isBlock {
            let b = PeerBlock(
                offset: bytes.loadBE64(at: 32), epoch: bytes.loadBE64(at: 40),
                length: bytes.loadBE32(at: 48), result: bytes.loadBE32(at: 52))
            if let problem = validate(block: b, type: type, flags: flags, payloadLength: payloadLength) {
                return .invalid("\(type): \(problem)")
            }
            block = b
        }
        return .header(PeerHeader(
            type: type, flags: flags, sequence: sequence, payloadLength: payloadLength,
            payloadCRC: payloadCRC, block: block))
    }

    /// The block extension's rules (peer.md "Block extension"); nil when they hold.
    static func validate(block b: PeerBlock, type: PeerMessageType, flags: UInt16, payloadLength: Int) -> String? {
        if b.length == 0 { return "zero length" }
        if b.offset.addingReportingOverflow(UInt64(b.length)).overflow { return "offset + length overflows" }
        switch type {
        case .data, .trim, .zeroes:
            if b.result != 0 { return "result must be 0" }
        case .resyncData:
            if b.epoch != 0 { return "epoch must be 0" }
            if b.result > PeerProtocol.resultMax { return "result \(b.result) is not an errno" }
            if !PeerDecoder.isResyncAligned(offset: b.offset, length: b.length) { return "range not 4 KiB aligned" }
            if Int(b.length) > PeerProtocol.dataPayloadBytesMax { return "length \(b.length) over the maximum" }
            if b.result != 0 && flags != 0 { return "flags with a failed read" }
        default:
            preconditionFailure("\(type) has no block extension")
        }
        if payloadLength != b.payloadLength(type: type, flags: flags) {
            return "payload length \(payloadLength) does not match the block"
        }
        return nil
    }

    static func isResyncAligned(offset: UInt64, length: UInt32) -> Bool {
        let unit = UInt64(PeerProtocol.bitmapGranularityBytesMin)
        return offset % unit == 0 && UInt64(length) % unit == 0
    }

    /// Decodes one whole frame at the start of `bytes`, checking the payload CRC. For tests, the
    /// simulator and control traffic already buffered; the data path uses `decodeHeader`.
    public static func decodeFrame(_ bytes: UnsafeRawBufferPointer) -> FrameResult {
        switch decodeHeader(bytes) {
        case .needMore:
            return .needMore
        case .invalid(let reason):
            return .invalid(reason)
        case .header(let header):
            guard bytes.count >= header.frameBytes else { return .needMore }
            let payload = UnsafeRawBufferPointer(rebasing: bytes[header.headerBytes..<header.frameBytes])
            guard header.verifyPayload(payload) else { return .invalid("\(header.type): payload crc mismatch") }
            switch PeerMessage.decode(header: header, payload: payload) {
            case .message(let message): return .frame(header, message)
            case .invalid(let reason): return .invalid(reason)
            }
        }
    }
}

extension PeerMessage {
    public enum DecodeResult: Sendable, Equatable {
        case message(PeerMessage)
        case invalid(String)
    }

    /// Decodes a payload that `header.verifyPayload` accepted. Allocates only for messages that
    /// hold strings or arrays (`hello`, `disconnect`, `bitmapChunk`, `verifyDigest`, and the
    /// copies of `data`/`resyncData` payloads); acks, pings, barriers and flushes do not.
    public static func decode(header: PeerHeader, payload: UnsafeRawBufferPointer) -> DecodeResult {
        guard payload.count == header.payloadLength else {
            return .invalid("\(header.type): payload is \(payload.count) bytes, header says \(header.payloadLength)")
        }
        var r = PeerReader(payload)
        let message: PeerMessage
        switch header.type {
        case .hello:
            let versionMin = r.u16(), versionMax = r.u16()
            let granularity = r.u32()
            let size = r.u64()
            let uuids = r.uuids()
            let nodeID = r.u8(), rawRole = r.u8(), rawDisk = r.u8()
            let nameLength = Int(r.u8())
            let name = r.bytes(nameLength)
            let outOfSyncBits = r.u64(), primarySince = r.u64()
            guard r.isExactlyConsumed else { return .invalid("hello: name length \(nameLength) does not fit the payload") }
            guard versionMin >= 1, versionMin <= versionMax else {
                return .invalid("hello: version range \(versionMin)...\(versionMax)")
            }
            guard let role = PeerRole(rawValue: rawRole) else { return .invalid("hello: unknown role \(rawRole)") }
            guard let disk = PeerDiskState(rawValue: rawDisk) else { return .invalid("hello: unknown disk state \(rawDisk)") }
            guard nodeID <= PeerProtocol.nodeIDMax else { return .invalid("hello: node id \(nodeID)") }
            guard granularity.nonzeroBitCount == 1,
                  Int(granularity) >= PeerProtocol.bitmapGranularityBytesMin,
                  Int(granularity) <= PeerProtocol.bitmapGranularityBytesMax
            else { return .invalid("hello: bitmap granularity \(granularity)") }
            guard size % UInt64(Limits.blockSize) == 0 else { return .invalid("hello: device size \(size) not 4 KiB aligned") }
            guard PeerHello.isValidResourceName(name) else { return .invalid("hello: bad resource name") }
            message = .hello(PeerHello(
                versionMin: versionMin, versionMax: versionMax, nodeID: nodeID, role: role, diskState: disk,
                flags: header.flags, resourceName: String(decoding: name, as: UTF8.self), deviceSizeBytes: size,
                bitmapGranularityBytes: granularity,
                uuids: uuids, outOfSyncBits: outOfSyncBits, primarySinceMillis: primarySince))

        case .ping:
            message = .ping(id: header.sequence)
        case .pingAck:
            message = .pingAck(id: header.sequence)

        case .stateChange:
            let uuids = r.uuids()
            let rawRole = r.u8(), rawDisk = r.u8()
            guard let role = PeerRole(rawValue: rawRole) else { return .invalid("stateChange: unknown role \(rawRole)") }
            guard let disk = PeerDiskState(rawValue: rawDisk) else {
                return .invalid("stateChange: unknown disk state \(rawDisk)")
            }
            message = .stateChange(PeerStateChange(
                id: header.sequence, role: role, diskState: disk, flags: header.flags, uuids: uuids))

        case .disconnect:
            let reason = r.u16()
            let textLength = Int(r.u16())
            let textBytes = r.bytes(textLength)
            guard r.isExactlyConsumed, textLength <= PeerProtocol.disconnectTextBytesMax else {
                return .invalid("disconnect: text length \(textLength) does not fit the payload")
            }
            let text = String(decoding: textBytes, as: UTF8.self)
            // Repaired UTF-8 would not be what the peer sent; a peer that sends invalid text is broken.
            guard text.utf8.elementsEqual(textBytes) else { return .invalid("disconnect: text is not UTF-8") }
            message = .disconnect(reason: PeerDisconnectReason(rawValue: reason), text: text)

        case .data, .trim, .zeroes:
            guard let b = header.block else { preconditionFailure("block header without its extension") }
            let write = PeerWrite(id: header.sequence, offset: b.offset, length: b.length, epoch: b.epoch, flags: header.flags)
            switch header.type {
            case .data: message = .data(write, payload: Array(r.bytes(r.remaining)))
            case .trim: message = .trim(write)
            default: message = .zeroes(write)
            }

        case .writeAck:
            let result = r.u32()
            guard result <= PeerProtocol.resultMax else { return .invalid("writeAck: result \(result) is not an errno") }
            message = .writeAck(id: header.sequence, result: result)
        case .flush:
            message = .flush(id: header.sequence)
        case .flushAck:
            let result = r.u32()
            guard result <= PeerProtocol.resultMax else { return .invalid("flushAck: result \(result) is not an errno") }
            message = .flushAck(id: header.sequence, result: result)
        case .barrier:
            message = .barrier(epoch: r.u64())
        case .barrierAck:
            let epoch = r.u64(), writes = r.u32(), result = r.u32()
            guard result <= PeerProtocol.resultMax else { return .invalid("barrierAck: result \(result) is not an errno") }
            message = .barrierAck(epoch: epoch, writes: writes, result: result)
        case .snapshot:
            let id = r.u64(), created = Int64(bitPattern: r.u64())
            let labelLength = Int(r.u8())
            let label = r.bytes(labelLength)
            guard r.isExactlyConsumed else { return .invalid("snapshot: label length \(labelLength) does not fit the payload") }
            let info = BarrierInfo(id: id, createdUnixSeconds: created, label: String(decoding: label, as: UTF8.self))
            guard String(decoding: label, as: UTF8.self).utf8.elementsEqual(label), (try? info.validate()) != nil else {
                return .invalid("snapshot: bad id or label")
            }
            message = .snapshot(info)

        case .bitmapChunk:
            let firstBit = r.u64()
            let bitCount = r.u32()
            guard firstBit % 64 == 0 else { return .invalid("bitmapChunk: first bit \(firstBit) not a multiple of 64") }
            guard bitCount >= 1, Int(bitCount) <= PeerProtocol.bitmapChunkBitsMax else {
                return .invalid("bitmapChunk: bit count \(bitCount)")
            }
            guard !firstBit.addingReportingOverflow(UInt64(bitCount)).overflow else {
                return .invalid("bitmapChunk: bit range overflows")
            }
            let wordCount = (Int(bitCount) + 63) / 64
            guard r.remaining == 8 * wordCount else {
                return .invalid("bitmapChunk: \(r.remaining) bytes of words for \(bitCount) bits")
            }
            let words = (0..<wordCount).map { _ in r.u64LE() }
            let tailBits = Int(bitCount) % 64
            if tailBits != 0, words[wordCount - 1] >> UInt64(tailBits) != 0 {
                return .invalid("bitmapChunk: bits set past the bit count")
            }
            message = .bitmapChunk(PeerBitmapChunk(firstBit: firstBit, bitCount: bitCount, words: words))

        case .bitmapDone:
            let totalBits = r.u64(), setBits = r.u64()
            guard setBits <= totalBits else { return .invalid("bitmapDone: \(setBits) of \(totalBits) bits set") }
            message = .bitmapDone(totalBits: totalBits, setBits: setBits)

        case .resyncRequest:
            let offset = r.u64(), length = r.u32()
            if let problem = validateResyncRange(offset: offset, length: length) { return .invalid("resyncRequest: \(problem)") }
            message = .resyncRequest(id: header.sequence, offset: offset, length: length)

        case .resyncData:
            guard let b = header.block else { preconditionFailure("block header without its extension") }
            message = .resyncData(
                PeerResyncData(id: header.sequence, offset: b.offset, length: b.length, result: b.result, flags: header.flags),
                payload: Array(r.bytes(r.remaining)))

        case .resyncAck:
            let offset = r.u64(), length = r.u32(), result = r.u32()
            if let problem = validateResyncRange(offset: offset, length: length) { return .invalid("resyncAck: \(problem)") }
            guard result <= PeerProtocol.resultMax else { return .invalid("resyncAck: result \(result) is not an errno") }
            message = .resyncAck(id: header.sequence, offset: offset, length: length, result: result)

        case .resyncDone:
            message = .resyncDone

        case .verifyRequest:
            let offset = r.u64(), length = r.u32(), rawAlgorithm = r.u8()
            if let problem = validateVerifyRange(offset: offset, length: length) { return .invalid("verifyRequest: \(problem)") }
            guard let algorithm = PeerDigestAlgorithm(rawValue: rawAlgorithm) else {
                return .invalid("verifyRequest: unknown digest algorithm \(rawAlgorithm)")
            }
            message = .verifyRequest(id: header.sequence, offset: offset, length: length, algorithm: algorithm)

        case .verifyDigest:
            let offset = r.u64(), length = r.u32(), result = r.u32()
            let rawAlgorithm = r.u8(), digestBytes = Int(r.u8())
            if let problem = validateVerifyRange(offset: offset, length: length) { return .invalid("verifyDigest: \(problem)") }
            guard result <= PeerProtocol.resultMax else { return .invalid("verifyDigest: result \(result) is not an errno") }
            guard let algorithm = PeerDigestAlgorithm(rawValue: rawAlgorithm) else {
                return .invalid("verifyDigest: unknown digest algorithm \(rawAlgorithm)")
            }
            guard digestBytes == algorithm.digestBytes else {
                return .invalid("verifyDigest: \(digestBytes)-byte digests for \(algorithm)")
            }
            let expected = result == 0 ? Int(length) / PeerProtocol.digestBlockBytes * digestBytes : 0
            guard r.remaining == expected else {
                return .invalid("verifyDigest: \(r.remaining) bytes of digests, expected \(expected)")
            }
            let digests = Array(r.bytes(expected))
            message = .verifyDigest(PeerVerifyDigest(
                id: header.sequence, offset: offset, length: length, result: result, algorithm: algorithm, digests: digests))
        }
        // Fixed layouts were sized by `payloadBytesRange`; this catches a mismatch between the
        // two tables rather than trusting it.
        guard r.isExactlyConsumed else { return .invalid("\(header.type): payload length \(payload.count) does not match") }
        return .message(message)
    }

    static func validateResyncRange(offset: UInt64, length: UInt32) -> String? {
        if length == 0 { return "zero length" }
        if Int(length) > PeerProtocol.dataPayloadBytesMax { return "length \(length) over the maximum" }
        if !PeerDecoder.isResyncAligned(offset: offset, length: length) { return "range not 4 KiB aligned" }
        if offset.addingReportingOverflow(UInt64(length)).overflow { return "offset + length overflows" }
        return nil
    }

    static func validateVerifyRange(offset: UInt64, length: UInt32) -> String? {
        if length == 0 { return "zero length" }
        if Int(length) > PeerProtocol.verifyBytesMax { return "length \(length) over the maximum" }
        let unit = UInt64(PeerProtocol.digestBlockBytes)
        if offset % unit != 0 || UInt64(length) % unit != 0 { return "range not 4 KiB aligned" }
        if offset.addingReportingOverflow(UInt64(length)).overflow { return "offset + length overflows" }
        return nil
    }
}

// MARK: Encoding

public enum PeerEncoder {
    /// CRC-32C of a payload, as the header's payload CRC field carries it (0 for no bytes). The
    /// sender of `data` computes it over its own buffer and passes it to `encodeBlockHeader`.
    @inline(__always)
    public static func payloadCRC(_ payload: UnsafeRawBufferPointer) -> UInt32 {
        payload.isEmpty ? 0 : CRC32C.checksum(payload)
    }

    /// CRC-32C over `header` (32 or 56 bytes) with the header CRC field (bytes 24..<28) taken
    /// as zero. It covers the payload CRC field, which binds header and payload together.
    static func headerCRC(_ header: UnsafeRawBufferPointer) -> UInt32 {
        precondition(header.count == PeerProtocol.headerBytes || header.count == PeerProtocol.blockHeaderBytes)
        var crc = CRC32C()
        crc.update(UnsafeRawBufferPointer(rebasing: header[0..<24]))
        withUnsafeBytes(of: UInt32(0)) { crc.update($0) }
        crc.update(UnsafeRawBufferPointer(rebasing: header[28..<header.count]))
        return crc.value
    }

    /// Writes the 32-byte header of a non-block message whose payload (already written, or to be
    /// sent from elsewhere) has `payloadLength` bytes and CRC `payloadCRC`. Returns 32.
    @discardableResult
    public static func encodeHeader(
        type: PeerMessageType, flags: UInt16, sequence: UInt64, payloadLength: Int, payloadCRC: UInt32,
        into p: UnsafeMutableRawPointer
    ) -> Int {
        precondition(!type.isBlock, "\(type) needs encodeBlockHeader")
        checkHeader(type: type, flags: flags, sequence: sequence, payloadLength: payloadLength, payloadCRC: payloadCRC)
        storeCommon(type: type, flags: flags, sequence: sequence, payloadLength: payloadLength, payloadCRC: payloadCRC, into: p)
        seal(p, headerBytes: PeerProtocol.headerBytes)
        return PeerProtocol.headerBytes
    }

    /// Writes the 32-byte header of a non-block message, computing the CRC of `payload`.
    @discardableResult
    public static func encodeHeader(
        type: PeerMessageType, flags: UInt16, sequence: UInt64, payload: UnsafeRawBufferPointer,
        into p: UnsafeMutableRawPointer
    ) -> Int {
        encodeHeader(type: type, flags: flags, sequence: sequence, payloadLength: payload.count,
                     payloadCRC: payloadCRC(payload), into: p)
    }

    /// Writes the 56-byte header and block extension of `data`, `trim`, `zeroes` or `resyncData`.
    /// The payload length follows from the block (`PeerBlock.payloadLength`); `payloadCRC` is
    /// `payloadCRC(_:)` of the bytes the caller sends after it (0 when there are none), so a
    /// `data` frame goes out as two iovecs, this header and the caller's buffer, with no copy.
    @discardableResult
    public static func encodeBlockHeader(
        type: PeerMessageType, flags: UInt16, sequence: UInt64, block: PeerBlock, payloadCRC: UInt32,
        into p: UnsafeMutableRawPointer
    ) -> Int {
        precondition(type.isBlock, "\(type) has no block extension")
        let payloadLength = block.payloadLength(type: type, flags: flags)
        checkHeader(type: type, flags: flags, sequence: sequence, payloadLength: payloadLength, payloadCRC: payloadCRC)
        precondition(PeerDecoder.validate(block: block, type: type, flags: flags, payloadLength: payloadLength) == nil,
                     "invalid block for \(type): \(block)")
        storeCommon(type: type, flags: flags, sequence: sequence, payloadLength: payloadLength, payloadCRC: payloadCRC, into: p)
        p.storeBE(block.offset, at: 32)
        p.storeBE(block.epoch, at: 40)
        p.storeBE(block.length, at: 48)
        p.storeBE(block.result, at: 52)
        seal(p, headerBytes: PeerProtocol.blockHeaderBytes)
        return PeerProtocol.blockHeaderBytes
    }

    /// Encoding something the decoder would refuse is a bug in the caller.
    private static func checkHeader(type: PeerMessageType, flags: UInt16, sequence: UInt64, payloadLength: Int, payloadCRC: UInt32) {
        precondition(flags & ~type.allowedFlags == 0, "flags 0x\(String(flags, radix: 16)) not allowed on \(type)")
        precondition(type.payloadBytesRange.contains(payloadLength), "\(type) payload of \(payloadLength) bytes")
        precondition(!type.sequenceIsZero || sequence == 0, "\(type) carries no sequence")
        precondition(payloadLength != 0 || payloadCRC == 0, "empty payload with a crc")
        precondition(type != .resyncRequest || sequence != 0, "resyncRequest needs an id")
        if type == .stateChange {
            precondition(flags & PeerFlags.State.reply == 0 || sequence != 0, "stateChange reply without id")
            precondition(flags & PeerFlags.State.refused == 0 || flags & PeerFlags.State.reply != 0)
        }
    }

    private static func storeCommon(type: PeerMessageType, flags: UInt16, sequence: UInt64, payloadLength: Int,
                                    payloadCRC: UInt32, into p: UnsafeMutableRawPointer) {
        p.storeBE(PeerProtocol.magic, at: 0)
        p.storeBE(PeerProtocol.version, at: 4)
        p.storeBE(type.rawValue, at: 6)
        p.storeBE(flags, at: 8)
        p.storeBE(UInt16(0), at: 10)
        p.storeBE(UInt32(payloadLength), at: 12)
        p.storeBE(sequence, at: 16)
        p.storeBE(UInt32(0), at: 24)
        p.storeBE(payloadCRC, at: 28)
    }

    private static func seal(_ p: UnsafeMutableRawPointer, headerBytes: Int) {
        let crc = headerCRC(UnsafeRawBufferPointer(start: p, count: headerBytes))
        p.storeBE(crc, at: 24)
    }
}

extension PeerMessage {
    /// The header flags this message carries.
    public var flags: UInt16 {
        switch self {
        case .hello(let h): return h.flags
        case .stateChange(let s): return s.flags
        case .data(let w, _), .trim(let w), .zeroes(let w): return w.flags
        case .resyncData(let d, _): return d.flags
        default: return 0
        }
    }

    /// The header sequence this message carries.
    public var sequence: UInt64 {
        switch self {
        case .ping(let id), .pingAck(let id), .flush(let id): return id
        case .writeAck(let id, _), .flushAck(let id, _): return id
        case .stateChange(let s): return s.id
        case .data(let w, _), .trim(let w), .zeroes(let w): return w.id
        case .resyncRequest(let id, _, _), .resyncAck(let id, _, _, _), .verifyRequest(let id, _, _, _): return id
        case .resyncData(let d, _): return d.id
        case .verifyDigest(let d): return d.id
        case .hello, .disconnect, .barrier, .barrierAck, .snapshot, .bitmapChunk, .bitmapDone, .resyncDone: return 0
        }
    }

    /// The block extension of a block message.
    public var block: PeerBlock? {
        switch self {
        case .data(let w, _), .trim(let w), .zeroes(let w):
            return PeerBlock(offset: w.offset, epoch: w.epoch, length: w.length)
        case .resyncData(let d, _):
            return PeerBlock(offset: d.offset, length: d.length, result: d.result)
        default:
            return nil
        }
    }

    /// Bytes of payload after the header.
    public var payloadLength: Int {
        switch self {
        case .hello(let h): return PeerProtocol.helloFixedBytes + h.resourceName.utf8.count
        case .ping, .pingAck, .trim, .zeroes, .flush, .resyncDone: return 0
        case .stateChange: return PeerProtocol.stateChangeBytes
        case .disconnect(_, let text): return 4 + text.utf8.count
        case .data(_, let payload), .resyncData(_, let payload): return payload.count
        case .writeAck, .flushAck: return 4
        case .barrier: return 8
        case .barrierAck, .bitmapDone, .resyncAck: return 16
        case .snapshot(let info): return 17 + info.label.utf8.count
        case .bitmapChunk(let c): return PeerProtocol.bitmapChunkPrefixBytes + 8 * c.words.count
        case .resyncRequest: return 12
        case .verifyRequest: return 13
        case .verifyDigest(let d): return PeerProtocol.verifyDigestPrefixBytes + d.digests.count
        }
    }

    /// Bytes of the whole frame `encode(into:)` writes.
    public var frameBytes: Int { type.headerBytes + payloadLength }

    /// Writes the whole frame (header, block extension, payload) at the start of `buffer`, which
    /// must hold `frameBytes`. Returns the bytes written. Allocates nothing.
    @discardableResult
    public func encode(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        let headerBytes = type.headerBytes
        let total = headerBytes + payloadLength
        precondition(buffer.count >= total, "\(type) frame needs \(total) bytes, buffer has \(buffer.count)")
        let base = buffer.baseAddress!
        var w = PeerWriter(base + headerBytes, count: payloadLength)
        writePayload(&w)
        precondition(w.position == payloadLength, "\(type) payload wrote \(w.position) of \(payloadLength) bytes")
        let crc = PeerEncoder.payloadCRC(UnsafeRawBufferPointer(start: base + headerBytes, count: payloadLength))
        if let block {
            PeerEncoder.encodeBlockHeader(type: type, flags: flags, sequence: sequence, block: block, payloadCRC: crc, into: base)
        } else {
            PeerEncoder.encodeHeader(type: type, flags: flags, sequence: sequence, payloadLength: payloadLength,
                                     payloadCRC: crc, into: base)
        }
        return total
    }

    /// Appends the whole frame to `bytes` (several frames sent as one item).
    public func encode(appendingTo bytes: inout [UInt8]) {
        let start = bytes.count
        bytes.append(contentsOf: repeatElement(0, count: frameBytes))
        bytes.withUnsafeMutableBytes { raw in
            _ = encode(into: UnsafeMutableRawBufferPointer(rebasing: raw[start...]))
        }
    }

    /// The whole frame as a new array (control messages, tests, the simulator).
    public func encoded() -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: frameBytes) { buffer, count in
            count = encode(into: UnsafeMutableRawBufferPointer(buffer))
        }
    }

    private func writePayload(_ w: inout PeerWriter) {
        switch self {
        case .hello(let h):
            precondition(PeerHello.isValidResourceName(h.resourceName.utf8), "bad resource name \(h.resourceName)")
            precondition(h.versionMin >= 1 && h.versionMin <= h.versionMax)
            precondition(h.nodeID <= PeerProtocol.nodeIDMax)
            precondition(h.bitmapGranularityBytes.nonzeroBitCount == 1
                && Int(h.bitmapGranularityBytes) >= PeerProtocol.bitmapGranularityBytesMin
                && Int(h.bitmapGranularityBytes) <= PeerProtocol.bitmapGranularityBytesMax)
            precondition(h.deviceSizeBytes % UInt64(Limits.blockSize) == 0)
            w.u16(h.versionMin)
            w.u16(h.versionMax)
            w.u32(h.bitmapGranularityBytes)
            w.u64(h.deviceSizeBytes)
            w.uuids(h.uuids)
            w.u8(h.nodeID)
            w.u8(h.role.rawValue)
            w.u8(h.diskState.rawValue)
            w.u8(UInt8(h.resourceName.utf8.count))
            w.bytes(h.resourceName.utf8)
            w.u64(h.outOfSyncBits)
            w.u64(h.primarySinceMillis)
        case .ping, .pingAck, .trim, .zeroes, .flush, .resyncDone:
            break
        case .stateChange(let s):
            w.uuids(s.uuids)
            w.u8(s.role.rawValue)
            w.u8(s.diskState.rawValue)
        case .disconnect(let reason, let text):
            precondition(text.utf8.count <= PeerProtocol.disconnectTextBytesMax, "disconnect text too long")
            w.u16(reason.rawValue)
            w.u16(UInt16(text.utf8.count))
            w.bytes(text.utf8)
        case .data(let write, let payload):
            precondition(payload.count == Int(write.length), "data payload is not write.length bytes")
            w.bytes(payload)
        case .resyncData(let d, let payload):
            precondition(payload.count == PeerBlock(offset: d.offset, length: d.length, result: d.result)
                .payloadLength(type: .resyncData, flags: d.flags), "resyncData payload does not match its block")
            w.bytes(payload)
        case .writeAck(_, let result), .flushAck(_, let result):
            precondition(result <= PeerProtocol.resultMax, "result \(result) is not an errno")
            w.u32(result)
        case .barrier(let epoch):
            w.u64(epoch)
        case .barrierAck(let epoch, let writes, let result):
            precondition(result <= PeerProtocol.resultMax, "result \(result) is not an errno")
            w.u64(epoch)
            w.u32(writes)
            w.u32(result)
        case .snapshot(let info):
            precondition((try? info.validate()) != nil, "snapshot: bad barrier \(info)")
            w.u64(info.id)
            w.u64(UInt64(bitPattern: info.createdUnixSeconds))
            w.u8(UInt8(info.label.utf8.count))
            w.bytes(info.label.utf8)
        case .bitmapChunk(let c):
            precondition(c.firstBit % 64 == 0 && c.bitCount >= 1 && Int(c.bitCount) <= PeerProtocol.bitmapChunkBitsMax)
            precondition(c.words.count == (Int(c.bitCount) + 63) / 64, "bitmapChunk word count")
            precondition(c.bitCount % 64 == 0 || c.words.last! >> UInt64(c.bitCount % 64) == 0, "bits past the count")
            w.u64(c.firstBit)
            w.u32(c.bitCount)
            for word in c.words { w.u64LE(word) }
        case .bitmapDone(let totalBits, let setBits):
            precondition(setBits <= totalBits)
            w.u64(totalBits)
            w.u64(setBits)
        case .resyncRequest(_, let offset, let length):
            precondition(PeerMessage.validateResyncRange(offset: offset, length: length) == nil, "bad resync range")
            w.u64(offset)
            w.u32(length)
        case .resyncAck(_, let offset, let length, let result):
            precondition(PeerMessage.validateResyncRange(offset: offset, length: length) == nil, "bad resync range")
            precondition(result <= PeerProtocol.resultMax, "result \(result) is not an errno")
            w.u64(offset)
            w.u32(length)
            w.u32(result)
        case .verifyRequest(_, let offset, let length, let algorithm):
            precondition(PeerMessage.validateVerifyRange(offset: offset, length: length) == nil, "bad verify range")
            w.u64(offset)
            w.u32(length)
            w.u8(algorithm.rawValue)
        case .verifyDigest(let d):
            precondition(PeerMessage.validateVerifyRange(offset: d.offset, length: d.length) == nil, "bad verify range")
            precondition(d.result <= PeerProtocol.resultMax, "result \(d.result) is not an errno")
            let expected = d.result == 0 ? Int(d.length) / PeerProtocol.digestBlockBytes * d.algorithm.digestBytes : 0
            precondition(d.digests.count == expected, "verifyDigest holds \(d.digests.count) digest bytes, not \(expected)")
            w.u64(d.offset)
            w.u32(d.length)
            w.u32(d.result)
            w.u8(d.algorithm.rawValue)
            w.u8(UInt8(d.algorithm.digestBytes))
            w.bytes(d.digests)
        }
    }
}

// MARK: Byte access (internal: TandemNBD has its own public helpers, kept apart to avoid clashes)

/// Reads big-endian fields in sequence. Reading past the end yields zeros and marks the reader
/// overrun, so a decoder reads a whole layout and checks once (`isExactlyConsumed`).
struct PeerReader {
    let buffer: UnsafeRawBufferPointer
    private(set) var position = 0
    private(set) var overrun = false

    init(_ buffer: UnsafeRawBufferPointer) { self.buffer = buffer }

    var remaining: Int { overrun ? 0 : buffer.count - position }
    var isExactlyConsumed: Bool { !overrun && position == buffer.count }

    private mutating func take(_ count: Int) -> Int? {
        guard !overrun, count >= 0, buffer.count - position >= count else {
            overrun = true
            return nil
        }
        defer { position += count }
        return position
    }

    mutating func u8() -> UInt8 { take(1).map { buffer[$0] } ?? 0 }
    mutating func u16() -> UInt16 { take(2).map { buffer.loadBE16(at: $0) } ?? 0 }
    mutating func u32() -> UInt32 { take(4).map { buffer.loadBE32(at: $0) } ?? 0 }
    mutating func u64() -> UInt64 { take(8).map { buffer.loadBE64(at: $0) } ?? 0 }
    mutating func u64LE() -> UInt64 {
        take(8).map { UInt64(littleEndian: buffer.loadUnaligned(fromByteOffset: $0, as: UInt64.self)) } ?? 0
    }

    /// Current, bitmap and history UUIDs (peer.md "Generation UUIDs on the wire").
    mutating func uuids() -> PeerGenerationUUIDs {
        let current = u64(), bitmap = u64()
        var history: [UInt64] = []
        history.reserveCapacity(PeerProtocol.historyUUIDCount)
        for _ in 0..<PeerProtocol.historyUUIDCount { history.append(u64()) }
        return PeerGenerationUUIDs(current: current, bitmap: bitmap, history: history)
    }

    /// `count` bytes, or an empty buffer (and overrun) when fewer remain.
    mutating func bytes(_ count: Int) -> UnsafeRawBufferPointer {
        guard let at = take(count) else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        return UnsafeRawBufferPointer(rebasing: buffer[at..<at + count])
    }
}

/// Writes big-endian fields in sequence into caller memory; running past `count` is a bug.
struct PeerWriter {
    let base: UnsafeMutableRawPointer
    let count: Int
    private(set) var position = 0

    init(_ base: UnsafeMutableRawPointer, count: Int) {
        self.base = base
        self.count = count
    }

    private mutating func advance(_ n: Int) -> Int {
        precondition(count - position >= n, "PeerWriter past its \(count) bytes")
        defer { position += n }
        return position
    }

    mutating func u8(_ v: UInt8) { base.storeBytes(of: v, toByteOffset: advance(1), as: UInt8.self) }
    mutating func u16(_ v: UInt16) { base.storeBE(v, at: advance(2)) }
    mutating func u32(_ v: UInt32) { base.storeBE(v, at: advance(4)) }
    mutating func u64(_ v: UInt64) { base.storeBE(v, at: advance(8)) }
    mutating func u64LE(_ v: UInt64) { base.storeBytes(of: v.littleEndian, toByteOffset: advance(8), as: UInt64.self) }

    mutating func uuids(_ uuids: PeerGenerationUUIDs) {
        precondition(uuids.history.count == PeerProtocol.historyUUIDCount, "history holds \(uuids.history.count) UUIDs")
        u64(uuids.current)
        u64(uuids.bitmap)
        for uuid in uuids.history { u64(uuid) }
    }

    mutating func bytes<Bytes: Collection>(_ bytes: Bytes) where Bytes.Element == UInt8 {
        let at = advance(bytes.count)
        UnsafeMutableRawBufferPointer(start: base + at, count: bytes.count).copyBytes(from: bytes)
    }
}
