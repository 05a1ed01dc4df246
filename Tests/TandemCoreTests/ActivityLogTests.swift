import Testing
import TandemCore

@Suite struct ActivityLogTests {
    typealias Transaction = ActivityLog.Transaction
    static let extent: UInt64 = 64 * 1024

    /// A small log: 64 KiB extents, 40 of them, writes of at most 128 KiB (3 extents).
    static func small(capacity: Int = 8, ringSlots: Int = 4, context: Int = 3, nextSequence: UInt64 = 1,
                      extents: UInt64 = 40) -> ActivityLog {
        ActivityLog(deviceBytes: extents * extent, extentBytes: Int(extent), capacity: capacity, ringSlots: ringSlots,
                    nextSequence: nextSequence, writeBytesMax: 128 * 1024, contextEntriesPerTransaction: context)
    }

    static func recover(_ ring: [[UInt8]]) -> ActivityLog.Recovery {
        let flat = ring.flatMap { $0 }
        return flat.withUnsafeBytes { raw in
            ActivityLog.recover(slots: (0..<ring.count).map { UnsafeRawBufferPointer(rebasing: raw[($0 * 4096)..<(($0 + 1) * 4096)]) })
        }
    }

    static func blankRing(_ slots: Int) -> [[UInt8]] {
        [[UInt8]](repeating: [UInt8](repeating: 0, count: 4096), count: slots)
    }

    /// Writes `tx` to the ring and tells the log; returns the next transaction, if any.
    static func persist(_ tx: Transaction, _ al: inout ActivityLog, _ ring: inout [[UInt8]]) -> Transaction? {
        ring[tx.slot] = al.encoded(tx)
        return al.transactionPersisted(tx)
    }

    /// Starts one-byte writes to `extents`, persists every transaction they need, then ends the
    /// writes in `idleOrder` (default: the same order), which becomes the eviction order.
    static func warm(_ al: inout ActivityLog, _ ring: inout [[UInt8]], _ extents: [Int], idleOrder: [Int]? = nil, end: Bool = true) {
        var pending: Transaction?
        for e in extents {
            switch al.beginWrite(offset: UInt64(e) * extent, length: 1) {
            case .needTransaction(let tx): pending = tx
            case .proceed, .waitForTransaction: break
            case .wait: Issue.record("no room for extent \(e)")
            }
        }
        while let tx = pending { pending = persist(tx, &al, &ring) }
        if end {
            for e in idleOrder ?? extents { al.endWrite(offset: UInt64(e) * extent, length: 1) }
        }
    }

    // MARK: Transactions

    @Test func firstWriteWritesAResetTransaction() {
        var al = Self.small(nextSequence: 5)
        var ring = Self.blankRing(4)
        guard case .needTransaction(let tx) = al.beginWrite(offset: 0, length: 4096) else {
            Issue.record("a cold extent needs a transaction")
            return
        }
        #expect(tx.sequence == 5 && tx.slot == 1 && tx.isReset && tx.updateCount == 1 && tx.evictedCount == 0)
        #expect(al.inFlight == tx)
        #expect(!al.isHot(extent: 0) && al.references(extent: 0) == 1)
        // A second write to the same extent waits for the same transaction: no duplicate.
        #expect(al.beginWrite(offset: 4096, length: 4096) == .waitForTransaction(sequence: 5))
        #expect(al.queuedUpdateCount == 0)
        #expect(Self.persist(tx, &al, &ring) == nil)
        #expect(al.isHot(extent: 0) && al.persistedSequence == 5 && al.inFlight == nil)
        #expect(al.beginWrite(offset: 8192, length: 4096) == .proceed)
        #expect(al.references(extent: 0) == 3)
        #expect(Array(ring[1][0..<8]) == Array("TNDMALTX".utf8))
        let recovered = Self.recover(ring)
        #expect(recovered.hotExtents == [0] && recovered.isComplete && recovered.nextSequence == 6)
        #expect(recovered.extentBytes == Int(Self.extent) && recovered.validTransactions == 1)
        for _ in 0..<3 { al.endWrite(offset: 0, length: 4096) }
        #expect(al.references(extent: 0) == 0 && al.isHot(extent: 0), "extents stay hot after their writes")
        #expect(al.beginWrite(offset: 0, length: 1) == .proceed, "a hot extent costs no metadata write")
        al.checkInvariants()
    }

