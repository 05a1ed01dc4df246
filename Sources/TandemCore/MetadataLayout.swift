/// Where each part of a resource's metadata lives in its metadata file.
///
/// Tandem keeps metadata in a file of its own (DRBD's "external metadata"), never inside the data
/// device: the exported device keeps its full size, and a metadata write never competes with a
/// data write for the same sectors. Every part starts on a 4 KiB boundary so each metadata write
/// is one aligned block, as O_DIRECT needs. See Protocol/metadata.md "Layout".
///
/// ```
/// 0                      superblock slot A (4 KiB)
/// 4096                   superblock slot B (4 KiB)
/// 8192                   activity-log ring: activityLogSlotCount transactions of 4 KiB
/// bitmapOffset           dirty bitmap: bitmapPageCount pages of 4 KiB
/// totalBytes             end
/// ```
public struct MetadataLayout: Equatable, Sendable {
    /// The unit of every metadata write: a superblock slot, an AL transaction, a bitmap page.
    public static let blockBytes = Limits.metadataBlockBytes
    /// Superblock slots: written alternately, so a torn write leaves the other one intact.
    public static let superblockSlotCount = 2

    public let deviceBytes: UInt64
    public let granularityBytes: Int
    public let activityLogSlotCount: Int

    /// Offset of the first activity-log transaction slot.
    public let activityLogOffset: UInt64
    /// Bytes of the activity-log ring (`activityLogSlotCount` blocks).
    public let activityLogBytes: UInt64
    /// Offset of the first bitmap page.
    public let bitmapOffset: UInt64
    /// Bytes of the bitmap on disk, whole 4 KiB pages.
    public let bitmapBytes: UInt64
    /// Bytes of the whole metadata file.
    public let totalBytes: UInt64

    /// Computes the layout, refusing values that no node could use (the CLI passes user input here,
    /// so these are errors, not preconditions).
    public init(deviceBytes: UInt64, granularityBytes: Int, activityLogSlotCount: Int) throws(MetadataError) {
        try MetadataLayout.check(deviceBytes: deviceBytes, granularityBytes: granularityBytes)
        guard activityLogSlotCount >= Limits.activityLogRingSlotsMin,
              activityLogSlotCount <= Limits.activityLogRingSlotsMax
        else { throw .badActivityLogSlotCount(activityLogSlotCount) }

        let block = UInt64(MetadataLayout.blockBytes)
        self.deviceBytes = deviceBytes
        self.granularityBytes = granularityBytes
        self.activityLogSlotCount = activityLogSlotCount
        activityLogOffset = UInt64(MetadataLayout.superblockSlotCount) * block
        activityLogBytes = UInt64(activityLogSlotCount) * block
        bitmapOffset = activityLogOffset + activityLogBytes
        bitmapBytes = UInt64(DirtyBitmap.pageCount(deviceBytes: deviceBytes, granularityBytes: granularityBytes)) * block
        totalBytes = bitmapOffset + bitmapBytes
        precondition(bitmapOffset % block == 0 && totalBytes % block == 0)
    }

    /// Checks the device size and granularity a bitmap can be built for.
    static func check(deviceBytes: UInt64, granularityBytes: Int) throws(MetadataError) {
        guard granularityBytes >= Limits.bitmapGranularityBytesMin,
              granularityBytes <= Limits.bitmapGranularityBytesMax,
              granularityBytes.nonzeroBitCount == 1
        else { throw .badGranularity(granularityBytes) }
        guard deviceBytes > 0,
              DirtyBitmap.bitCount(deviceBytes: deviceBytes, granularityBytes: granularityBytes) <= Limits.bitmapBitsMax
        else { throw .badDeviceSize(deviceBytes) }
    }

    /// Bitmap pages, each `blockBytes` long.
    public var bitmapPageCount: Int { Int(bitmapBytes / UInt64(MetadataLayout.blockBytes)) }

    /// Offset of superblock slot 0 (A) or 1 (B).
    public func superblockOffset(slot: Int) -> UInt64 {
        precondition(slot >= 0 && slot < MetadataLayout.superblockSlotCount)
        return UInt64(slot * MetadataLayout.blockBytes)
    }

    /// Offset of activity-log ring slot `slot` (a transaction's `slot`).
    public func activityLogSlotOffset(_ slot: Int) -> UInt64 {
        precondition(slot >= 0 && slot < activityLogSlotCount)
        return activityLogOffset + UInt64(slot) * UInt64(MetadataLayout.blockBytes)
    }

    /// Offset of bitmap page `page` (as numbered by `DirtyBitmap`).
    public func bitmapPageOffset(_ page: Int) -> UInt64 {
        precondition(page >= 0 && page < bitmapPageCount)
        return bitmapOffset + UInt64(page) * UInt64(MetadataLayout.blockBytes)
    }
}

