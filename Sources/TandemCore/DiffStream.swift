/// The incremental stream `tandem diff` writes and `tandem apply` applies (Protocol/barriers.md
/// "Incremental stream"), like `zfs send -i` / `zfs recv`: the chunks that differ between two
/// barriers' images, each with the CRC-32C of its content at the base, so `apply` refuses a target
/// that does not hold the base before it writes anything. Little-endian, CRC-32C.
///
/// ```
/// header (256 bytes)
/// entry header (32 bytes) + data      one per chunk, increasing offsets
/// ...
/// trailer (32 bytes)                   count, bytes and a CRC-32C of everything before it
/// ```
///
/// `DiffStreamWriter` makes the bytes; `DiffStreamReader` checks them read in pieces (the caller
/// reads what `next` asks for), so neither ever holds a whole stream.

/// The stream header.
///
/// | Offset | Size | Field |
/// |---|---|---|
/// | 0 | 8 | magic `TNDMDIFF` |
/// | 8 | 4 | version (1) |
/// | 12 | 4 | CRC-32C of the 256 bytes with this field zero |
/// | 16 | 8 | device bytes |
/// | 24 | 4 | chunk bytes |
/// | 28 | 4 | flags: bit 0 full (every chunk; no base) |
/// | 32 | 8 | from barrier id (0 for a full stream) |
/// | 40 | 8 | to barrier id (0: the device as it was when the stream was made, no barrier) |
/// | 48 | 8 | from time, Unix seconds |
/// | 56 | 8 | to time, Unix seconds |
/// | 64 | 1 | from label length |
/// | 65 | 1 | to label length |
/// | 66 | 6 | reserved, zero |
/// | 72 | 64 | from label, zero-padded |
/// | 136 | 64 | to label, zero-padded |
/// | 200 | 56 | reserved, zero |
public struct DiffStreamHeader: Equatable, Sendable {
    public static let encodedBytes = 256
    public static let magic: [UInt8] = Array("TNDMDIFF".utf8)
    public static let version: UInt32 = 1
    static let fullFlag: UInt32 = 1

    public var geometry: UndoGeometry
    /// Every chunk of the image, no base: applies to any device of the right size.
    public var isFull: Bool { from == nil }
    /// The base barrier (nil for a full stream).
    public var from: BarrierInfo?
    /// The barrier whose image the target holds after `apply` (id 0: the device, no barrier).
    public var to: BarrierInfo

    public init(geometry: UndoGeometry, from: BarrierInfo?, to: BarrierInfo) {
        precondition(from.map { $0.id != 0 && (to.id == 0 || $0.id < to.id) } ?? true, "a stream goes from an older barrier to a newer one")
        self.geometry = geometry
        self.from = from
        self.to = to
    }

    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.encodedBytes)
        let block = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Self.encodedBytes])
        block.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, byte) in Self.magic.enumerated() { block[i] = byte }
        MetadataCoding.store(Self.version, block, 8)
        MetadataCoding.store(geometry.deviceBytes, block, 16)
        MetadataCoding.store(UInt32(geometry.chunkBytes), block, 24)
        MetadataCoding.store(isFull ? Self.fullFlag : 0, block, 28)
        let base = from ?? BarrierInfo(id: 0, createdUnixSeconds: 0)
        for (barrier, idAt, timeAt, lengthAt, labelAt) in [(base, 32, 48, 64, 72), (to, 40, 56, 65, 136)] {
            do { try BarrierInfo.checkLabel(barrier.label) } catch { preconditionFailure("DiffStreamHeader.encode: \(error)") }
            MetadataCoding.store(barrier.id, block, idAt)
            MetadataCoding.store(UInt64(bitPattern: barrier.createdUnixSeconds), block, timeAt)
            block[lengthAt] = UInt8(barrier.label.utf8.count)
            for (i, byte) in barrier.label.utf8.enumerated() { block[labelAt + i] = byte }
        }
        MetadataCoding.store(MetadataCoding.checksum(UnsafeRawBufferPointer(block), crcOffset: 12), block, 12)
    }

    public var encoded: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.encodedBytes)
        bytes.withUnsafeMutableBytes { encode(into: $0) }
        return bytes
    }

    public init(decoding bytes: UnsafeRawBufferPointer) throws(UndoFormatError) {
        let block = try checkedHeaderBlock(bytes, count: Self.encodedBytes, magic: Self.magic, version: Self.version, what: "stream")
        if let at = MetadataCoding.firstNonzero(block, 66..<72) ?? MetadataCoding.firstNonzero(block, 200..<256) {
            throw .nonzeroReserved(offset: at)
        }
        geometry = try UndoGeometry(deviceBytes: MetadataCoding.load64(block, 16), chunkBytes: Int(MetadataCoding.load32(block, 24)))
        let flags = MetadataCoding.load32(block, 28)
        guard flags & ~Self.fullFlag == 0 else { throw .nonzeroReserved(offset: 28) }
        var barriers: [BarrierInfo] = []
        for (idAt, timeAt, lengthAt, labelAt) in [(32, 48, 64, 72), (40, 56, 65, 136)] {
            let length = Int(block[lengthAt])
            guard length <= Limits.barrierLabelBytesMax else { throw .badLabel("stored length \(length)") }
            let labelBytes = block[labelAt..<(labelAt + length)]
            let label = String(decoding: labelBytes, as: UTF8.self)
            guard label.utf8.elementsEqual(labelBytes) else { throw .badLabel("not UTF-8") }
            if let at = MetadataCoding.firstNonzero(block, (labelAt + length)..<(labelAt + 64)) { throw .nonzeroReserved(offset: at) }
            try BarrierInfo.checkLabel(label)
            barriers.append(BarrierInfo(id: MetadataCoding.load64(block, idAt),
                                        createdUnixSeconds: Int64(bitPattern: MetadataCoding.load64(block, timeAt)), label: label))
        }
        to = barriers[1]
        if flags & Self.fullFlag != 0 {
            guard barriers[0] == BarrierInfo(id: 0, createdUnixSeconds: 0) else { throw .badBarrierID(barriers[0].id) }
            from = nil
        } else {
            guard barriers[0].id != 0, to.id == 0 || barriers[0].id < to.id else { throw .badBarrierID(barriers[0].id) }
            from = barriers[0]
        }
    }
}