    @Test func writesNeedingColdExtentsShareTheNextTransaction() {
        var al = Self.small(capacity: 16, ringSlots: 7)
        var ring = Self.blankRing(7)
        guard case .needTransaction(let first) = al.beginWrite(offset: 0, length: 1) else { Issue.record(); return }
        // While the first is in flight, three writes need four more extents (one spans two).
        #expect(al.beginWrite(offset: 1 * Self.extent, length: 1) == .waitForTransaction(sequence: 2))
        #expect(al.beginWrite(offset: 2 * Self.extent + 10, length: Self.extent) == .waitForTransaction(sequence: 2))
        #expect(al.beginWrite(offset: 5 * Self.extent, length: 1) == .waitForTransaction(sequence: 2))
        #expect(al.beginWrite(offset: 0, length: 1) == .waitForTransaction(sequence: 1))
        #expect(al.beginWrite(offset: Self.extent - 1, length: 2) == .waitForTransaction(sequence: 2))
        #expect(al.queuedUpdateCount == 4)
        al.checkInvariants()
        guard let second = Self.persist(first, &al, &ring) else { Issue.record("the batch follows"); return }
        #expect(second.sequence == 2 && second.updateCount == 4 && !second.isReset && second.slot == 2)
        #expect(al.isHot(extent: 0) && !al.isHot(extent: 1))
        #expect(al.beginWrite(offset: 0, length: 1) == .proceed)
        #expect(Self.persist(second, &al, &ring) == nil)
        #expect(Self.recover(ring).hotExtents == [0, 1, 2, 3, 5])
        al.checkInvariants()
    }

    @Test func oneTransactionCarriesAtMost64Updates() {
        var al = ActivityLog(deviceBytes: 200 * Self.extent, extentBytes: Int(Self.extent), capacity: 100, ringSlots: 2,
                             nextSequence: 1, writeBytesMax: 4096)
        var ring = Self.blankRing(2)
        guard case .needTransaction(let first) = al.beginWrite(offset: 0, length: 1) else { Issue.record(); return }
        for e in 1...64 {
            #expect(al.beginWrite(offset: UInt64(e) * Self.extent, length: 1) == .waitForTransaction(sequence: 2))
        }
        #expect(al.beginWrite(offset: 65 * Self.extent, length: 1) == .wait, "the next transaction is full")
        #expect(al.references(extent: 65) == 0)
        let second = Self.persist(first, &al, &ring)!
        #expect(second.updateCount == 64)
        #expect(al.beginWrite(offset: 65 * Self.extent, length: 1) == .waitForTransaction(sequence: 3))
        let third = Self.persist(second, &al, &ring)!
        #expect(Self.persist(third, &al, &ring) == nil)
        #expect(Self.recover(ring).hotExtents == Array(0...65))
        al.checkInvariants()
    }

    // MARK: Eviction and back-pressure

    @Test func evictsTheLeastRecentlyUsedIdleExtent() {
        var al = Self.small()
        var ring = Self.blankRing(4)
        Self.warm(&al, &ring, Array(0..<8), idleOrder: [3, 0, 1, 2, 4, 5, 6, 7])
        #expect(al.extentsInUse == 8)
        // Using extent 3 again moves it to the back of the line: 0 is now the oldest.
        #expect(al.beginWrite(offset: 3 * Self.extent, length: 1) == .proceed)
        al.endWrite(offset: 3 * Self.extent, length: 1)
        guard case .needTransaction(let tx) = al.beginWrite(offset: 10 * Self.extent, length: 1) else { Issue.record(); return }
        #expect(tx.evictedCount == 1)
        var evicted: [Int] = []
        al.forEachEvicted(of: tx) { evicted.append($0) }
        #expect(evicted == [0])
        #expect(al.byteRange(ofExtent: 0) == (0, Self.extent))
        #expect(!al.isHot(extent: 0), "cold in memory at once: a new write to it needs a new transaction")
        #expect(Self.persist(tx, &al, &ring) == nil)
        #expect(Self.recover(ring).hotExtents == [1, 2, 3, 4, 5, 6, 7, 10])
        al.checkInvariants()
    }

