/// The on-disk format of a secondary's undo store (Protocol/barriers.md "Undo store"): one
/// append-only segment file per barrier, a segment header then records, each record one chunk's
/// content as of that barrier. Little-endian and CRC-32C like the rest of Tandem's metadata.
///
/// This file holds the pieces that need no I/O: the device geometry in chunks, what a barrier is,
/// the segment and record headers, and `UndoSegmentScan`, which recovers a segment read in pieces
/// (the node reads what it asks for) and stops at the first torn or damaged record.

/// A point-in-time barrier: a consistent cut of the write stream that the secondary can restore.
public struct BarrierInfo: Equatable, Sendable {
    /// Increases with every barrier of a resource; never 0 (0 means "no barrier", a full stream).
    public var id: UInt64
    /// When the primary created it, Unix seconds (the caller passes the time in).
    public var createdUnixSeconds: Int64
    /// The operator's label, at most `Limits.barrierLabelBytesMax` bytes of UTF-8, no NUL.
    public var label: String

    public init(id: UInt64, createdUnixSeconds: Int64, label: String = "") {
        self.id = id
        self.createdUnixSeconds = createdUnixSeconds
        self.label = label
    }

    /// Checks the id and label; `UndoSegmentHeader.encode` requires it to pass.
    public func validate() throws(UndoFormatError) {
        guard id != 0 else { throw .badBarrierID(0) }
        try BarrierInfo.checkLabel(label)
    }

    /// Labels: at most 64 bytes of UTF-8 without NUL (NUL pads the field on disk).
    public static func checkLabel(_ label: String) throws(UndoFormatError) {
        let bytes = label.utf8
        guard bytes.count <= Limits.barrierLabelBytesMax else {
            throw .badLabel("\(bytes.count) bytes, at most \(Limits.barrierLabelBytesMax)")
        }
        guard !bytes.contains(0) else { throw .badLabel("contains NUL") }
    }
}

/// A device cut into chunks, the unit the undo store saves and the incremental stream carries.
/// The last chunk may be short (a device size that is not a multiple of the chunk size).
public struct UndoGeometry: Equatable, Sendable {
    public let deviceBytes: UInt64
    /// A power of two in `Limits.undoChunkBytesMin...Limits.undoChunkBytesMax`.
    public let chunkBytes: Int
    public let chunkCount: UInt64
    private let chunkShift: UInt64

    public init(deviceBytes: UInt64, chunkBytes: Int = Limits.undoChunkBytesDefault) throws(UndoFormatError) {
        guard chunkBytes.nonzeroBitCount == 1, chunkBytes >= Limits.undoChunkBytesMin, chunkBytes <= Limits.undoChunkBytesMax
        else { throw .badChunkSize(chunkBytes) }
        guard deviceBytes > 0, deviceBytes % UInt64(Limits.blockSize) == 0,
              deviceBytes / UInt64(chunkBytes) < UInt64(Limits.undoChunksMax)
        else { throw .badDeviceSize(deviceBytes) }
        self.deviceBytes = deviceBytes
        self.chunkBytes = chunkBytes
        chunkShift = UInt64(chunkBytes.trailingZeroBitCount)
        chunkCount = (deviceBytes + UInt64(chunkBytes) - 1) >> chunkShift
    }

    /// Byte offset of chunk `chunk`.
    @inline(__always)
    public func offset(ofChunk chunk: UInt64) -> UInt64 { chunk << chunkShift }

    /// Bytes of chunk `chunk`: `chunkBytes`, or less for a short last chunk.
    public func length(ofChunk chunk: UInt64) -> Int {
        precondition(chunk < chunkCount, "chunk \(chunk) past the device's \(chunkCount)")
        return Int(min(UInt64(chunkBytes), deviceBytes - offset(ofChunk: chunk)))
    }

    /// The chunk holding byte `offset`.
    @inline(__always)
    public func chunk(atByte offset: UInt64) -> UInt64 { offset >> chunkShift }

