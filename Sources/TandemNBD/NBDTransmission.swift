import TandemCore

/// One request from a client (proto.md "Request message").
public struct NBDRequest: Sendable, Equatable {
    public var flags: UInt16
    /// The command code as sent; `command` is nil for codes this server does not know.
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public var command: NBD.Command? { NBD.Command(rawValue: type) }

    /// Bytes of payload that follow the header on the wire (only WRITE carries one).
    public var payloadLength: Int { type == NBD.Command.write.rawValue ? Int(length) : 0 }

    public func has(_ flag: UInt16) -> Bool { flags & flag != 0 }
}

/// Decoding, validation and reply encoding for the transmission phase. Pure functions over
/// caller-owned memory: nothing here allocates, so the hot path stays allocation-free.
public enum NBDTransmission {
    public enum DecodeResult: Equatable {
        case needMore
        case request(NBDRequest)
        /// The stream is out of step (bad magic): the only safe answer is to close.
        case invalid(String)
    }

    /// Decodes the request header at the start of `bytes` (28 bytes are consumed on success).
    @inline(__always)
    public static func decode(_ bytes: UnsafeRawBufferPointer) -> DecodeResult {
        guard bytes.count >= NBD.requestHeaderBytes else { return .needMore }
        let magic = bytes.loadBE32(at: 0)
        guard magic == NBD.requestMagic else {
            return .invalid("bad request magic 0x\(String(magic, radix: 16))")
        }
        return .request(NBDRequest(
            flags: bytes.loadBE16(at: 4), type: bytes.loadBE16(at: 6), cookie: bytes.loadBE64(at: 8),
            offset: bytes.loadBE64(at: 16), length: bytes.loadBE32(at: 24)))
    }

    /// The flags each command accepts (FUA is valid on every command once advertised).
    static func allowedFlags(_ command: NBD.Command, _ session: NBDSession) -> UInt16 {
        typealias F = NBD.CommandFlag
        switch command {
        case .read: return F.fua | (session.structuredReplies ? F.dontFragment : 0)
        case .writeZeroes: return F.fua | F.noHole | F.fastZero
        case .blockStatus: return F.fua | F.reqOne
        case .write, .disconnect, .flush, .trim, .cache: return F.fua
        }
    }

    /// Checks a request against the session. Returns `.ok` or the error to reply with; a
    /// rejected WRITE's payload must still be read and dropped so the stream stays in step.
    public static func validate(_ request: NBDRequest, _ session: NBDSession) -> NBD.Errno {
        guard let command = request.command else { return .inval }
        if request.flags & ~allowedFlags(command, session) != 0 { return .inval }
        let export = session.export
        let offset = request.offset
        let length = UInt64(request.length)
        let (end, overflow) = offset.addingReportingOverflow(length)
        let aligned = offset % UInt64(export.blockSizeMin) == 0 && length % UInt64(export.blockSizeMin) == 0
        switch command {
        case .read:
            if length == 0 || length > UInt64(export.blockSizeMax) { return .inval }
            if overflow || end > export.size { return .inval }
            if !aligned { return .inval }
        case .write:
            if export.readOnly { return .perm }
            if length == 0 || length > UInt64(export.blockSizeMax) { return .inval }
            if overflow || end > export.size { return .nospc }
            if !aligned { return .inval }
        case .writeZeroes:
            if export.readOnly { return .perm }
            if length == 0 { return .inval }
            if overflow || end > export.size { return .nospc }
            if !aligned { return .inval }
            if request.has(NBD.CommandFlag.fastZero) && !export.canFastZero { return .notsup }
        case .trim:
            if export.readOnly { return .perm }
            if length == 0 { return .inval }
            if overflow || end > export.size { return .inval }
            if !aligned { return .inval }
        case .cache:
            if overflow || end > export.size { return .inval }
        case .blockStatus:
            if session.contexts.isEmpty { return .inval }
            if length == 0 || overflow || end > export.size { return .inval }
        case .flush:
            if offset != 0 || length != 0 { return .inval }
        case .disconnect:
            break
        }
        return .ok
    }

    // MARK: Reply encoding (into caller memory)