    /// What a node marks when its disk detaches while primary: the extents a crash would resync,
    /// idle ones included, evicted ones not (simulator seed 103288).
    @Test func extentsInTableAreWhatACrashWouldResync() {
        var al = Self.small()
        var ring = Self.blankRing(4)
        Self.warm(&al, &ring, Array(0..<8))
        #expect(al.beginWrite(offset: 2 * Self.extent, length: 1) == .proceed)  // one in use, the rest idle
        guard case .needTransaction(let tx) = al.beginWrite(offset: 10 * Self.extent, length: 1) else { Issue.record(); return }
        #expect(Self.persist(tx, &al, &ring) == nil)
        var inTable: [Int] = []
        al.forEachExtentInTable { inTable.append($0) }
        #expect(inTable.sorted() == Self.recover(ring).hotExtents)
        #expect(inTable.sorted() == [1, 2, 3, 4, 5, 6, 7, 10], "extent 0 was evicted")
    }

    @Test func busyLogAsksToWaitAndTakesNothing() {
        var al = Self.small()
        var ring = Self.blankRing(4)
        Self.warm(&al, &ring, Array(0..<8), end: false)
        #expect(al.beginWrite(offset: 9 * Self.extent, length: 1) == .wait)
        #expect(al.references(extent: 9) == 0 && al.queuedUpdateCount == 0)
        al.checkInvariants()
        let freed = al.endWrite(offset: 5 * Self.extent, length: 1)
        #expect(freed, "extent 5 went idle")
        guard case .needTransaction(let tx) = al.beginWrite(offset: 9 * Self.extent, length: 1) else { Issue.record(); return }
        var evicted: [Int] = []
        al.forEachEvicted(of: tx) { evicted.append($0) }
        #expect(evicted == [5])
        _ = Self.persist(tx, &al, &ring)
        al.checkInvariants()
    }

    @Test func aWriteGetsAllItsExtentsOrNone() {
        var al = Self.small()
        var ring = Self.blankRing(4)
        Self.warm(&al, &ring, Array(0..<8), end: false)
        al.endWrite(offset: 7 * Self.extent, length: 1)
        // Needs 20 and 21, one idle slot: wait, holding nothing.
        #expect(al.beginWrite(offset: 20 * Self.extent + 5, length: Self.extent) == .wait)
        // Needs 7 (idle, hot) and 8 (cold): the only idle slot is 7's own, so it must wait too.
        #expect(al.beginWrite(offset: 8 * Self.extent - 1, length: 2) == .wait)
        #expect(al.references(extent: 7) == 0 && al.references(extent: 8) == 0 && al.isHot(extent: 7))
        al.checkInvariants()
        // Extent 7 alone fits.
        #expect(al.beginWrite(offset: 7 * Self.extent, length: 1) == .proceed)
        al.checkInvariants()
    }

    @Test func abandonedWriteLeavesAnEvictableExtent() {
        var al = Self.small()
        var ring = Self.blankRing(4)
        guard case .needTransaction(let tx) = al.beginWrite(offset: 0, length: 1) else { Issue.record(); return }
        // The client went away before the transaction was persisted.
        let freed = al.endWrite(offset: 0, length: 1)
        #expect(!freed, "not hot yet, so not idle yet")
        al.checkInvariants()
        #expect(Self.persist(tx, &al, &ring) == nil)
        #expect(al.isHot(extent: 0) && al.references(extent: 0) == 0)
        al.checkInvariants()
        Self.warm(&al, &ring, Array(1..<8), end: false)
        guard case .needTransaction(let next) = al.beginWrite(offset: 9 * Self.extent, length: 1) else { Issue.record(); return }
        var evicted: [Int] = []
        al.forEachEvicted(of: next) { evicted.append($0) }
        #expect(evicted == [0])
    }

    // MARK: Recovery