    /// The chunks a byte range touches (empty for an empty range). The range must lie inside the
    /// device: a request past the end is the NBD layer's to refuse, so here it is a bug.
    public func chunks(offset: UInt64, length: UInt64) -> Range<UInt64> {
        precondition(offset <= deviceBytes && length <= deviceBytes - offset, "range \(offset)+\(length) past the device end \(deviceBytes)")
        guard length > 0 else { return chunk(atByte: offset)..<chunk(atByte: offset) }
        return chunk(atByte: offset)..<(chunk(atByte: offset + length - 1) + 1)
    }
}

/// The header of segment `<id>.undo`: which barrier its records belong to and the geometry they
/// were saved with.
///
/// | Offset | Size | Field |
/// |---|---|---|
/// | 0 | 8 | magic `TNDMUNDO` |
/// | 8 | 4 | version (1) |
/// | 12 | 4 | CRC-32C of the 128 bytes with this field zero |
/// | 16 | 8 | barrier id |
/// | 24 | 8 | created, Unix seconds (signed) |
/// | 32 | 8 | device bytes |
/// | 40 | 4 | chunk bytes |
/// | 44 | 1 | label length |
/// | 45 | 3 | reserved, zero |
/// | 48 | 64 | label, UTF-8, zero-padded |
/// | 112 | 8 | previous barrier id (the newest when this one was made; 0 for none) |
/// | 120 | 8 | reserved, zero |
public struct UndoSegmentHeader: Equatable, Sendable {
    public static let encodedBytes = 128
    public static let magic: [UInt8] = Array("TNDMUNDO".utf8)
    public static let version: UInt32 = 1

    public var barrier: BarrierInfo
    public var geometry: UndoGeometry
    /// The barrier that was newest when this one was created: recovery uses it to notice a
    /// segment missing from the middle of the chain (whose loss makes every older barrier wrong).
    public var previousID: UInt64

    public init(barrier: BarrierInfo, geometry: UndoGeometry, previousID: UInt64) {
        self.barrier = barrier
        self.geometry = geometry
        self.previousID = previousID
    }

    /// Writes the 128-byte header into `buffer` (at least that long). An invalid barrier is a bug.
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.encodedBytes)
        do { try barrier.validate() } catch { preconditionFailure("UndoSegmentHeader.encode: \(error)") }
        precondition(previousID < barrier.id, "barrier ids increase")
        let block = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Self.encodedBytes])
        block.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, byte) in Self.magic.enumerated() { block[i] = byte }
        MetadataCoding.store(Self.version, block, 8)
        MetadataCoding.store(barrier.id, block, 16)
        MetadataCoding.store(UInt64(bitPattern: barrier.createdUnixSeconds), block, 24)
        MetadataCoding.store(geometry.deviceBytes, block, 32)
        MetadataCoding.store(UInt32(geometry.chunkBytes), block, 40)
        let label = barrier.label.utf8
        block[44] = UInt8(label.count)
        for (i, byte) in label.enumerated() { block[48 + i] = byte }
        MetadataCoding.store(previousID, block, 112)
        MetadataCoding.store(MetadataCoding.checksum(UnsafeRawBufferPointer(block), crcOffset: 12), block, 12)
    }

    public var encoded: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.encodedBytes)
        bytes.withUnsafeMutableBytes { encode(into: $0) }
        return bytes
    }

    /// Decodes and checks a header: magic, version, checksum, reserved bytes, label, geometry.
    public init(decoding bytes: UnsafeRawBufferPointer) throws(UndoFormatError) {
        let block = try checkedHeaderBlock(bytes, count: Self.encodedBytes, magic: Self.magic, version: Self.version, what: "segment")
        if let at = MetadataCoding.firstNonzero(block, 45..<48) ?? MetadataCoding.firstNonzero(block, 120..<128) {
            throw .nonzeroReserved(offset: at)
        }
        let labelLength = Int(block[44])
        guard labelLength <= Limits.barrierLabelBytesMax else { throw .badLabel("stored length \(labelLength)") }
        let labelBytes = block[48..<(48 + labelLength)]
        let label = String(decoding: labelBytes, as: UTF8.self)
        guard label.utf8.elementsEqual(labelBytes) else { throw .badLabel("not UTF-8") }
        if let at = MetadataCoding.firstNonzero(block, (48 + labelLength)..<112) { throw .nonzeroReserved(offset: at) }
        barrier = BarrierInfo(id: MetadataCoding.load64(block, 16),
                              createdUnixSeconds: Int64(bitPattern: MetadataCoding.load64(block, 24)), label: label)
        try barrier.validate()
        geometry = try UndoGeometry(deviceBytes: MetadataCoding.load64(block, 32), chunkBytes: Int(MetadataCoding.load32(block, 40)))
        previousID = MetadataCoding.load64(block, 112)
        guard previousID < barrier.id else { throw .badBarrierID(previousID) }
    }
}

