/// DRBD's activity log: a persistent, bounded set of "hot" extents that may have writes in flight,
/// sans-I/O. After a primary crashes, only its hot extents can differ from the peer, so only they
/// are resynced, instead of the whole device.
///
/// The device is split into extents (4 MiB by default). At most `capacity` of them are hot (1237
/// by default, about 4.8 GiB). A write may be submitted only when every extent it touches is hot
/// *on disk*: an AL transaction naming the extent was written and flushed before the data write
/// (Protocol/metadata.md "Write ordering"). Extents stay hot after their writes finish, so a
/// workload that keeps writing the same few gigabytes pays no metadata write at all; when a cold
/// extent is needed and the log is full, the least recently used idle extent is evicted.
///
/// The log is a table of `capacity` slots, each holding an extent number or nothing. On disk it
/// is a ring of `ringSlots` 4 KiB transactions. Each transaction carries up to 64 slot updates
/// (DRBD's batching: many writes that need cold extents at once share one transaction) and a
/// window of the whole table (its "context"), which moves on with every transaction so that the
/// last `ringSlots - 1` transactions together repeat the whole table. That is what lets the ring
/// overwrite old transactions, and lets recovery survive a torn write of the newest one.
///
/// Use, per write:
///
/// ```
/// switch al.beginWrite(offset: o, length: n) {
/// case .proceed: submit the data write
/// case .needTransaction(let tx):
///     if tx.evictedCount > 0 { persist the bitmap pages of al.forEachEvicted(of: tx) first }
///     al.encode(tx, into: buffer); write buffer at layout.activityLogSlotOffset(tx.slot); flush
///     then: let next = al.transactionPersisted(tx); submit every write waiting on <= tx.sequence;
///           if let next { persist it the same way }; retry the .wait writes
/// case .waitForTransaction(let sequence): park the write until `sequence` is persisted
/// case .wait: park it and retry after an endWrite returns true or a transaction is persisted
/// }
/// ... data write done (bits already set in the bitmap if the peer did not get it):
/// if al.endWrite(offset: o, length: n) { retry the .wait writes }
/// ```
///
/// Only `.proceed`, `.needTransaction` and `.waitForTransaction` take references on the extents;
/// each of them must be paired with exactly one `endWrite`, also for a write that is abandoned
/// before it is submitted. `.wait` takes nothing. One transaction is in flight at a time; updates
/// needed meanwhile gather into the next one, which `transactionPersisted` returns.
///
/// `beginWrite` and `endWrite` allocate nothing: the table, the index, the LRU list and both
/// transaction batches are arrays sized at init.
public struct ActivityLog: Sendable {
    /// Bytes of one on-disk transaction.
    public static let transactionBytes = Limits.metadataBlockBytes
    /// Slot updates one transaction carries (DRBD's `AL_UPDATES_PER_TRANSACTION`).
    public static let updatesPerTransactionMax = 64
    /// Table entries one transaction's context carries: the rest of the 4 KiB.
    public static let contextEntriesPerTransactionMax = (transactionBytes - contextOffset) / 4
    /// "TNDMALTX", the first eight bytes of a transaction.
    public static let magic: [UInt8] = Array("TNDMALTX".utf8)
    /// The transaction format this build writes and reads.
    public static let version: UInt16 = 1

    /// On-disk marker of an empty table slot.
    static let emptyExtent = UInt32.max
    static let updatesOffset = 48
    static let contextOffset = updatesOffset + updatesPerTransactionMax * 8
    static let flagReset: UInt16 = 1 << 0

    /// Extents one write of at most `writeBytesMax` bytes can touch (it may start mid-extent).
    public static func extentsPerWriteMax(writeBytesMax: Int, extentBytes: Int) -> Int {
        precondition(writeBytesMax > 0 && extentBytes > 0)
        return (writeBytesMax + extentBytes - 2) / extentBytes + 1
    }

    /// Ring slots needed for a table of `capacity`: the newest slot may be torn, and the others'
    /// contexts must still cover the whole table.
    public static func ringSlotsMin(capacity: Int, contextEntriesPerTransaction: Int = contextEntriesPerTransactionMax) -> Int {
        precondition(capacity > 0 && contextEntriesPerTransaction > 0)
        return (capacity + contextEntriesPerTransaction - 1) / contextEntriesPerTransaction + 1
    }