    @Test func fromASuperblock() throws {
        let sb = try Superblock(resourceName: "r0", nodeID: 0, deviceBytes: 1 << 40, createdUnixSeconds: 0)
        let al = ActivityLog(superblock: sb, nextSequence: 9)
        #expect(al.capacity == 1237 && al.extentBytes == 4 << 20 && al.ringSlots == 8 && al.extentCount == 1 << 18)
        #expect(al.persistedSequence == 8 && al.extentsInUse == 0 && al.extentsPerWriteMax == 9)
        #expect(al.extent(ofOffset: (4 << 20) + 1) == 1)
        al.checkInvariants()
    }

    @Test func emptyRingRecoversNothing() {
        let r = Self.recover(Self.blankRing(4))
        #expect(r.hotExtents.isEmpty && r.isComplete && r.nextSequence == 1 && r.validTransactions == 0)
    }

    @Test func tornNewestSlotLeavesThePreviousState() {
        var al = Self.small()
        var ring = Self.blankRing(4)
        Self.warm(&al, &ring, [0, 1, 2])
        let before = Self.recover(ring)
        #expect(before.hotExtents == [0, 1, 2])
        guard case .needTransaction(let tx) = al.beginWrite(offset: 30 * Self.extent, length: 1) else { Issue.record(); return }
        let image = al.encoded(tx)
        // The slot holds older bytes (as it does once the ring wraps), so any tear shows.
        ring[tx.slot] = [UInt8](repeating: 0xAB, count: 4096)
        for sectors in 1..<8 {
            var torn = ring
            torn[tx.slot].replaceSubrange(0..<(sectors * 512), with: image[0..<(sectors * 512)])
            let r = Self.recover(torn)
            #expect(r.isComplete && r.hotExtents == before.hotExtents && r.nextSequence == before.nextSequence)
        }
        var garbage = ring
        garbage[tx.slot] = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        #expect(Self.recover(garbage) == before)
        _ = Self.persist(tx, &al, &ring)
        #expect(Self.recover(ring).hotExtents == [0, 1, 2, 30])
    }

    @Test func misplacedAndForeignSlotsAreIgnored() {
        var al = Self.small()
        var ring = Self.blankRing(4)
        Self.warm(&al, &ring, [4])
        let good = Self.recover(ring)
        #expect(good.validTransactions == 1)
        var copied = ring
        copied[3] = ring[1]  // sequence 1 belongs in slot 1
        #expect(Self.recover(copied) == good)
        var foreign = ring
        foreign[2] = try! Superblock(resourceName: "r", nodeID: 0, deviceBytes: 1 << 30, createdUnixSeconds: 0).encoded
        #expect(Self.recover(foreign) == good)
    }

    @Test func resetForgetsThePreviousLife() {
        var al = Self.small()
        var ring = Self.blankRing(4)
        Self.warm(&al, &ring, [0, 1, 2])
        let first = Self.recover(ring)
        #expect(first.hotExtents == [0, 1, 2])
        // Restart: the node marked 0, 1, 2 in its bitmap and persisted it; a new log begins.
        var next = Self.small(capacity: 10, ringSlots: 4, context: 4, nextSequence: first.nextSequence)
        Self.warm(&next, &ring, [7])
        let second = Self.recover(ring)
        #expect(second.hotExtents == [7] && second.isComplete && second.nextSequence == first.nextSequence + 1)
    }

    @Test func contextsCoverTheTableOnceTheResetIsOverwritten() {
        // Capacity 8, 3 context entries per transaction, 4 slots: any 3 consecutive transactions
        // repeat the whole table.
        var al = Self.small()
        var ring = Self.blankRing(4)
        Self.warm(&al, &ring, Array(0..<8))
        for e in 8..<20 { Self.warm(&al, &ring, [e]) }  // 12 more transactions, one eviction each
        let r = Self.recover(ring)
        #expect(r.isComplete && r.hotExtents == Array(12..<20))
        // Damage one slot that is not the newest: the replay would miss part of the table.
        let newest = Int((r.nextSequence - 1) % 4)
        var damaged = ring
        damaged[(newest + 2) % 4][100] ^= 1
        let partial = Self.recover(damaged)
        #expect(!partial.isComplete, "fall back to a full resync")
        // The newest slot torn is survivable, and the best effort still names what it saw.
        var torn = ring
        torn[newest][100] ^= 1
        #expect(Self.recover(torn).isComplete)
    }