/// One chunk of the stream; its data follows.
///
/// | Offset | Size | Field |
/// |---|---|---|
/// | 0 | 4 | magic `TNDC` |
/// | 4 | 4 | CRC-32C of the 32 bytes with this field zero |
/// | 8 | 8 | offset on the device (a chunk boundary) |
/// | 16 | 4 | length (the chunk's) |
/// | 20 | 4 | CRC-32C of the chunk's base content (0 in a full stream) |
/// | 24 | 4 | CRC-32C of the new content (the data) |
/// | 28 | 4 | reserved, zero |
public struct DiffChunkHeader: Equatable, Sendable {
    public static let encodedBytes = 32
    public static let magic: [UInt8] = Array("TNDC".utf8)

    public var offset: UInt64
    public var length: Int
    public var baseChecksum: UInt32
    public var newChecksum: UInt32

    public init(offset: UInt64, length: Int, baseChecksum: UInt32, newChecksum: UInt32) {
        self.offset = offset
        self.length = length
        self.baseChecksum = baseChecksum
        self.newChecksum = newChecksum
    }

    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.encodedBytes)
        let block = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Self.encodedBytes])
        block.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, byte) in Self.magic.enumerated() { block[i] = byte }
        MetadataCoding.store(offset, block, 8)
        MetadataCoding.store(UInt32(length), block, 16)
        MetadataCoding.store(baseChecksum, block, 20)
        MetadataCoding.store(newChecksum, block, 24)
        MetadataCoding.store(MetadataCoding.checksum(UnsafeRawBufferPointer(block), crcOffset: 4), block, 4)
    }

    init(decoding block: UnsafeRawBufferPointer) throws(UndoFormatError) {
        guard block[0..<4].elementsEqual(Self.magic) else { throw .badMagic("stream chunk") }
        let stored = MetadataCoding.load32(block, 4)
        let computed = MetadataCoding.checksum(block, crcOffset: 4)
        guard stored == computed else { throw .checksumMismatch(what: "stream chunk header", stored: stored, computed: computed) }
        if let at = MetadataCoding.firstNonzero(block, 28..<32) { throw .nonzeroReserved(offset: at) }
        offset = MetadataCoding.load64(block, 8)
        length = Int(MetadataCoding.load32(block, 16))
        baseChecksum = MetadataCoding.load32(block, 20)
        newChecksum = MetadataCoding.load32(block, 24)
    }
}

/// The stream's end.
///
/// | Offset | Size | Field |
/// |---|---|---|
/// | 0 | 8 | magic `TNDMDEND` |
/// | 8 | 8 | chunk count |
/// | 16 | 8 | data bytes (all chunks' lengths) |
/// | 24 | 4 | CRC-32C of every stream byte before the trailer |
/// | 28 | 4 | CRC-32C of the trailer's first 28 bytes |
public struct DiffStreamTrailer: Equatable, Sendable {
    public static let encodedBytes = 32
    public static let magic: [UInt8] = Array("TNDMDEND".utf8)