    // MARK: Public types

    /// What a write must do before it may be submitted.
    public enum Decision: Equatable, Sendable {
        /// Every extent is hot on disk; references are taken. Submit the write.
        case proceed
        /// References are taken, and this call started `Transaction`: persist it (bitmap pages of
        /// its evicted extents first), call `transactionPersisted`, then submit.
        case needTransaction(Transaction)
        /// References are taken; an extent becomes hot with transaction `sequence`, which is in
        /// flight or queued behind the one in flight. Submit once it is persisted.
        case waitForTransaction(sequence: UInt64)
        /// No room: every slot is busy or the next transaction is full. Nothing was taken; try
        /// again after an `endWrite` that returns true or a `transactionPersisted`.
        case wait
    }

    /// One AL transaction handed to the caller to persist. The bytes come from `encode`.
    public struct Transaction: Equatable, Sendable {
        /// Increases by one per transaction, across restarts.
        public let sequence: UInt64
        /// The ring slot it is written to: `sequence % ringSlots`.
        public let slot: Int
        /// Slot updates it carries.
        public let updateCount: Int
        /// Extents it makes cold. Their bitmap pages must be on disk before it is.
        public let evictedCount: Int
        /// The first transaction of this log's life: recovery drops what came before it.
        public let isReset: Bool
        let contextStart: Int
        let contextCount: Int
    }

    /// What the on-disk ring said after a crash.
    public struct Recovery: Equatable, Sendable {
        /// Extents hot at the last persisted transaction, ascending. Each may hold writes the peer
        /// never saw (or the reverse): mark them out of sync.
        public var hotExtents: [Int]
        /// Extent size the transactions were written with (0 when there were none).
        public var extentBytes: Int
        /// False when the ring could not be replayed whole (a damaged slot besides the newest,
        /// mixed configurations): then mark the whole device out of sync, as DRBD does without
        /// an activity log. `hotExtents` is then every extent any valid transaction named.
        public var isComplete: Bool
        /// The sequence the next log must start at (`ActivityLog.init(nextSequence:)`).
        public var nextSequence: UInt64
        /// Valid transactions found.
        public var validTransactions: Int

        public init(hotExtents: [Int], extentBytes: Int, isComplete: Bool, nextSequence: UInt64, validTransactions: Int) {
            self.hotExtents = hotExtents
            self.extentBytes = extentBytes
            self.isComplete = isComplete
            self.nextSequence = nextSequence
            self.validTransactions = validTransactions
        }

        /// The device bytes of the hot extents, clipped to `deviceBytes`, for marking the bitmap.
        public func hotByteRanges(deviceBytes: UInt64) -> [Range<UInt64>] {
            hotExtents.compactMap { extent in
                let start = UInt64(extent) * UInt64(extentBytes)
                guard start < deviceBytes else { return nil }
                return start..<min(deviceBytes, start + UInt64(extentBytes))
            }
        }
    }

    // MARK: Configuration

    /// Hot extents at most.
    public let capacity: Int
    /// Bytes of one extent, a power of two.
    public let extentBytes: Int
    /// Bytes of the device.
    public let deviceBytes: UInt64
    /// Transaction slots in the on-disk ring.
    public let ringSlots: Int
    /// Extents of the device.
    public let extentCount: Int
    /// Table entries per transaction context (the maximum, except in tests of the ring logic).
    public let contextEntriesPerTransaction: Int
    /// Extents one write may touch.
    public let extentsPerWriteMax: Int
    private let extentShift: Int

    // MARK: State

    /// Extent in each table slot as this node intends it (including updates not yet persisted).
    private var slotExtent: [UInt32]
    /// The table as of the last transaction handed out: what contexts are encoded from.
    private var emittedTable: [UInt32]
    /// Writes holding each slot's extent (submitted, or waiting for its transaction).
    private var slotReferences: [UInt32]
    /// The transaction that makes each slot's extent hot on disk.
    private var slotReadySequence: [UInt64]
    /// Idle slots (no references, hot on disk, or empty), least recently used first: the
    /// eviction order.
    private var idlePrevious: [Int32]
    private var idleNext: [Int32]
    private var idleMember: [Bool]
    private var idleHead: Int32 = -1
    private var idleTail: Int32 = -1
    private var idleCount = 0
    /// Open-addressing index extent -> slot (linear probing, backward-shift deletion), twice
    /// the capacity or more so probes stay short.
    private var index: [Int32]
    private let indexShift: Int