/// The header before each record's data: which chunk, how long, and checksums of both.
///
/// | Offset | Size | Field |
/// |---|---|---|
/// | 0 | 4 | magic `TNUR` |
/// | 4 | 4 | CRC-32C of the 32 header bytes with this field zero |
/// | 8 | 8 | chunk index |
/// | 16 | 4 | data bytes (the chunk's length) |
/// | 20 | 4 | CRC-32C of the data |
/// | 24 | 8 | barrier id (the segment's: a record in the wrong file is refused) |
public struct UndoRecordHeader: Equatable, Sendable {
    public static let encodedBytes = 32
    public static let magic: [UInt8] = Array("TNUR".utf8)

    public var chunk: UInt64
    public var dataBytes: Int
    public var dataChecksum: UInt32
    public var barrierID: UInt64

    public init(chunk: UInt64, dataBytes: Int, dataChecksum: UInt32, barrierID: UInt64) {
        self.chunk = chunk
        self.dataBytes = dataBytes
        self.dataChecksum = dataChecksum
        self.barrierID = barrierID
    }

    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.encodedBytes && dataBytes >= 0 && dataBytes <= Int(UInt32.max))
        let block = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Self.encodedBytes])
        for (i, byte) in Self.magic.enumerated() { block[i] = byte }
        MetadataCoding.store(UInt32(0), block, 4)
        MetadataCoding.store(chunk, block, 8)
        MetadataCoding.store(UInt32(dataBytes), block, 16)
        MetadataCoding.store(dataChecksum, block, 20)
        MetadataCoding.store(barrierID, block, 24)
        MetadataCoding.store(MetadataCoding.checksum(UnsafeRawBufferPointer(block), crcOffset: 4), block, 4)
    }

    /// Decodes a record header and checks it against the segment it was found in.
    public init(decoding bytes: UnsafeRawBufferPointer, segment: UndoSegmentHeader) throws(UndoFormatError) {
        guard bytes.count >= Self.encodedBytes else { throw .tooShort(bytes: bytes.count, need: Self.encodedBytes) }
        let block = UnsafeRawBufferPointer(rebasing: bytes[0..<Self.encodedBytes])
        guard block[0..<4].elementsEqual(Self.magic) else { throw .badMagic("record") }
        let stored = MetadataCoding.load32(block, 4)
        let computed = MetadataCoding.checksum(block, crcOffset: 4)
        guard stored == computed else { throw .checksumMismatch(what: "record header", stored: stored, computed: computed) }
        chunk = MetadataCoding.load64(block, 8)
        dataBytes = Int(MetadataCoding.load32(block, 16))
        dataChecksum = MetadataCoding.load32(block, 20)
        barrierID = MetadataCoding.load64(block, 24)
        guard barrierID == segment.barrier.id else { throw .wrongBarrier(found: barrierID, expected: segment.barrier.id) }
        guard chunk < segment.geometry.chunkCount else { throw .badChunk(chunk) }
        guard dataBytes == segment.geometry.length(ofChunk: chunk) else { throw .badRecordLength(dataBytes) }
    }
}