    @Test func mixedConfigurationsWithoutAResetAreIncomplete() {
        var ring = Self.blankRing(4)
        var old = Self.small(capacity: 8)
        Self.warm(&old, &ring, [0])
        Self.warm(&old, &ring, [1])
        let r1 = Self.recover(ring)
        var new = Self.small(capacity: 9, nextSequence: r1.nextSequence)
        Self.warm(&new, &ring, [5])
        Self.warm(&new, &ring, [6])
        #expect(Self.recover(ring).hotExtents == [5, 6] && Self.recover(ring).isComplete)
        // Lose the reset: sequences 1, 2 and 4 remain, with a gap and two capacities.
        ring[3] = [UInt8](repeating: 0, count: 4096)
        let r = Self.recover(ring)
        // Best effort names what the surviving slots saw (5 was only in the lost reset).
        #expect(!r.isComplete && r.hotExtents == [0, 1, 6])
    }

    @Test func hotByteRangesClipAtTheDeviceEnd() {
        let r = ActivityLog.Recovery(hotExtents: [0, 2, 9], extentBytes: 4096, isComplete: true, nextSequence: 1, validTransactions: 1)
        let expected: [Range<UInt64>] = [0..<4096, 8192..<12278]
        #expect(r.hotByteRanges(deviceBytes: 12278) == expected)
    }