    /// The newest transaction on disk (sequence); 0 before any.
    public private(set) var persistedSequence: UInt64
    /// The sequence the next transaction gets.
    private var nextSequence: UInt64
    /// The transaction handed out and not yet persisted.
    public private(set) var inFlight: Transaction?
    private var flightSlots: [Int32]
    private var flightExtents: [UInt32]
    private var flightEvicted: [UInt32]
    private var flightCount = 0
    /// Updates gathered for the transaction after `inFlight`.
    private var batchSlots: [Int32]
    private var batchExtents: [UInt32]
    private var batchEvicted: [UInt32]
    private var batchCount = 0
    private var contextCursor = 0
    private var emittedAny = false

    /// An empty log. `nextSequence` comes from `recover` (so sequences keep increasing across
    /// restarts and the ring's slots stay in order); the first transaction is a reset, which
    /// makes recovery forget what the previous life left, so the node must have marked and
    /// persisted that (its `Recovery`) in the bitmap before it persists this log's first
    /// transaction. `writeBytesMax` bounds one write, so the log can always hold one.
    public init(
        deviceBytes: UInt64,
        extentBytes: Int = Limits.activityLogExtentBytesDefault,
        capacity: Int = Limits.activityLogExtentsDefault,
        ringSlots: Int = Limits.activityLogRingSlotsDefault,
        nextSequence: UInt64,
        writeBytesMax: Int = Limits.nbdRequestBytesMax,
        contextEntriesPerTransaction: Int = ActivityLog.contextEntriesPerTransactionMax
    ) {
        precondition(deviceBytes > 0)
        precondition(extentBytes.nonzeroBitCount == 1 && extentBytes >= Limits.metadataBlockBytes
            && extentBytes <= Limits.activityLogExtentBytesMax, "ActivityLog: extent \(extentBytes) bytes")
        precondition(capacity >= 1 && capacity <= Limits.activityLogExtentsMax, "ActivityLog: capacity \(capacity)")
        precondition(contextEntriesPerTransaction >= 1 && contextEntriesPerTransaction <= ActivityLog.contextEntriesPerTransactionMax)
        precondition(ringSlots >= ActivityLog.ringSlotsMin(capacity: capacity, contextEntriesPerTransaction: contextEntriesPerTransaction)
            && ringSlots <= Limits.activityLogRingSlotsMax, "ActivityLog: \(ringSlots) ring slots cannot describe \(capacity) extents")
        precondition(nextSequence >= 1, "ActivityLog: sequences start at 1")
        let perWrite = ActivityLog.extentsPerWriteMax(writeBytesMax: writeBytesMax, extentBytes: extentBytes)
        precondition(perWrite <= capacity && perWrite <= ActivityLog.updatesPerTransactionMax,
                     "ActivityLog: a write may touch \(perWrite) extents, more than the log or a transaction holds")
        let extents = (deviceBytes + UInt64(extentBytes) - 1) / UInt64(extentBytes)
        precondition(extents < UInt64(ActivityLog.emptyExtent), "ActivityLog: too many extents for u32 numbers")

        self.capacity = capacity
        self.extentBytes = extentBytes
        self.deviceBytes = deviceBytes
        self.ringSlots = ringSlots
        self.contextEntriesPerTransaction = contextEntriesPerTransaction
        extentsPerWriteMax = perWrite
        extentCount = Int(extents)
        extentShift = extentBytes.trailingZeroBitCount

        slotExtent = [UInt32](repeating: ActivityLog.emptyExtent, count: capacity)
        emittedTable = slotExtent
        slotReferences = [UInt32](repeating: 0, count: capacity)
        slotReadySequence = [UInt64](repeating: 0, count: capacity)
        idlePrevious = [Int32](repeating: -1, count: capacity)
        idleNext = [Int32](repeating: -1, count: capacity)
        idleMember = [Bool](repeating: false, count: capacity)
        var indexBits = 1
        while (1 << indexBits) < 2 * capacity { indexBits += 1 }
        index = [Int32](repeating: -1, count: 1 << indexBits)
        indexShift = 32 - indexBits
        persistedSequence = nextSequence - 1
        self.nextSequence = nextSequence
        let updates = ActivityLog.updatesPerTransactionMax
        flightSlots = [Int32](repeating: -1, count: updates)
        flightExtents = [UInt32](repeating: 0, count: updates)
        flightEvicted = [UInt32](repeating: 0, count: updates)
        batchSlots = flightSlots
        batchExtents = flightExtents
        batchEvicted = flightEvicted
        // Every slot starts empty and idle: empty slots are used before anything is evicted.
        for slot in 0..<capacity { idleAppend(slot) }
    }