/// Where one saved chunk lives in its segment file.
public struct UndoRecordLocation: Equatable, Sendable {
    public var chunk: UInt64
    /// Offset of the record's data (after its header) in the segment file.
    public var dataOffset: UInt64
    public var dataBytes: Int
    public var dataChecksum: UInt32

    public init(chunk: UInt64, dataOffset: UInt64, dataBytes: Int, dataChecksum: UInt32) {
        self.chunk = chunk
        self.dataOffset = dataOffset
        self.dataBytes = dataBytes
        self.dataChecksum = dataChecksum
    }

    /// Bytes the record takes in its segment, header included.
    public var recordBytes: UInt64 { UInt64(UndoRecordHeader.encodedBytes + dataBytes) }
}

/// Recovers one segment, read in pieces: ask `next` what to read, `feed` exactly those bytes,
/// until `next` is nil. The result is the header, the good records, and `validBytes`, where the
/// first torn or damaged record starts (the node truncates the file there).
///
/// Records are appended and synced before the chunk they protect is overwritten, so a torn record
/// protects nothing yet: dropping it and everything after it loses no barrier's content. A second
/// record for a chunk already seen (possible only if an append was retried) is skipped: the first
/// holds the content from before the first overwrite.
public struct UndoSegmentScan: Sendable {
    public enum Outcome: Equatable, Sendable {
        /// Every byte of the file is a good header or record.
        case clean
        /// The file ends in a torn or damaged record at `validBytes`; why.
        case torn(String)
        /// The records end at `validBytes`, where zeros follow (space preallocated for records
        /// to come, or a record header that never reached the disk): nothing was lost.
        case zeroTail
        /// The segment header itself is unusable: the segment holds nothing.
        case badHeader(UndoFormatError)
    }

    private enum State {
        case header
        case recordHeader
        case recordData(UndoRecordHeader)
        /// Fewer bytes than a record header left: zeros, or a torn header.
        case shortTail
        case done
    }

    public let fileBytes: UInt64
    public private(set) var header: UndoSegmentHeader?
    public private(set) var records: [UndoRecordLocation] = []
    /// Bytes of the file that are good: the header and whole, verified records.
    public private(set) var validBytes: UInt64 = 0
    public private(set) var outcome: Outcome?
    private var state = State.header
    private var seen: Set<UInt64> = []

    public init(fileBytes: UInt64) {
        self.fileBytes = fileBytes
        if fileBytes < UInt64(UndoSegmentHeader.encodedBytes) {
            finish(.badHeader(.tooShort(bytes: Int(fileBytes), need: UndoSegmentHeader.encodedBytes)))
        }
    }

    /// The bytes to read next, or nil when the scan is over (see `outcome`).
    public var next: (offset: UInt64, count: Int)? {
        switch state {
        case .header: return (0, UndoSegmentHeader.encodedBytes)
        case .recordHeader: return (validBytes, UndoRecordHeader.encodedBytes)
        case .recordData(let record): return (validBytes + UInt64(UndoRecordHeader.encodedBytes), record.dataBytes)
        case .shortTail: return (validBytes, Int(fileBytes - validBytes))
        case .done: return nil
        }
    }