/// Why on-disk metadata (or the values meant for it) cannot be used.
public enum MetadataError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The buffer is shorter than one metadata block.
    case tooShort(bytes: Int)
    /// The block is all zeros: never written (a fresh slot), not damaged.
    case blank
    case badMagic
    case unsupportedVersion(UInt32)
    case checksumMismatch(stored: UInt32, computed: UInt32)
    /// A superblock whose sequence belongs in the other slot: written to the wrong place.
    case wrongSlot(sequence: UInt64, slot: Int)
    case badResourceName(String)
    case badNodeID(Int)
    case unknownFlags(UInt32)
    case contradictoryFlags(UInt32)
    case badDeviceSize(UInt64)
    case badGranularity(Int)
    case badExtentSize(Int)
    case badExtentCount(Int)
    case badActivityLogSlotCount(Int)
    /// A stored offset or length differs from what the stored sizes imply.
    case layoutMismatch(field: String, stored: UInt64, expected: UInt64)
    /// Bytes that version 1 keeps zero are not: garbage, or a newer format.
    case nonzeroReserved(offset: Int)

    public var description: String {
        switch self {
        case .tooShort(let bytes): "metadata block too short: \(bytes) bytes, need \(Limits.metadataBlockBytes)"
        case .blank: "metadata block is blank (never written)"
        case .badMagic: "not Tandem metadata (bad magic)"
        case .unsupportedVersion(let v): "unsupported metadata version \(v) (this build reads version 1)"
        case .checksumMismatch(let stored, let computed):
            "metadata checksum mismatch: stored \(hex32(stored)), computed \(hex32(computed)) (torn or damaged write)"
        case .wrongSlot(let sequence, let slot): "superblock sequence \(sequence) found in slot \(slot), belongs in slot \(sequence % 2)"
        case .badResourceName(let why): "bad resource name: \(why)"
        case .badNodeID(let id): "node id \(id) out of range 0...\(Limits.metadataNodeIDMax)"
        case .unknownFlags(let bits): "unknown superblock flags \(hex32(bits))"
        case .contradictoryFlags(let bits): "contradictory superblock flags \(hex32(bits)) (resync target marked consistent)"
        case .badDeviceSize(let bytes):
            "device size \(bytes) bytes is zero or needs more than \(Limits.bitmapBitsMax) bitmap bits (use a larger granularity)"
        case .badGranularity(let bytes):
            "bitmap granularity \(bytes) bytes is not a power of two in \(Limits.bitmapGranularityBytesMin)...\(Limits.bitmapGranularityBytesMax)"
        case .badExtentSize(let bytes):
            "activity-log extent \(bytes) bytes is not a power of two in \(Limits.activityLogExtentBytesMin)...\(Limits.activityLogExtentBytesMax) at least the granularity"
        case .badExtentCount(let count):
            "activity-log extents \(count) out of range \(Limits.activityLogExtentsMin)...\(Limits.activityLogExtentsMax) or more than the ring can describe"
        case .badActivityLogSlotCount(let count):
            "activity-log ring of \(count) slots out of range \(Limits.activityLogRingSlotsMin)...\(Limits.activityLogRingSlotsMax)"
        case .layoutMismatch(let field, let stored, let expected): "metadata layout mismatch: \(field) is \(stored), expected \(expected)"
        case .nonzeroReserved(let offset): "reserved metadata byte at offset \(offset) is not zero"
        }
    }
}

private func hex32(_ value: UInt32) -> String {
    let digits = String(value, radix: 16, uppercase: false)
    return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
}

// MARK: Limits

extension Limits {
    /// Bytes of one metadata block (superblock slot, AL transaction, bitmap page).
    public static let metadataBlockBytes = 4096
    /// Bytes of device one bitmap bit covers, by default (DRBD's 4 KiB).
    public static let bitmapGranularityBytesDefault = 4096
    /// Smallest granularity: Tandem's block; a smaller one would only grow the bitmap.
    public static let bitmapGranularityBytesMin = 4096
    /// Largest granularity (DRBD 9.3 allows 4 KiB .. 1 MiB): beyond it one 4 KiB write would
    /// resync a megabyte.
    public static let bitmapGranularityBytesMax = 1 << 20
    /// Bits in one bitmap: 512 MiB of memory, 16 TiB of device at 4 KiB granularity.
    public static let bitmapBitsMax = 1 << 32
    /// Bytes of one activity-log extent, by default (DRBD's 4 MiB).
    public static let activityLogExtentBytesDefault = 4 << 20
    /// Smallest extent: keeps the largest NBD write within a handful of extents.
    public static let activityLogExtentBytesMin = 4 << 20
    /// Largest extent: a crashed primary resyncs every hot extent whole.
    public static let activityLogExtentBytesMax = 1 << 30
    /// Hot extents, by default: DRBD's 1237 (about 4.8 GiB of device at 4 MiB).
    public static let activityLogExtentsDefault = 1237
    /// Fewest hot extents: room for two of the largest writes at once.
    public static let activityLogExtentsMin = 2 * (nbdRequestBytesMax / activityLogExtentBytesMin + 1)
    /// Most hot extents (DRBD's 65534).
    public static let activityLogExtentsMax = 65534
    /// Transaction slots in the on-disk AL ring, by default (DRBD's 32 KiB ring).
    public static let activityLogRingSlotsDefault = 8
    /// Fewest ring slots: one may be torn, the rest must describe the whole log.
    public static let activityLogRingSlotsMin = 2
    /// Most ring slots (4 MiB of ring).
    public static let activityLogRingSlotsMax = 1024
    /// Bytes of a resource name in the superblock.
    public static let metadataResourceNameBytesMax = 64
    /// Largest node id (DRBD's 32 peers).
    public static let metadataNodeIDMax = 31