    /// The log a superblock describes, starting at `nextSequence` (from `recover`).
    public init(superblock: Superblock, nextSequence: UInt64, writeBytesMax: Int = Limits.nbdRequestBytesMax) {
        self.init(deviceBytes: superblock.deviceBytes, extentBytes: superblock.activityLogExtentBytes,
                  capacity: superblock.activityLogExtents, ringSlots: superblock.layout.activityLogSlotCount,
                  nextSequence: nextSequence, writeBytesMax: writeBytesMax)
    }

    // MARK: Writes

    /// Asks to start a write of `offset ..< offset + length` (inside the device, not empty).
    public mutating func beginWrite(offset: UInt64, length: UInt64) -> Decision {
        let extents = extentRange(offset: offset, length: length)
        precondition(extents.count <= extentsPerWriteMax, "ActivityLog: write of \(length) bytes over the limit")

        // First look, change nothing: a write either gets all its extents or waits with none,
        // so two waiting writes can never each hold half of what the other needs.
        var missing = 0
        var idleTouched = 0
        for extent in extents {
            let slot = lookup(UInt32(extent))
            if slot < 0 {
                missing += 1
            } else if idleMember[slot] {
                idleTouched += 1
            }
        }
        if missing > 0 {
            if batchCount + missing > ActivityLog.updatesPerTransactionMax { return .wait }
            if idleCount - idleTouched < missing { return .wait }
        }

        // Extents already in the table first: taking them off the idle list keeps the
        // evictions below from choosing an extent this same write needs.
        var readyAt: UInt64 = 0
        for extent in extents {
            let slot = lookup(UInt32(extent))
            guard slot >= 0 else { continue }
            if idleMember[slot] { idleRemove(slot) }
            slotReferences[slot] += 1
            readyAt = max(readyAt, slotReadySequence[slot])
        }
        if missing > 0 {
            for extent in extents where lookup(UInt32(extent)) < 0 {
                let slot = assignSlot(to: UInt32(extent))
                slotReferences[slot] += 1
                readyAt = max(readyAt, slotReadySequence[slot])
            }
        }
        if readyAt <= persistedSequence { return .proceed }
        if inFlight == nil {
            precondition(batchCount > 0 && readyAt == nextSequence, "ActivityLog: a pending extent with no transaction")
            return .needTransaction(emit())
        }
        return .waitForTransaction(sequence: readyAt)
    }

    /// Finishes a write `beginWrite` took references for (also one abandoned before submission).
    /// Set its bitmap bits first if the peer did not get it: once the extent goes idle it may be
    /// evicted. Returns whether an extent became idle (parked `.wait` writes may now fit).
    @discardableResult
    public mutating func endWrite(offset: UInt64, length: UInt64) -> Bool {
        var freed = false
        for extent in extentRange(offset: offset, length: length) {
            let slot = lookup(UInt32(extent))
            precondition(slot >= 0 && slotReferences[slot] > 0, "ActivityLog: endWrite without beginWrite (extent \(extent))")
            slotReferences[slot] -= 1
            if slotReferences[slot] == 0 && slotReadySequence[slot] <= persistedSequence {
                idleAppend(slot)
                freed = true
            }
        }
        return freed
    }

