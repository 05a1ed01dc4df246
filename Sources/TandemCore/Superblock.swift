/// The metadata header: who this resource is, what generation of data it holds, how its activity
/// log and bitmap are laid out. Encoded into exactly one 4 KiB block, little-endian, checksummed
/// with CRC-32C.
///
/// Two slots (A at offset 0, B at 4096) hold the two most recent versions. Each write goes to the
/// slot its `sequence` names (`sequence % 2`), after incrementing the sequence, so consecutive
/// writes alternate and a torn write destroys at most the version being replaced: the other slot
/// still holds the previous one. At attach the node decodes both and takes `newest`.
///
/// Byte offsets (Protocol/metadata.md "Superblock"):
///
/// | Offset | Size | Field |
/// |---|---|---|
/// | 0 | 8 | magic `TNDMMETA` |
/// | 8 | 4 | version (1) |
/// | 12 | 4 | CRC-32C of the 4096 bytes with this field zero |
/// | 16 | 8 | sequence |
/// | 24 | 8 | created, Unix seconds (signed) |
/// | 32 | 8 | device bytes |
/// | 40 | 8 | current UUID |
/// | 48 | 8 | bitmap UUID |
/// | 56 | 8 | history UUID 0 (newer) |
/// | 64 | 8 | history UUID 1 (older) |
/// | 72 | 4 | flags (bit 0 consistent, 1 outdated, 2 wasPrimary, 3 newZeroed, 4 resyncTarget, 5 crashedPrimary) |
/// | 76 | 1 | node id |
/// | 77 | 1 | resource name length |
/// | 78 | 2 | reserved, zero |
/// | 80 | 64 | resource name, UTF-8, zero-padded |
/// | 144 | 4 | bitmap granularity bytes |
/// | 148 | 4 | activity-log extent bytes |
/// | 152 | 4 | activity-log extents (hot at most) |
/// | 156 | 4 | activity-log ring slots |
/// | 160 | 8 | activity-log ring offset |
/// | 168 | 8 | bitmap offset |
/// | 176 | 8 | bitmap bytes |
/// | 184 | 8 | metadata total bytes |
/// | 192 | 3904 | reserved, zero |
public struct Superblock: Equatable, Sendable {
    /// Bytes of one encoded superblock (one slot).
    public static let encodedBytes = Limits.metadataBlockBytes
    /// "TNDMMETA", the first eight bytes.
    public static let magic: [UInt8] = Array("TNDMMETA".utf8)
    /// The format this build writes and reads.
    public static let version: UInt32 = 1