    /// Checks how the metadata limits relate; a node calls it once at start, with `checkRelations`.
    public static func checkMetadataRelations() {
        precondition(metadataBlockBytes == blockSize, "metadata blocks are Tandem blocks")
        precondition(bitmapGranularityBytesMin >= blockSize)
        precondition(bitmapGranularityBytesMin.nonzeroBitCount == 1 && bitmapGranularityBytesMax.nonzeroBitCount == 1)
        precondition(bitmapGranularityBytesDefault >= bitmapGranularityBytesMin)
        precondition(bitmapGranularityBytesDefault <= bitmapGranularityBytesMax)
        precondition(activityLogExtentBytesMin >= bitmapGranularityBytesMax, "an extent covers whole granules")
        precondition(activityLogExtentBytesDefault >= activityLogExtentBytesMin)
        precondition(activityLogExtentBytesDefault <= activityLogExtentBytesMax)
        // One write must fit in one transaction and in the log, or it could never proceed.
        let extentsPerWriteMax = ActivityLog.extentsPerWriteMax(writeBytesMax: nbdRequestBytesMax, extentBytes: activityLogExtentBytesMin)
        precondition(extentsPerWriteMax <= ActivityLog.updatesPerTransactionMax)
        precondition(extentsPerWriteMax <= activityLogExtentsMin)
        precondition(activityLogExtentsDefault >= activityLogExtentsMin && activityLogExtentsDefault <= activityLogExtentsMax)
        precondition(ActivityLog.ringSlotsMin(capacity: activityLogExtentsDefault) <= activityLogRingSlotsDefault)
        precondition(ActivityLog.ringSlotsMin(capacity: activityLogExtentsMax) <= activityLogRingSlotsMax)
        precondition(activityLogRingSlotsMin >= 2, "one slot may be torn")
        precondition(activityLogExtentsMax < Int(UInt32.max), "extent numbers are u32 on disk")
        precondition(metadataResourceNameBytesMax <= 255, "the name length is one byte on disk")
        precondition(metadataNodeIDMax <= Int(UInt8.max))
    }
}

// MARK: Little-endian coding

/// Little-endian loads and stores for on-disk metadata. Metadata is little-endian (unlike NBD's
/// network order) because the bitmap is stored as the host's own words on every host Tandem runs
/// on, and one byte order for the whole file is simpler to read in a hex dump.
enum MetadataCoding {
    @inline(__always)
    static func load16(_ bytes: UnsafeRawBufferPointer, _ offset: Int) -> UInt16 {
        UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }

    @inline(__always)
    static func load32(_ bytes: UnsafeRawBufferPointer, _ offset: Int) -> UInt32 {
        UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    @inline(__always)
    static func load64(_ bytes: UnsafeRawBufferPointer, _ offset: Int) -> UInt64 {
        UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }

    @inline(__always)
    static func store(_ value: UInt16, _ bytes: UnsafeMutableRawBufferPointer, _ offset: Int) {
        bytes.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt16.self)
    }

    @inline(__always)
    static func store(_ value: UInt32, _ bytes: UnsafeMutableRawBufferPointer, _ offset: Int) {
        bytes.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self)
    }

    @inline(__always)
    static func store(_ value: UInt64, _ bytes: UnsafeMutableRawBufferPointer, _ offset: Int) {
        bytes.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt64.self)
    }

    /// CRC-32C of a block whose 4-byte checksum field at `crcOffset` counts as zero.
    static func checksum(_ block: UnsafeRawBufferPointer, crcOffset: Int) -> UInt32 {
        var crc = CRC32C()
        crc.update(UnsafeRawBufferPointer(rebasing: block[0..<crcOffset]))
        let zero: UInt32 = 0
        withUnsafeBytes(of: zero) { crc.update($0) }
        crc.update(UnsafeRawBufferPointer(rebasing: block[(crcOffset + 4)...]))
        return crc.value
    }

    /// Whether every byte in `range` is zero.
    static func isZero(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Bool {
        var at = range.lowerBound
        while at + 8 <= range.upperBound {
            if bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self) != 0 { return false }
            at += 8
        }
        while at < range.upperBound {
            if bytes[at] != 0 { return false }
            at += 1
        }
        return true
    }

    /// Offset of the first nonzero byte in `range`, if any.
    static func firstNonzero(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Int? {
        for at in range where bytes[at] != 0 { return at }
        return nil
    }
}