    /// The caller wrote and flushed `transaction`. Returns the next transaction to persist, if
    /// updates gathered meanwhile. Writes waiting on `transaction.sequence` or less may proceed.
    public mutating func transactionPersisted(_ transaction: Transaction) -> Transaction? {
        precondition(inFlight == transaction, "ActivityLog: persisted a transaction that is not in flight")
        persistedSequence = transaction.sequence
        inFlight = nil
        // Writes abandoned while their transaction was in flight left slots with no references:
        // now that the extents are hot on disk, they can be evicted like any other idle one.
        for i in 0..<flightCount {
            let slot = Int(flightSlots[i])
            precondition(slotExtent[slot] == flightExtents[i] && !idleMember[slot])
            if slotReferences[slot] == 0 { idleAppend(slot) }
        }
        flightCount = 0
        return batchCount > 0 ? emit() : nil
    }

    /// Calls `body` with each extent `transaction` evicts. Its bitmap pages must be persisted
    /// before the transaction: once the log forgets the extent, a crash will not resync it, so
    /// its out-of-sync bits must be on disk.
    public func forEachEvicted(of transaction: Transaction, _ body: (_ extent: Int) throws -> Void) rethrows {
        precondition(inFlight == transaction, "ActivityLog: transaction not in flight")
        for i in 0..<flightCount where flightEvicted[i] != ActivityLog.emptyExtent {
            try body(Int(flightEvicted[i]))
        }
    }

    /// The device bytes of `extent` (the last extent is cut at the device end).
    public func byteRange(ofExtent extent: Int) -> (offset: UInt64, length: UInt64) {
        precondition(extent >= 0 && extent < extentCount)
        let offset = UInt64(extent) << UInt64(extentShift)
        return (offset, min(UInt64(extentBytes), deviceBytes - offset))
    }

    /// The extent holding byte `offset`.
    public func extent(ofOffset offset: UInt64) -> Int {
        precondition(offset < deviceBytes)
        return Int(offset >> UInt64(extentShift))
    }

    // MARK: Queries

    /// Whether `extent` is hot on disk (writes to it may be submitted).
    public func isHot(extent: Int) -> Bool {
        let slot = lookup(UInt32(extent))
        return slot >= 0 && slotReadySequence[slot] <= persistedSequence
    }

    /// Writes holding `extent`.
    public func references(extent: Int) -> Int {
        let slot = lookup(UInt32(extent))
        return slot < 0 ? 0 : Int(slotReferences[slot])
    }

    /// Extents in the table (hot, or becoming hot). Slots are never emptied, only reused.
    public private(set) var extentsInUse = 0

    /// Calls `body` with each extent in the table (in use or idle, not yet evicted): what a
    /// crash now would resync, as every completed write outside them was synced before its
    /// extent was evicted. A disk detached now is never synced again, so it may lack writes
    /// inside them.
    public func forEachExtentInTable(_ body: (_ extent: Int) throws -> Void) rethrows {
        for extent in slotExtent where extent != ActivityLog.emptyExtent { try body(Int(extent)) }
    }

    /// Updates gathered for the transaction after the one in flight.
    public var queuedUpdateCount: Int { batchCount }

    // MARK: Transactions