    /// Takes the bytes `next` asked for (exactly that many).
    public mutating func feed(_ bytes: UnsafeRawBufferPointer) {
        guard let want = next else { preconditionFailure("UndoSegmentScan.feed after the end") }
        precondition(bytes.count == want.count, "UndoSegmentScan.feed: \(bytes.count) bytes, asked for \(want.count)")
        switch state {
        case .header:
            do {
                header = try UndoSegmentHeader(decoding: bytes)
            } catch {
                return finish(.badHeader(error))
            }
            validBytes = UInt64(UndoSegmentHeader.encodedBytes)
            advanceToRecord()
        case .recordHeader:
            if !bytes.contains(where: { $0 != 0 }) { return finish(.zeroTail) }
            let record: UndoRecordHeader
            do {
                record = try UndoRecordHeader(decoding: bytes, segment: header!)
            } catch {
                return finish(.torn("record at \(validBytes): \(error)"))
            }
            let end = validBytes + UInt64(UndoRecordHeader.encodedBytes) + UInt64(record.dataBytes)
            guard end <= fileBytes else { return finish(.torn("record at \(validBytes) runs past the end of the file")) }
            state = .recordData(record)
        case .recordData(let record):
            let crc = CRC32C.checksum(bytes)
            guard crc == record.dataChecksum else {
                return finish(.torn("record at \(validBytes): \(UndoFormatError.checksumMismatch(what: "record data", stored: record.dataChecksum, computed: crc))"))
            }
            let location = UndoRecordLocation(chunk: record.chunk, dataOffset: validBytes + UInt64(UndoRecordHeader.encodedBytes),
                                              dataBytes: record.dataBytes, dataChecksum: crc)
            if seen.insert(record.chunk).inserted { records.append(location) }
            validBytes += location.recordBytes
            advanceToRecord()
        case .shortTail:
            if !bytes.contains(where: { $0 != 0 }) { return finish(.zeroTail) }
            finish(.torn("\(fileBytes - validBytes) bytes of a record header at \(validBytes)"))
        case .done:
            preconditionFailure("unreachable")
        }
    }

    private mutating func advanceToRecord() {
        if validBytes == fileBytes { return finish(.clean) }
        state = fileBytes - validBytes < UInt64(UndoRecordHeader.encodedBytes) ? .shortTail : .recordHeader
    }

    private mutating func finish(_ outcome: Outcome) {
        self.outcome = outcome
        state = .done
    }

    /// Runs a whole scan over bytes in memory (tests, small segments).
    public static func scan(_ bytes: UnsafeRawBufferPointer) -> UndoSegmentScan {
        var scan = UndoSegmentScan(fileBytes: UInt64(bytes.count))
        while let want = scan.next {
            scan.feed(UnsafeRawBufferPointer(rebasing: bytes[Int(want.offset)..<Int(want.offset) + want.count]))
        }
        return scan
    }
}

/// Why undo-store or stream bytes (or values meant for them) cannot be used.
public enum UndoFormatError: Error, Equatable, Sendable, CustomStringConvertible {
    case tooShort(bytes: Int, need: Int)
    case badMagic(String)
    case unsupportedVersion(UInt32)
    case checksumMismatch(what: String, stored: UInt32, computed: UInt32)
    case nonzeroReserved(offset: Int)
    case badLabel(String)
    case badBarrierID(UInt64)
    case badChunkSize(Int)
    case badDeviceSize(UInt64)
    case badChunk(UInt64)
    case badRecordLength(Int)
    case wrongBarrier(found: UInt64, expected: UInt64)

    public var description: String {
        switch self {
        case .tooShort(let bytes, let need): "too short: \(bytes) bytes, need \(need)"
        case .badMagic(let what): "bad \(what) magic"
        case .unsupportedVersion(let v): "unsupported version \(v) (this build reads version 1)"
        case .checksumMismatch(let what, let stored, let computed):
            "\(what) checksum mismatch: stored \(hexWord(stored)), computed \(hexWord(computed))"
        case .nonzeroReserved(let offset): "reserved byte at offset \(offset) is not zero"
        case .badLabel(let why): "bad barrier label: \(why)"
        case .badBarrierID(let id): "bad barrier id \(id)"
        case .badChunkSize(let bytes):
            "chunk size \(bytes) bytes is not a power of two in \(Limits.undoChunkBytesMin)...\(Limits.undoChunkBytesMax)"
        case .badDeviceSize(let bytes):
            "device size \(bytes) bytes is zero, not a multiple of \(Limits.blockSize), or more than \(Limits.undoChunksMax) chunks"
        case .badChunk(let chunk): "chunk \(chunk) is past the device end"
        case .badRecordLength(let bytes): "record of \(bytes) bytes does not match its chunk's length"
        case .wrongBarrier(let found, let expected): "record of barrier \(found) in the segment of barrier \(expected)"
        }
    }
}