    /// What the node knew about its data and role when it last wrote the superblock.
    public struct Flags: OptionSet, Equatable, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }

        /// The data is a consistent image (UpToDate, or Outdated): it may be a sync source.
        public static let consistent = Flags(rawValue: 1 << 0)
        /// Consistent but known to be older than the peer's (the peer wrote without us): it must
        /// not be promoted.
        public static let outdated = Flags(rawValue: 1 << 1)
        /// Set while this node is primary and cleared when it demotes cleanly (after its bitmap
        /// is on disk); found set at attach, it means a crashed primary: the activity log's hot
        /// extents must be marked out of sync.
        public static let wasPrimary = Flags(rawValue: 1 << 2)
        /// Created on a new or zeroed device and never written: if the peer's is too, the
        /// initial sync can be skipped.
        public static let newZeroed = Flags(rawValue: 1 << 3)
        /// The target of a resync that has not finished: Inconsistent (never with `consistent`).
        public static let resyncTarget = Flags(rawValue: 1 << 4)
        /// Set at attach when `wasPrimary` was found set (a crash as primary), and kept until a
        /// resync with the peer finishes: `wasPrimary` itself is cleared by the next clean
        /// demotion, which must not erase the fact that this node's hot extents still need
        /// resyncing (DRBD's `MDF_CRASHED_PRIMARY`).
        public static let crashedPrimary = Flags(rawValue: 1 << 5)

        /// Every flag version 1 knows.
        public static let known: Flags = [.consistent, .outdated, .wasPrimary, .newZeroed, .resyncTarget, .crashedPrimary]
    }

    /// Increases by one with every write; `sequence % 2` is the slot it goes to.
    public var sequence: UInt64
    /// The resource's name, at most 64 bytes of UTF-8, no NUL.
    public var resourceName: String
    /// This node's id (0...31); the peers' ids differ.
    public var nodeID: UInt8
    public var uuids: GenerationUUIDs
    public var flags: Flags
    /// When the metadata was created, Unix seconds, passed in by the caller (the core has no clock).
    public var createdUnixSeconds: Int64
    /// Hot extents the activity log keeps at most.
    public var activityLogExtents: Int
    /// Bytes of one activity-log extent.
    public var activityLogExtentBytes: Int
    /// Where the activity log and bitmap live, and the device size and granularity they are for.
    public var layout: MetadataLayout

    /// Bytes of the replicated device.
    public var deviceBytes: UInt64 { layout.deviceBytes }
    /// Bytes one bitmap bit covers.
    public var bitmapGranularityBytes: Int { layout.granularityBytes }
    /// The slot (0 = A, 1 = B) this version is written to.
    public var slot: Int { Int(sequence % 2) }
    /// The offset in the metadata file this version is written to.
    public var offset: UInt64 { layout.superblockOffset(slot: slot) }

    /// A superblock for new metadata, checked as a decode would check it (so bad user input is an
    /// error here, not a corrupt file later).
    public init(
        resourceName: String,
        nodeID: UInt8,
        deviceBytes: UInt64,
        uuids: GenerationUUIDs = GenerationUUIDs(),
        flags: Flags = [],
        bitmapGranularityBytes: Int = Limits.bitmapGranularityBytesDefault,
        activityLogExtentBytes: Int = Limits.activityLogExtentBytesDefault,
        activityLogExtents: Int = Limits.activityLogExtentsDefault,
        activityLogSlotCount: Int = Limits.activityLogRingSlotsDefault,
        createdUnixSeconds: Int64,
        sequence: UInt64 = 0
    ) throws(MetadataError) {
        self.sequence = sequence
        self.resourceName = resourceName
        self.nodeID = nodeID
        self.uuids = uuids
        self.flags = flags
        self.createdUnixSeconds = createdUnixSeconds
        self.activityLogExtents = activityLogExtents
        self.activityLogExtentBytes = activityLogExtentBytes
        layout = try MetadataLayout(deviceBytes: deviceBytes, granularityBytes: bitmapGranularityBytes,
                                    activityLogSlotCount: activityLogSlotCount)
        try validate()
    }

    /// Checks every field against the limits. `encode` requires it to pass.
    public func validate() throws(MetadataError) {
        try Superblock.checkName(resourceName)
        guard Int(nodeID) <= Limits.metadataNodeIDMax else { throw .badNodeID(Int(nodeID)) }
        guard flags.isSubset(of: .known) else { throw .unknownFlags(flags.rawValue & ~Flags.known.rawValue) }
        guard !flags.isSuperset(of: [.consistent, .resyncTarget]) else { throw .contradictoryFlags(flags.rawValue) }
        let extent = activityLogExtentBytes
        guard extent.nonzeroBitCount == 1, extent >= Limits.activityLogExtentBytesMin,
              extent <= Limits.activityLogExtentBytesMax, extent >= layout.granularityBytes
        else { throw .badExtentSize(extent) }
        guard activityLogExtents >= Limits.activityLogExtentsMin, activityLogExtents <= Limits.activityLogExtentsMax,
              ActivityLog.ringSlotsMin(capacity: activityLogExtents) <= layout.activityLogSlotCount
        else { throw .badExtentCount(activityLogExtents) }
        let extents = (layout.deviceBytes + UInt64(extent) - 1) / UInt64(extent)
        guard extents < UInt64(UInt32.max) else { throw .badDeviceSize(layout.deviceBytes) }
    }

    /// Resource names: 1...64 bytes of UTF-8 without NUL (NUL pads the field on disk).
    public static func checkName(_ name: String) throws(MetadataError) {
        let bytes = name.utf8
        guard !bytes.isEmpty else { throw .badResourceName("empty") }
        guard bytes.count <= Limits.metadataResourceNameBytesMax else {
            throw .badResourceName("\(bytes.count) bytes, at most \(Limits.metadataResourceNameBytesMax)")
        }
        guard !bytes.contains(0) else { throw .badResourceName("contains NUL") }
    }

    /// Prepares the next write: the sequence goes up by one, so the write lands in the other slot.
    public mutating func advanceSequence() {
        sequence += 1
    }

    // MARK: Encoding

    /// Writes the 4096-byte image into `buffer` (at least that long; only the first 4096 bytes
    /// are written). The superblock must be valid: an invalid one here is a bug.
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Superblock.encodedBytes, "Superblock.encode: need \(Superblock.encodedBytes) bytes")
        do { try validate() } catch { preconditionFailure("Superblock.encode: \(error)") }
        let block = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Superblock.encodedBytes])
        block.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, byte) in Superblock.magic.enumerated() { block[i] = byte }
        MetadataCoding.store(Superblock.version, block, 8)
        MetadataCoding.store(sequence, block, 16)
        MetadataCoding.store(UInt64(bitPattern: createdUnixSeconds), block, 24)
        MetadataCoding.store(layout.deviceBytes, block, 32)
        MetadataCoding.store(uuids.current, block, 40)
        MetadataCoding.store(uuids.bitmap, block, 48)
        MetadataCoding.store(uuids.history0, block, 56)
        MetadataCoding.store(uuids.history1, block, 64)
        MetadataCoding.store(flags.rawValue, block, 72)
        block[76] = nodeID
        let name = resourceName.utf8
        block[77] = UInt8(name.count)
        for (i, byte) in name.enumerated() { block[80 + i] = byte }
        MetadataCoding.store(UInt32(layout.granularityBytes), block, 144)
        MetadataCoding.store(UInt32(activityLogExtentBytes), block, 148)
        MetadataCoding.store(UInt32(activityLogExtents), block, 152)
        MetadataCoding.store(UInt32(layout.activityLogSlotCount), block, 156)
        MetadataCoding.store(layout.activityLogOffset, block, 160)
        MetadataCoding.store(layout.bitmapOffset, block, 168)
        MetadataCoding.store(layout.bitmapBytes, block, 176)
        MetadataCoding.store(layout.totalBytes, block, 184)
        // The checksum covers the whole block, so a stray byte anywhere is caught.
        let crc = MetadataCoding.checksum(UnsafeRawBufferPointer(block), crcOffset: 12)
        MetadataCoding.store(crc, block, 12)
    }

    /// The 4096-byte image, for tests and tools (the node encodes into its own aligned buffer).
    public var encoded: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Superblock.encodedBytes)
        bytes.withUnsafeMutableBytes { encode(into: $0) }
        return bytes
    }

    /// Decodes and checks one slot: magic, version, checksum, then every field, and, when `slot`
    /// is given, that the sequence belongs in it. An all-zero block is `.blank` (a slot never
    /// written), not damage.
    public init(decoding bytes: UnsafeRawBufferPointer, slot: Int? = nil) throws(MetadataError) {
        guard bytes.count >= Superblock.encodedBytes else { throw .tooShort(bytes: bytes.count) }
        let block = UnsafeRawBufferPointer(rebasing: bytes[0..<Superblock.encodedBytes])
        guard !MetadataCoding.isZero(block, 0..<Superblock.encodedBytes) else { throw .blank }
        guard block[0..<8].elementsEqual(Superblock.magic) else { throw .badMagic }
        let version = MetadataCoding.load32(block, 8)
        guard version == Superblock.version else { throw .unsupportedVersion(version) }
        let stored = MetadataCoding.load32(block, 12)
        let computed = MetadataCoding.checksum(block, crcOffset: 12)
        guard stored == computed else { throw .checksumMismatch(stored: stored, computed: computed) }

        if let at = MetadataCoding.firstNonzero(block, 78..<80) { throw .nonzeroReserved(offset: at) }
        if let at = MetadataCoding.firstNonzero(block, 192..<Superblock.encodedBytes) { throw .nonzeroReserved(offset: at) }

        sequence = MetadataCoding.load64(block, 16)
        if let slot, Int(sequence % 2) != slot { throw .wrongSlot(sequence: sequence, slot: slot) }
        createdUnixSeconds = Int64(bitPattern: MetadataCoding.load64(block, 24))
        let deviceBytes = MetadataCoding.load64(block, 32)
        uuids = GenerationUUIDs(current: MetadataCoding.load64(block, 40), bitmap: MetadataCoding.load64(block, 48),
                                history0: MetadataCoding.load64(block, 56), history1: MetadataCoding.load64(block, 64))
        flags = Flags(rawValue: MetadataCoding.load32(block, 72))
        nodeID = block[76]

        let nameLength = Int(block[77])
        guard nameLength >= 1 && nameLength <= Limits.metadataResourceNameBytesMax else {
            throw .badResourceName("stored length \(nameLength)")
        }
        let nameBytes = block[80..<(80 + nameLength)]
        let name = String(decoding: nameBytes, as: UTF8.self)
        // Decoding repairs invalid UTF-8, so a repaired name no longer matches its bytes.
        guard name.utf8.elementsEqual(nameBytes) else { throw .badResourceName("not UTF-8") }
        if let at = MetadataCoding.firstNonzero(block, (80 + nameLength)..<144) { throw .nonzeroReserved(offset: at) }
        resourceName = name

        let granularity = Int(MetadataCoding.load32(block, 144))
        activityLogExtentBytes = Int(MetadataCoding.load32(block, 148))
        activityLogExtents = Int(MetadataCoding.load32(block, 152))
        let slots = Int(MetadataCoding.load32(block, 156))
        layout = try MetadataLayout(deviceBytes: deviceBytes, granularityBytes: granularity, activityLogSlotCount: slots)
        // The stored offsets are redundant with the sizes; a difference means a writer with other
        // rules, and guessing which to trust could put the bitmap over the activity log.
        let expected: [(String, Int, UInt64)] = [
            ("activity-log offset", 160, layout.activityLogOffset),
            ("bitmap offset", 168, layout.bitmapOffset),
            ("bitmap bytes", 176, layout.bitmapBytes),
            ("total bytes", 184, layout.totalBytes),
        ]
        for (field, at, value) in expected {
            let stored = MetadataCoding.load64(block, at)
            guard stored == value else { throw .layoutMismatch(field: field, stored: stored, expected: value) }
        }
        try validate()
    }

    /// The version to use of the two slots: the valid one with the higher sequence (nil when
    /// neither decoded). A torn write of one slot leaves the other, one sequence older.
    public static func newest(_ a: Superblock?, _ b: Superblock?) -> Superblock? {
        guard let a else { return b }
        guard let b else { return a }
        return b.sequence > a.sequence ? b : a
    }
}