    /// Writes `transaction` (the one in flight) as its 4096-byte on-disk image into `buffer`.
    /// Deterministic: encoding again after a failed write gives the same bytes.
    public func encode(_ transaction: Transaction, into buffer: UnsafeMutableRawBufferPointer) {
        precondition(inFlight == transaction, "ActivityLog: transaction not in flight")
        precondition(buffer.count >= ActivityLog.transactionBytes)
        let block = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<ActivityLog.transactionBytes])
        block.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, byte) in ActivityLog.magic.enumerated() { block[i] = byte }
        MetadataCoding.store(ActivityLog.version, block, 12)
        MetadataCoding.store(transaction.isReset ? ActivityLog.flagReset : 0, block, 14)
        MetadataCoding.store(transaction.sequence, block, 16)
        MetadataCoding.store(UInt32(capacity), block, 24)
        MetadataCoding.store(UInt32(ringSlots), block, 28)
        MetadataCoding.store(UInt32(extentBytes), block, 32)
        MetadataCoding.store(UInt16(transaction.updateCount), block, 36)
        MetadataCoding.store(UInt16(transaction.contextCount), block, 38)
        MetadataCoding.store(UInt32(transaction.contextStart), block, 40)
        for i in 0..<flightCount {
            MetadataCoding.store(UInt32(flightSlots[i]), block, ActivityLog.updatesOffset + i * 8)
            MetadataCoding.store(flightExtents[i], block, ActivityLog.updatesOffset + i * 8 + 4)
        }
        for i in 0..<transaction.contextCount {
            let slot = (transaction.contextStart + i) % capacity
            MetadataCoding.store(emittedTable[slot], block, ActivityLog.contextOffset + i * 4)
        }
        let crc = MetadataCoding.checksum(UnsafeRawBufferPointer(block), crcOffset: 8)
        MetadataCoding.store(crc, block, 8)
    }

    /// The 4096-byte image of `transaction`, for tests and tools.
    public func encoded(_ transaction: Transaction) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: ActivityLog.transactionBytes)
        bytes.withUnsafeMutableBytes { encode(transaction, into: $0) }
        return bytes
    }

    /// Hands the gathered batch out as the transaction in flight.
    private mutating func emit() -> Transaction {
        precondition(inFlight == nil && batchCount > 0)
        swap(&flightSlots, &batchSlots)
        swap(&flightExtents, &batchExtents)
        swap(&flightEvicted, &batchEvicted)
        flightCount = batchCount
        batchCount = 0
        var evicted = 0
        for i in 0..<flightCount {
            emittedTable[Int(flightSlots[i])] = flightExtents[i]
            if flightEvicted[i] != ActivityLog.emptyExtent { evicted += 1 }
        }
        let count = min(capacity, contextEntriesPerTransaction)
        let transaction = Transaction(
            sequence: nextSequence, slot: Int(nextSequence % UInt64(ringSlots)),
            updateCount: flightCount, evictedCount: evicted, isReset: !emittedAny,
            contextStart: contextCursor, contextCount: count)
        contextCursor = (contextCursor + count) % capacity
        emittedAny = true
        nextSequence += 1
        inFlight = transaction
        return transaction
    }

    /// Puts `extent` into the least recently used idle slot, recording the update (and the
    /// extent it evicts) in the next transaction.
    private mutating func assignSlot(to extent: UInt32) -> Int {
        precondition(idleHead >= 0 && batchCount < ActivityLog.updatesPerTransactionMax)
        let slot = Int(idleHead)
        idleRemove(slot)
        precondition(slotReferences[slot] == 0)
        let old = slotExtent[slot]
        if old != ActivityLog.emptyExtent { indexRemove(old) } else { extentsInUse += 1 }
        slotExtent[slot] = extent
        indexInsert(extent, slot: slot)
        slotReadySequence[slot] = nextSequence
        batchSlots[batchCount] = Int32(slot)
        batchExtents[batchCount] = extent
        batchEvicted[batchCount] = old
        batchCount += 1
        return slot
    }

    private func extentRange(offset: UInt64, length: UInt64) -> ClosedRange<Int> {
        let (end, overflow) = offset.addingReportingOverflow(length)
        precondition(length > 0 && !overflow && end <= deviceBytes, "ActivityLog: write \(offset)+\(length) outside the device")
        return Int(offset >> UInt64(extentShift))...Int((end - 1) >> UInt64(extentShift))
    }

    // MARK: Idle list (LRU)

    private mutating func idleAppend(_ slot: Int) {
        precondition(!idleMember[slot])
        idleMember[slot] = true
        idlePrevious[slot] = idleTail
        idleNext[slot] = -1
        if idleTail >= 0 { idleNext[Int(idleTail)] = Int32(slot) } else { idleHead = Int32(slot) }
        idleTail = Int32(slot)
        idleCount += 1
    }

    private mutating func idleRemove(_ slot: Int) {
        precondition(idleMember[slot])
        idleMember[slot] = false
        let previous = idlePrevious[slot]
        let next = idleNext[slot]
        if previous >= 0 { idleNext[Int(previous)] = next } else { idleHead = next }
        if next >= 0 { idlePrevious[Int(next)] = previous } else { idleTail = previous }
        idlePrevious[slot] = -1
        idleNext[slot] = -1
        idleCount -= 1
    }

    // MARK: Index

    @inline(__always)
    private func home(_ extent: UInt32) -> Int {
        // Fibonacci hashing: consecutive extents (sequential writes) spread over the table.
        Int((extent &* 0x9E37_79B1) >> UInt32(indexShift))
    }

    private func lookup(_ extent: UInt32) -> Int {
        let mask = index.count - 1
        var at = home(extent)
        while true {
            let slot = index[at]
            if slot < 0 { return -1 }
            if slotExtent[Int(slot)] == extent { return Int(slot) }
            at = (at + 1) & mask
        }
    }

    private mutating func indexInsert(_ extent: UInt32, slot: Int) {
        let mask = index.count - 1
        var at = home(extent)
        while index[at] >= 0 {
            precondition(slotExtent[Int(index[at])] != extent, "ActivityLog: extent \(extent) indexed twice")
            at = (at + 1) & mask
        }
        index[at] = Int32(slot)
    }

    /// Removes `extent` (still in `slotExtent`), then shifts later entries of its probe run back
    /// so lookups never stop at the hole too early (Knuth's algorithm R; no tombstones to pile up).
    private mutating func indexRemove(_ extent: UInt32) {
        let mask = index.count - 1
        var hole = home(extent)
        while slotExtent[Int(index[hole])] != extent { hole = (hole + 1) & mask }
        index[hole] = -1
        var at = hole
        while true {
            at = (at + 1) & mask
            let slot = index[at]
            if slot < 0 { return }
            let want = home(slotExtent[Int(slot)])
            // The entry may stay if its home lies cyclically in (hole, at].
            let stays = hole <= at ? (hole < want && want <= at) : (hole < want || want <= at)
            if !stays {
                index[hole] = slot
                index[at] = -1
                hole = at
            }
        }
    }

    /// Checks every internal relation: O(capacity), for tests and the simulator.
    public func checkInvariants() {
        var idle = 0
        var at = idleHead
        var previous: Int32 = -1
        while at >= 0 {
            precondition(idleMember[Int(at)] && idlePrevious[Int(at)] == previous)
            idle += 1
            previous = at
            at = idleNext[Int(at)]
        }
        precondition(idle == idleCount && previous == idleTail)
        for slot in 0..<capacity {
            let extent = slotExtent[slot]
            if extent != ActivityLog.emptyExtent {
                precondition(lookup(extent) == slot, "ActivityLog: index lost extent \(extent)")
            }
            let ready = slotReadySequence[slot] <= persistedSequence
            if idleMember[slot] {
                precondition(slotReferences[slot] == 0 && ready)
            } else if slotReferences[slot] == 0 {
                precondition(!ready, "ActivityLog: an idle slot missing from the LRU list")
            }
            if !ready { precondition(slotReferences[slot] > 0 || inFlight != nil) }
        }
        let indexed = index.reduce(0) { $0 + ($1 >= 0 ? 1 : 0) }
        let used = slotExtent.reduce(0) { $0 + ($1 == ActivityLog.emptyExtent ? 0 : 1) }
        precondition(indexed == used && used == extentsInUse)
        precondition(inFlight != nil || batchCount == 0, "ActivityLog: a batch waits with nothing in flight")
    }

    // MARK: Recovery

    /// One decoded transaction.
    struct Decoded {
        var sequence: UInt64
        var isReset: Bool
        var capacity: Int
        var ringSlots: Int
        var extentBytes: Int
        var updates: [(slot: Int, extent: UInt32)]
        var contextStart: Int
        var context: [UInt32]
    }

    /// Decodes one ring slot; nil for blank or invalid (torn, damaged, foreign) ones.
    static func decode(_ bytes: UnsafeRawBufferPointer) -> Decoded? {
        guard bytes.count >= transactionBytes else { return nil }
        let block = UnsafeRawBufferPointer(rebasing: bytes[0..<transactionBytes])
        guard block[0..<8].elementsEqual(magic),
              MetadataCoding.load32(block, 8) == MetadataCoding.checksum(block, crcOffset: 8),
              MetadataCoding.load16(block, 12) == version
        else { return nil }
        let flags = MetadataCoding.load16(block, 14)
        let capacity = Int(MetadataCoding.load32(block, 24))
        let ringSlots = Int(MetadataCoding.load32(block, 28))
        let extentBytes = Int(MetadataCoding.load32(block, 32))
        let updateCount = Int(MetadataCoding.load16(block, 36))
        let contextCount = Int(MetadataCoding.load16(block, 38))
        let contextStart = Int(MetadataCoding.load32(block, 40))
        guard flags & ~flagReset == 0, capacity >= 1, capacity <= Limits.activityLogExtentsMax,
              ringSlots >= 1, extentBytes > 0, extentBytes.nonzeroBitCount == 1,
              updateCount <= updatesPerTransactionMax, contextCount <= min(capacity, contextEntriesPerTransactionMax),
              contextStart < capacity
        else { return nil }
        var updates: [(slot: Int, extent: UInt32)] = []
        for i in 0..<updateCount {
            let slot = Int(MetadataCoding.load32(block, updatesOffset + i * 8))
            guard slot < capacity else { return nil }
            updates.append((slot, MetadataCoding.load32(block, updatesOffset + i * 8 + 4)))
        }
        var context: [UInt32] = []
        for i in 0..<contextCount { context.append(MetadataCoding.load32(block, contextOffset + i * 4)) }
        return Decoded(sequence: MetadataCoding.load64(block, 16), isReset: flags & flagReset != 0, capacity: capacity,
                       ringSlots: ringSlots, extentBytes: extentBytes, updates: updates,
                       contextStart: contextStart, context: context)
    }

    /// Replays the ring (`slots[i]` is ring slot `i`, all of it) after a crash: the extents hot at
    /// the last persisted transaction. Blank, torn and damaged slots are skipped, and so is a
    /// transaction found in a slot its sequence does not map to. Replay starts at the newest
    /// reset transaction if it survives; otherwise the contexts of the surviving transactions
    /// must cover the whole table (they do when at most the newest slot is torn). Anything else
    /// is an incomplete recovery, and the node falls back to a full resync.
    ///
    /// Call it at every attach, crash or not: `nextSequence` is where the next log starts.
    public static func recover(slots: [UnsafeRawBufferPointer]) -> Recovery {
        precondition(!slots.isEmpty)
        var found: [Decoded] = []
        for (i, bytes) in slots.enumerated() {
            guard let tx = decode(bytes), tx.sequence % UInt64(slots.count) == UInt64(i) else { continue }
            found.append(tx)
        }
        found.sort { $0.sequence < $1.sequence }
        guard let newest = found.last else {
            return Recovery(hotExtents: [], extentBytes: 0, isComplete: true, nextSequence: 1, validTransactions: 0)
        }
        let start = found.lastIndex { $0.isReset } ?? 0
        let run = found[start...]
        var complete = run.first!.ringSlots == slots.count
        var previous: Decoded?
        for tx in run {
            if let previous {
                if tx.sequence != previous.sequence + 1 || tx.capacity != previous.capacity
                    || tx.extentBytes != previous.extentBytes || tx.ringSlots != previous.ringSlots {
                    complete = false
                }
            }
            previous = tx
        }

        var hot: Set<UInt32> = []
        if complete {
            let capacity = run.first!.capacity
            var table = [UInt32](repeating: emptyExtent, count: capacity)
            var covered = [Bool](repeating: false, count: capacity)
            for tx in run {
                if tx.isReset {
                    for s in 0..<capacity { table[s] = emptyExtent; covered[s] = true }
                }
                // The context is the table after this transaction's updates, so it agrees with
                // them; applying both keeps the replay right whichever a slot is covered by.
                for update in tx.updates {
                    table[update.slot] = update.extent
                    covered[update.slot] = true
                }
                for (i, extent) in tx.context.enumerated() {
                    let s = (tx.contextStart + i) % capacity
                    table[s] = extent
                    covered[s] = true
                }
            }
            if covered.allSatisfy({ $0 }) {
                hot = Set(table.filter { $0 != emptyExtent })
            } else {
                complete = false
            }
        }
        if !complete {
            // Best effort for the operator; the node marks the whole device anyway.
            for tx in found {
                for update in tx.updates where update.extent != emptyExtent { hot.insert(update.extent) }
                for extent in tx.context where extent != emptyExtent { hot.insert(extent) }
            }
        }
        return Recovery(hotExtents: hot.map { Int($0) }.sorted(), extentBytes: newest.extentBytes, isComplete: complete,
                        nextSequence: newest.sequence + 1, validTransactions: found.count)
    }
}