    /// A simple reply: magic, error, cookie. Returns the bytes written (16).
    @inline(__always)
    @discardableResult
    public static func encodeSimpleReply(cookie: UInt64, error: NBD.Errno, into p: UnsafeMutableRawPointer) -> Int {
        p.storeBE(NBD.simpleReplyMagic, at: 0)
        p.storeBE(error.rawValue, at: 4)
        p.storeBE(cookie, at: 8)
        return NBD.simpleReplyBytes
    }

    /// A structured reply chunk header. Returns the bytes written (20).
    @inline(__always)
    @discardableResult
    public static func encodeChunkHeader(
        flags: UInt16, type: UInt16, cookie: UInt64, length: UInt32, into p: UnsafeMutableRawPointer
    ) -> Int {
        p.storeBE(NBD.structuredReplyMagic, at: 0)
        p.storeBE(flags, at: 4)
        p.storeBE(type, at: 6)
        p.storeBE(cookie, at: 8)
        p.storeBE(length, at: 16)
        return NBD.structuredChunkHeaderBytes
    }

    /// The header of a one-chunk structured READ reply whose `dataLength` bytes follow.
    /// Returns the bytes written (28).
    @inline(__always)
    @discardableResult
    public static func encodeReadChunkHeader(
        cookie: UInt64, offset: UInt64, dataLength: Int, into p: UnsafeMutableRawPointer
    ) -> Int {
        encodeChunkHeader(
            flags: NBD.chunkFlagDone, type: NBD.ChunkType.offsetData, cookie: cookie,
            length: UInt32(8 + dataLength), into: p)
        p.storeBE(offset, at: 20)
        return 28
    }

    /// A final ERROR chunk without a message. Returns the bytes written (26).
    @inline(__always)
    @discardableResult
    public static func encodeErrorChunk(cookie: UInt64, error: NBD.Errno, into p: UnsafeMutableRawPointer) -> Int {
        encodeChunkHeader(flags: NBD.chunkFlagDone, type: NBD.ChunkType.error, cookie: cookie, length: 6, into: p)
        p.storeBE(error.rawValue, at: 20)
        p.storeBE(UInt16(0), at: 24)
        return 26
    }

    /// The reply to any request, for the error path and for commands without data: structured
    /// ERROR chunks where the spec requires structured replies (READ and BLOCK_STATUS), simple
    /// replies otherwise. Returns the bytes written (at most `replyHeaderBytesMax`).
    @inline(__always)
    @discardableResult
    public static func encodeStatusReply(
        _ request: NBDRequest, error: NBD.Errno, session: NBDSession, into p: UnsafeMutableRawPointer
    ) -> Int {
        let needsStructured = session.structuredReplies
            && (request.type == NBD.Command.read.rawValue || request.type == NBD.Command.blockStatus.rawValue)
        if needsStructured && error != .ok {
            return encodeErrorChunk(cookie: request.cookie, error: error, into: p)
        }
        if needsStructured {
            return encodeChunkHeader(flags: NBD.chunkFlagDone, type: NBD.ChunkType.none, cookie: request.cookie, length: 0, into: p)
        }
        return encodeSimpleReply(cookie: request.cookie, error: error, into: p)
    }

    /// Room a reply header may need (the largest of the encoders above).
    public static let replyHeaderBytesMax = 32

    /// Encodes a BLOCK_STATUS chunk for context `contextID` into `p`: header, context id, then
    /// `extents` (length, flags) pairs. A reply has one chunk per selected context; only the
    /// `last` carries the DONE flag. Returns bytes written; `p` needs 24 + 8 * count bytes.
    public static func encodeBlockStatus(
        cookie: UInt64, contextID: UInt32 = NBD.baseAllocationContextID, last: Bool = true,
        extents: UnsafeBufferPointer<(length: UInt32, flags: UInt32)>, into p: UnsafeMutableRawPointer
    ) -> Int {
        let payload = 4 + 8 * extents.count
        encodeChunkHeader(flags: last ? NBD.chunkFlagDone : 0, type: NBD.ChunkType.blockStatus, cookie: cookie, length: UInt32(payload), into: p)
        p.storeBE(contextID, at: 20)
        var at = 24
        for extent in extents {
            p.storeBE(extent.length, at: at)
            p.storeBE(extent.flags, at: at + 4)
            at += 8
        }
        return at
    }
}