    @Test func misuseIsABug() async {
        await #expect(processExitsWith: .failure) {
            var al = ActivityLog(deviceBytes: 1 << 30, capacity: 64, ringSlots: 2, nextSequence: 1)
            al.endWrite(offset: 0, length: 4096)
        }
        await #expect(processExitsWith: .failure) {
            var al = ActivityLog(deviceBytes: 1 << 30, capacity: 64, ringSlots: 2, nextSequence: 1)
            _ = al.beginWrite(offset: (1 << 30) - 1, length: 2)
        }
        await #expect(processExitsWith: .failure) {
            // 7 extents cannot hold one 32 MiB write (9 extents of 4 MiB).
            _ = ActivityLog(deviceBytes: 1 << 30, capacity: 7, ringSlots: 2, nextSequence: 1)
        }
    }

    // MARK: Crash simulation

    struct Write {
        var offset: UInt64
        var length: UInt64
        var extents: ClosedRange<Int>
    }

    /// Random writes against a model node that follows the documented protocol (bitmap pages of
    /// evicted extents before the transaction, bits set before `endWrite`). After every step it
    /// "crashes" (the ring as it is, and the in-flight transaction torn at every sector count) and
    /// checks that recovery names every extent with a write in flight or bits not on disk.
    /// Every submitted write must find its extents hot in the ring.
    @Test(arguments: [(8, 4, 3, 1), (8, 2, 884, 2), (24, 3, 12, 3), (16, 9, 2, 4)])
    func crashAtEveryStep(capacity: Int, ringSlots: Int, context: Int, seed: UInt64) {
        var rng = MetadataTestRNG(seed: seed)
        let extents: UInt64 = 40
        func makeLog(_ next: UInt64) -> ActivityLog {
            Self.small(capacity: capacity, ringSlots: ringSlots, context: context, nextSequence: next, extents: extents)
        }
        var al = makeLog(1)
        var ring = Self.blankRing(ringSlots)
        var onDisk = Self.recover(ring)
        var unpersistedBits = Set<Int>()
        var submitted: [Write] = []
        var waiting: [(write: Write, sequence: UInt64)] = []
        var parked: [Write] = []
        var pending: Transaction?
        var transactions = 0, evictions = 0, restarts = 0, waits = 0

        func submit(_ w: Write) {
            for e in w.extents where !onDisk.hotExtents.contains(e) {
                Issue.record("write to extent \(e) submitted while cold on disk")
            }
            submitted.append(w)
        }
        func begin(_ w: Write) {
            switch al.beginWrite(offset: w.offset, length: w.length) {
            case .proceed: submit(w)
            case .needTransaction(let tx):
                #expect(pending == nil)
                pending = tx
                waiting.append((w, tx.sequence))
            case .waitForTransaction(let sequence):
                #expect(pending != nil && sequence >= pending!.sequence)
                waiting.append((w, sequence))
            case .wait:
                waits += 1
                parked.append(w)
            }
        }
        func retryParked() {
            let again = parked
            parked = []
            for w in again { begin(w) }
        }
        func evicted(_ tx: Transaction) -> Set<Int> {
            var set = Set<Int>()
            al.forEachEvicted(of: tx) { set.insert($0) }
            return set
        }

        for step in 0..<2500 {
            switch rng.below(100) {
            case 0..<35 where submitted.count + waiting.count < 12:
                let offset = UInt64(rng.below(Int(extents * Self.extent)))
                let length = UInt64(1 + rng.below(Int(min(128 * 1024, extents * Self.extent - offset))))
                let w = Write(offset: offset, length: length,
                              extents: Int(offset / Self.extent)...Int((offset + length - 1) / Self.extent))
                begin(w)
            case 35..<55:
                guard let tx = pending else { break }
                // Bitmap pages of the evicted extents first, then the transaction.
                let gone = evicted(tx)
                evictions += gone.count
                unpersistedBits.subtract(gone)
                ring[tx.slot] = al.encoded(tx)
                onDisk = Self.recover(ring)
                transactions += 1
                pending = al.transactionPersisted(tx)
                let ready = waiting.filter { $0.sequence <= tx.sequence }
                waiting.removeAll { $0.sequence <= tx.sequence }
                for (w, _) in ready { submit(w) }
                retryParked()
            case 55..<82:
                guard !submitted.isEmpty else { break }
                let w = submitted.remove(at: rng.below(submitted.count))
                // Worst case: no write reaches the peer, every one leaves bits.
                unpersistedBits.formUnion(w.extents)
                if al.endWrite(offset: w.offset, length: w.length) { retryParked() }
            case 82..<85:
                guard !waiting.isEmpty else { break }
                let (w, _) = waiting.remove(at: rng.below(waiting.count))
                if al.endWrite(offset: w.offset, length: w.length) { retryParked() }
            case 85..<90:
                unpersistedBits.removeAll()  // the node wrote all dirty bitmap pages
            case 90:
                guard step % 3 == 0 else { break }
                // A real crash, maybe mid-transaction, and a restart from the recovery.
                if let tx = pending, rng.below(2) == 0 {
                    unpersistedBits.subtract(evicted(tx))
                    let sectors = 1 + rng.below(8)
                    ring[tx.slot].replaceSubrange(0..<(sectors * 512), with: al.encoded(tx)[0..<(sectors * 512)])
                }
                let r = Self.recover(ring)
                #expect(r.isComplete)
                let required = unpersistedBits.union(submitted.flatMap { Array($0.extents) })
                #expect(required.isSubset(of: r.hotExtents))
                // The node marks the recovered extents and persists its bitmap, then starts over.
                al = makeLog(r.nextSequence)
                onDisk = r
                unpersistedBits = []
                submitted = []
                waiting = []
                parked = []
                pending = nil
                restarts += 1
            default:
                retryParked()
            }
            al.checkInvariants()

            // Crash here, with the ring as it is...
            let required = unpersistedBits.union(submitted.flatMap { Array($0.extents) })
            #expect(onDisk.isComplete)
            if !required.isSubset(of: onDisk.hotExtents) {
                Issue.record("step \(step): \(required.subtracting(onDisk.hotExtents).sorted()) not hot on disk")
            }
            // ... or while the in-flight transaction is being written (its bitmap pages are
            // already on disk when its first sector goes out).
            if let tx = pending, step % 2 == 0 {
                let image = al.encoded(tx)
                let requiredTorn = unpersistedBits.subtracting(evicted(tx)).union(submitted.flatMap { Array($0.extents) })
                for sectors in [1, 4, 8] {
                    var torn = ring
                    torn[tx.slot].replaceSubrange(0..<(sectors * 512), with: image[0..<(sectors * 512)])
                    let r = Self.recover(torn)
                    #expect(r.isComplete)
                    if !requiredTorn.isSubset(of: r.hotExtents) {
                        Issue.record("step \(step), \(sectors) sectors: \(requiredTorn.subtracting(r.hotExtents).sorted()) lost")
                    }
                }
            }
        }
        // The run must have exercised what it claims to.
        #expect(transactions > 50 && evictions > 20 && restarts > 0 && waits > 0)
    }
}