    public var chunkCount: UInt64
    public var dataBytes: UInt64
    public var streamChecksum: UInt32

    public init(chunkCount: UInt64, dataBytes: UInt64, streamChecksum: UInt32) {
        self.chunkCount = chunkCount
        self.dataBytes = dataBytes
        self.streamChecksum = streamChecksum
    }

    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.encodedBytes)
        for (i, byte) in Self.magic.enumerated() { buffer[i] = byte }
        MetadataCoding.store(chunkCount, buffer, 8)
        MetadataCoding.store(dataBytes, buffer, 16)
        MetadataCoding.store(streamChecksum, buffer, 24)
        MetadataCoding.store(CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buffer[0..<28])), buffer, 28)
    }

    init(decoding block: UnsafeRawBufferPointer) throws(UndoFormatError) {
        let stored = MetadataCoding.load32(block, 28)
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: block[0..<28]))
        guard stored == computed else { throw .checksumMismatch(what: "stream trailer", stored: stored, computed: computed) }
        chunkCount = MetadataCoding.load64(block, 8)
        dataBytes = MetadataCoding.load64(block, 16)
        streamChecksum = MetadataCoding.load32(block, 24)
    }
}

/// Makes a stream: `header`, then `chunkHeader` before each chunk's data (the caller writes the
/// returned bytes then the data), then `trailer`.
public struct DiffStreamWriter: Sendable {
    public let header: DiffStreamHeader
    private var running = CRC32C()
    private var lastEnd: UInt64 = 0
    public private(set) var chunkCount: UInt64 = 0
    public private(set) var dataBytes: UInt64 = 0
    private var started = false

    public init(header: DiffStreamHeader) {
        self.header = header
    }

    /// The header's bytes; first.
    public mutating func headerBytes() -> [UInt8] {
        precondition(!started)
        started = true
        let bytes = header.encoded
        bytes.withUnsafeBytes { running.update($0) }
        return bytes
    }

    /// The entry header for the chunk at `offset` whose new content is `data` and whose base
    /// content had checksum `baseChecksum` (ignored in a full stream). Chunks go in increasing
    /// offset order.
    public mutating func chunkHeader(offset: UInt64, data: UnsafeRawBufferPointer, baseChecksum: UInt32) -> [UInt8] {
        let geometry = header.geometry
        precondition(started && offset % UInt64(geometry.chunkBytes) == 0 && (chunkCount == 0 || offset >= lastEnd))
        precondition(data.count == geometry.length(ofChunk: geometry.chunk(atByte: offset)))
        let entry = DiffChunkHeader(offset: offset, length: data.count, baseChecksum: header.isFull ? 0 : baseChecksum,
                                    newChecksum: CRC32C.checksum(data))
        var bytes = [UInt8](repeating: 0, count: DiffChunkHeader.encodedBytes)
        bytes.withUnsafeMutableBytes { entry.encode(into: $0) }
        bytes.withUnsafeBytes { running.update($0) }
        running.update(data)
        lastEnd = offset + UInt64(data.count)
        chunkCount += 1
        dataBytes += UInt64(data.count)
        return bytes
    }

    /// The trailer's bytes; last.
    public func trailerBytes() -> [UInt8] {
        precondition(started)
        var bytes = [UInt8](repeating: 0, count: DiffStreamTrailer.encodedBytes)
        bytes.withUnsafeMutableBytes {
            DiffStreamTrailer(chunkCount: chunkCount, dataBytes: dataBytes, streamChecksum: running.value).encode(into: $0)
        }
        return bytes
    }
}

/// Checks a stream read in order, in pieces: read `next` bytes, `feed` them, act on the event,
/// until `.end`. Any damage is a `DiffStreamError` naming where; after `.end` the stream must end
/// (the caller checks there are no bytes left).
public struct DiffStreamReader: Sendable {
    public enum Event: Equatable, Sendable {
        case header(DiffStreamHeader)
        /// An entry header; its data comes next.
        case chunkHeader(DiffChunkHeader)
        /// The data of the last `chunkHeader`, checked against its new checksum.
        case chunkData(DiffChunkHeader)
        case end(DiffStreamTrailer)
    }

    private enum State {
        case header
        case entryOrTrailer
        case data(DiffChunkHeader)
        case done
    }

    private var state = State.header
    private var running = CRC32C()
    /// Stream bytes consumed so far.
    public private(set) var position: UInt64 = 0
    public private(set) var header: DiffStreamHeader?
    public private(set) var chunkCount: UInt64 = 0
    public private(set) var dataBytes: UInt64 = 0
    private var nextOffsetMin: UInt64 = 0