func hexWord(_ value: UInt32) -> String {
    let digits = String(value, radix: 16, uppercase: false)
    return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
}

// MARK: Limits

extension Limits {
    /// Bytes of one undo chunk by default: large enough that a record header (32 bytes) and an
    /// index entry are noise, small enough that a 4 KiB write saves little more than it changes.
    public static let undoChunkBytesDefault = 64 * 1024
    /// Smallest chunk: Tandem's block.
    public static let undoChunkBytesMin = 4096
    /// Largest chunk: the dirty bitmap's largest granule, so changed chunks map onto bitmap bits.
    public static let undoChunkBytesMax = 1 << 20
    /// Chunks of one device (the index keys chunks as u64, the bitmap as Int bits).
    public static let undoChunksMax = 1 << 32
    /// Bytes of a barrier label.
    public static let barrierLabelBytesMax = 64
    /// Barriers kept at once: each costs an open segment file (descriptor) and an index table,
    /// and a read at an old barrier looks through every newer one. 256 is ten days of hourly
    /// barriers.
    public static let barriersRetainedMax = 256
    /// Zeros written ahead of the newest undo segment's records at a time, so appends overwrite
    /// blocks the file has (see `UndoStore.preallocate`); not counted in a barrier's bytes held.
    public static let undoPreallocateBytes = 4 << 20
    /// Records in the in-memory undo index, all barriers together: about 40 bytes of memory each,
    /// so 160 MiB at most (256 GiB of saved data at 64 KiB chunks). Past it the oldest barrier is
    /// dropped, as when the disk is full.
    public static let undoRecordsMax = 4 << 20

    /// Checks how the barrier limits relate (`checkRelations` calls it).
    public static func checkBarrierRelations() {
        precondition(undoChunkBytesMin >= blockSize && undoChunkBytesMin.nonzeroBitCount == 1)
        precondition(undoChunkBytesMax <= bitmapGranularityBytesMax, "changed chunks map onto bitmap bits")
        precondition(undoChunkBytesDefault >= undoChunkBytesMin && undoChunkBytesDefault <= undoChunkBytesMax)
        precondition(undoChunksMax <= bitmapBitsMax)
        precondition(barrierLabelBytesMax <= 255, "the label length is one byte on disk")
        precondition(barriersRetainedMax >= 1 && undoRecordsMax >= 1)
        precondition(changeTrackingGranulesMax * MemoryLayout<UInt16>.stride <= 16 << 20, "changed-block tracking stays within 16 MiB")
        precondition(barriersRetainedMax < Int(UInt16.max), "the tracker renumbers its barriers into u16 sequences")
    }
}

/// The first `count` bytes of `bytes` as a header block whose magic (bytes 0..<8), version
/// (8..<12) and CRC-32C (12..<16, over the block with those bytes zeroed) are checked: the
/// common start of the undo segment header and the stream header.
func checkedHeaderBlock(_ bytes: UnsafeRawBufferPointer, count: Int, magic: [UInt8], version expected: UInt32,
                        what: String) throws(UndoFormatError) -> UnsafeRawBufferPointer {
    guard bytes.count >= count else { throw .tooShort(bytes: bytes.count, need: count) }
    let block = UnsafeRawBufferPointer(rebasing: bytes[0..<count])
    guard block[0..<8].elementsEqual(magic) else { throw .badMagic(what) }
    let version = MetadataCoding.load32(block, 8)
    guard version == expected else { throw .unsupportedVersion(version) }
    let stored = MetadataCoding.load32(block, 12)
    let computed = MetadataCoding.checksum(block, crcOffset: 12)
    guard stored == computed else { throw .checksumMismatch(what: "\(what) header", stored: stored, computed: computed) }
    return block
}