    public init() {}

    /// Bytes to read next; nil after `.end`.
    public var next: Int? {
        switch state {
        case .header: return DiffStreamHeader.encodedBytes
        case .entryOrTrailer: return DiffChunkHeader.encodedBytes
        case .data(let entry): return entry.length
        case .done: return nil
        }
    }

    /// Takes exactly the bytes `next` asked for.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer) throws(DiffStreamError) -> Event {
        guard let want = next else { preconditionFailure("DiffStreamReader.feed after the end") }
        precondition(bytes.count == want, "DiffStreamReader.feed: \(bytes.count) bytes, asked for \(want)")
        let at = position
        func fail(_ what: String) -> DiffStreamError { DiffStreamError(offset: at, message: what) }
        switch state {
        case .header:
            let decoded: DiffStreamHeader
            do { decoded = try DiffStreamHeader(decoding: bytes) } catch { throw fail("not a usable stream header: \(error)") }
            header = decoded
            consume(bytes)
            state = .entryOrTrailer
            return .header(decoded)
        case .entryOrTrailer:
            if bytes[0..<8].elementsEqual(DiffStreamTrailer.magic) {
                let trailer: DiffStreamTrailer
                do { trailer = try DiffStreamTrailer(decoding: bytes) } catch { throw fail("\(error)") }
                guard trailer.streamChecksum == running.value else {
                    throw fail("stream checksum mismatch: trailer says \(hexWord(trailer.streamChecksum)), the bytes give \(hexWord(running.value))")
                }
                guard trailer.chunkCount == chunkCount, trailer.dataBytes == dataBytes else {
                    throw fail("trailer counts \(trailer.chunkCount) chunks of \(trailer.dataBytes) bytes, the stream has \(chunkCount) of \(dataBytes)")
                }
                position += UInt64(bytes.count)
                state = .done
                return .end(trailer)
            }
            let entry: DiffChunkHeader
            do { entry = try DiffChunkHeader(decoding: bytes) } catch { throw fail("\(error)") }
            let geometry = header!.geometry
            guard entry.offset % UInt64(geometry.chunkBytes) == 0, entry.offset < geometry.deviceBytes else {
                throw fail("chunk offset \(entry.offset) is not a chunk boundary inside the \(geometry.deviceBytes)-byte device")
            }
            guard entry.offset >= nextOffsetMin else { throw fail("chunk offset \(entry.offset) out of order") }
            guard entry.length == geometry.length(ofChunk: geometry.chunk(atByte: entry.offset)) else {
                throw fail("chunk at \(entry.offset) is \(entry.length) bytes, not its chunk's length")
            }
            guard !header!.isFull || entry.baseChecksum == 0 else { throw fail("full stream with a base checksum") }
            consume(bytes)
            state = .data(entry)
            return .chunkHeader(entry)
        case .data(let entry):
            let crc = CRC32C.checksum(bytes)
            guard crc == entry.newChecksum else {
                throw fail("data of the chunk at \(entry.offset) is damaged (checksum \(hexWord(crc)), expected \(hexWord(entry.newChecksum)))")
            }
            consume(bytes)
            chunkCount += 1
            dataBytes += UInt64(entry.length)
            nextOffsetMin = entry.offset + UInt64(entry.length)
            state = .entryOrTrailer
            return .chunkData(entry)
        case .done:
            preconditionFailure("unreachable")
        }
    }

    private mutating func consume(_ bytes: UnsafeRawBufferPointer) {
        running.update(bytes)
        position += UInt64(bytes.count)
    }

    /// What `apply` does with a chunk, given the checksum of the target's current content: write
    /// it (the target holds the base), skip it (the target already holds the new content: a run
    /// that stopped half way), or refuse the whole stream (neither: the wrong base).
    public static func decide(_ entry: DiffChunkHeader, full: Bool, targetChecksum: UInt32) -> ApplyDecision {
        if targetChecksum == entry.newChecksum { return .alreadyApplied }
        if full || targetChecksum == entry.baseChecksum { return .write }
        return .wrongBase
    }

    public enum ApplyDecision: Equatable, Sendable {
        case write, alreadyApplied, wrongBase
    }
}

/// A damaged or unusable stream: where and why.
public struct DiffStreamError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Offset in the stream of the piece that failed.
    public var offset: UInt64
    public var message: String

    public init(offset: UInt64, message: String) {
        self.offset = offset
        self.message = message
    }

    public var description: String { "stream byte \(offset): \(message)" }
}
