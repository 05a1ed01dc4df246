/// The secondary's bookkeeping of point-in-time barriers (Protocol/barriers.md): which barriers
/// are retained, which chunks each one saved and where, and every question the node asks of them.
/// No I/O: the node's `UndoStore` reads and writes the segment files and keeps this in step.
///
/// The rule everything follows: a record **tagged N** holds a chunk's content as of barrier N,
/// saved at the chunk's first overwrite after barrier N (and before barrier N + 1). So the content
/// of chunk c at barrier K is the record for c with the **smallest tag ≥ K**, if there is one, and
/// the device's current content otherwise: had c been overwritten between K and that tag, a record
/// with a smaller tag would exist. Dropping the oldest barrier frees exactly its own records and
/// changes no other barrier's image; dropping any other barrier would, so only the oldest goes.
///
/// ```
/// barrier 1      write c       barrier 2        write c      write c     barrier 3    write c
///    |   save c (tag 1), write    |   save c (tag 2), write  write (no save)  |  save c (tag 3)...
/// image at 1: c = record tag 1; at 2: record tag 2; at 3: record tag 3 (or the device, before it)
/// ```
public struct UndoIndex: Sendable {
    /// One retained barrier and the records saved under its tag.
    struct Segment: Sendable {
        var info: BarrierInfo
        var previousID: UInt64
        var records: [UInt64: UndoRecordLocation]
        /// Bytes of its segment file: header and records.
        var bytes: UInt64
    }

    public let geometry: UndoGeometry
    /// Oldest first; ids strictly increase.
    private var segments: [Segment] = []
    /// Records of every barrier together (bounded by `Limits.undoRecordsMax`).
    public private(set) var recordCount = 0
    /// Bytes of every segment file together.
    public private(set) var totalBytes: UInt64 = 0

    public init(geometry: UndoGeometry) {
        self.geometry = geometry
    }

    // MARK: Barriers

    /// Retained barriers, oldest first.
    public var barriers: [BarrierInfo] { segments.map(\.info) }
    public var oldest: BarrierInfo? { segments.first?.info }
    public var newest: BarrierInfo? { segments.last?.info }
    public var isEmpty: Bool { segments.isEmpty }

    public func contains(_ id: UInt64) -> Bool { position(of: id) != nil }

    public func barrier(_ id: UInt64) -> BarrierInfo? { position(of: id).map { segments[$0].info } }

    /// Bytes barrier `id` holds on disk (its segment file), nil when not retained.
    public func bytesHeld(_ id: UInt64) -> UInt64? { position(of: id).map { segments[$0].bytes } }

    /// Records saved under barrier `id`'s tag, nil when not retained.
    public func recordCount(_ id: UInt64) -> Int? { position(of: id).map { segments[$0].records.count } }

    /// The barrier id a new segment names as its predecessor.
    public var newestID: UInt64 { segments.last?.info.id ?? 0 }

    /// Index of the retained barrier `id` (binary search: ids increase).
    private func position(of id: UInt64) -> Int? {
        let at = firstPosition(atLeast: id)
        return at < segments.count && segments[at].info.id == id ? at : nil
    }

    /// Index of the first retained barrier with id ≥ `id` (`segments.count` if none).
    private func firstPosition(atLeast id: UInt64) -> Int {
        var low = 0, high = segments.count
        while low < high {
            let mid = (low + high) / 2
            if segments[mid].info.id < id { low = mid + 1 } else { high = mid }
        }
        return low
    }

    /// Records a new newest barrier whose segment file (`segmentBytes`, its header) exists. From
    /// now on writes save chunks under its tag.
    public mutating func addBarrier(_ info: BarrierInfo, segmentBytes: UInt64 = UInt64(UndoSegmentHeader.encodedBytes)) throws(BarrierError) {
        do { try info.validate() } catch { throw .badBarrier(error) }
        guard info.id > newestID else { throw .notIncreasing(id: info.id, newest: newestID) }
        guard segments.count < Limits.barriersRetainedMax else { throw .tooManyBarriers }
        segments.append(Segment(info: info, previousID: newestID, records: [:], bytes: segmentBytes))
        totalBytes += segmentBytes
    }

    /// Adds a recovered segment (at attach), oldest first; `records` as `UndoSegmentScan` found
    /// them, `bytes` the file's size after truncating a torn tail.
    public mutating func addRecovered(_ header: UndoSegmentHeader, records: [UndoRecordLocation], bytes: UInt64) throws(BarrierError) {
        guard header.geometry == geometry else { throw .geometryMismatch(id: header.barrier.id) }
        guard header.barrier.id > newestID else { throw .notIncreasing(id: header.barrier.id, newest: newestID) }
        guard segments.count < Limits.barriersRetainedMax else { throw .tooManyBarriers }
        var table: [UInt64: UndoRecordLocation] = [:]
        table.reserveCapacity(records.count)
        for record in records where table[record.chunk] == nil { table[record.chunk] = record }
        segments.append(Segment(info: header.barrier, previousID: header.previousID, records: table, bytes: bytes))
        recordCount += table.count
        totalBytes += bytes
    }

    /// The previous id barrier `id`'s segment recorded (recovery checks the chain with it).
    public func previousID(of id: UInt64) -> UInt64? { position(of: id).map { segments[$0].previousID } }

    /// Forgets the oldest barrier (the node unlinks its segment). Its records were needed by no
    /// other barrier.
    @discardableResult
    public mutating func dropOldest() -> BarrierInfo {
        precondition(!segments.isEmpty, "dropOldest with no barrier")
        let gone = segments.removeFirst()
        recordCount -= gone.records.count
        totalBytes -= gone.bytes
        return gone.info
    }

    /// Forgets the newest barrier (after a rollback to an older one, newest first).
    @discardableResult
    public mutating func dropNewest() -> BarrierInfo {
        precondition(!segments.isEmpty, "dropNewest with no barrier")
        let gone = segments.removeLast()
        recordCount -= gone.records.count
        totalBytes -= gone.bytes
        return gone.info
    }

    /// Empties barrier `id`'s records (after a rollback to it: the device is its image again, so
    /// its records are redundant); its segment is back to `segmentBytes`.
    public mutating func clearRecords(of id: UInt64, segmentBytes: UInt64 = UInt64(UndoSegmentHeader.encodedBytes)) {
        guard let at = position(of: id) else { preconditionFailure("clearRecords of barrier \(id), not retained") }
        recordCount -= segments[at].records.count
        totalBytes = totalBytes - segments[at].bytes + segmentBytes
        segments[at].records = [:]
        segments[at].bytes = segmentBytes
    }

    // MARK: The write path

    /// Whether chunk `chunk` must be saved before it is overwritten: there is a barrier and the
    /// chunk has not been saved under the newest one yet.
    @inline(__always)
    public func needsSave(chunk: UInt64) -> Bool {
        guard let last = segments.last else { return false }
        return last.records[chunk] == nil
    }

    /// The chunks a write (or trim, or zeroes) of `[offset, offset + length)` must save first, in
    /// order, into `chunks` (emptied first; reuse it so the write path does not allocate).
    public func chunksToSave(offset: UInt64, length: UInt64, into chunks: inout [UInt64]) {
        chunks.removeAll(keepingCapacity: true)
        guard !segments.isEmpty else { return }
        for chunk in geometry.chunks(offset: offset, length: length) where needsSave(chunk: chunk) {
            chunks.append(chunk)
        }
    }

    /// Records that `location` (a chunk's content before its first overwrite since the newest
    /// barrier) was appended to the newest segment. The node adds it when the append succeeded and
    /// overwrites the device chunk only after the segment is synced.
    public mutating func addRecord(_ location: UndoRecordLocation) {
        precondition(!segments.isEmpty, "a record with no barrier")
        precondition(location.chunk < geometry.chunkCount && location.dataBytes == geometry.length(ofChunk: location.chunk))
        precondition(segments[segments.count - 1].records[location.chunk] == nil, "chunk \(location.chunk) saved twice")
        segments[segments.count - 1].records[location.chunk] = location
        segments[segments.count - 1].bytes += location.recordBytes
        recordCount += 1
        totalBytes += location.recordBytes
    }

    // MARK: Reading a barrier's image

    /// Where chunk `chunk`'s content at barrier `id` lives: a record (the one with the smallest
    /// tag ≥ id) or, when nil, the device. `id` must be retained.
    public func location(chunk: UInt64, at id: UInt64) -> (barrierID: UInt64, record: UndoRecordLocation)? {
        var at = firstPosition(atLeast: id)
        precondition(at < segments.count && segments[at].info.id == id, "barrier \(id) is not retained")
        while at < segments.count {
            if let record = segments[at].records[chunk] { return (segments[at].info.id, record) }
            at += 1
        }
        return nil
    }

    /// Where each byte of `[offset, offset + length)` of the image at barrier `id` comes from, in
    /// order, into `pieces` (emptied first). Neighbouring device pieces are merged.
    ///
    /// An export read runs while replication goes on: a device piece read while a write to the
    /// same chunk saves and overwrites it may return the new bytes. The node either holds writes
    /// to chunks an export read is reading from the device, or asks again after the read
    /// (`location` then names the record saved meanwhile) and rereads.
    public func readPlan(at id: UInt64, offset: UInt64, length: UInt64, into pieces: inout [ImagePiece]) {
        pieces.removeAll(keepingCapacity: true)
        var at = offset
        let end = offset + length
        for chunk in geometry.chunks(offset: offset, length: length) {
            let chunkStart = geometry.offset(ofChunk: chunk)
            let pieceEnd = min(end, chunkStart + UInt64(geometry.length(ofChunk: chunk)))
            let count = Int(pieceEnd - at)
            if let (barrierID, record) = location(chunk: chunk, at: id) {
                pieces.append(ImagePiece(length: count, source: .record(barrierID: barrierID, fileOffset: record.dataOffset + (at - chunkStart), record: record)))
            } else if let last = pieces.last, case .device(let lastOffset) = last.source, lastOffset + UInt64(last.length) == at {
                pieces[pieces.count - 1].length += count
            } else {
                pieces.append(ImagePiece(length: count, source: .device(offset: at)))
            }
            at = pieceEnd
        }
    }

    // MARK: Changed chunks, rollback

    /// Chunks written between barriers `from` and `to` (both retained, from < to), or since
    /// `from` when `to` is nil; sorted. A chunk rewritten with the same bytes counts as changed.
    public func changedChunks(from: UInt64, to: UInt64?) throws(BarrierError) -> [UInt64] {
        guard let start = position(of: from) else { throw .unknownBarrier(from) }
        var end = segments.count
        if let to {
            guard let toAt = position(of: to) else { throw .unknownBarrier(to) }
            guard toAt > start else { throw .notIncreasing(id: to, newest: from) }
            end = toAt
        }
        var union = Set<UInt64>()
        for segment in segments[start..<end] { union.formUnion(segment.records.keys) }
        return union.sorted()
    }

    /// The same as a bitmap of one bit per chunk (for an NBD dirty-bitmap meta context).
    public func changedBitmap(from: UInt64, to: UInt64?) throws(BarrierError) -> DirtyBitmap {
        var bitmap = DirtyBitmap(deviceBytes: geometry.deviceBytes, granularityBytes: geometry.chunkBytes)
        for chunk in try changedChunks(from: from, to: to) { bitmap.setBit(Int(chunk)) }
        return bitmap
    }

    /// How to put the device back to barrier `id`: write each record back over its chunk. The
    /// chunks are exactly those changed since `id`, which the primary must resync (or roll back
    /// too). Barriers newer than `id` are gone after a rollback (`newer`).
    public func rollbackPlan(to id: UInt64) throws(BarrierError) -> RollbackPlan {
        guard let start = position(of: id) else { throw .unknownBarrier(id) }
        var restores: [RollbackPlan.Restore] = []
        for chunk in try changedChunks(from: id, to: nil) {
            let (barrierID, record) = location(chunk: chunk, at: id)!
            restores.append(RollbackPlan.Restore(chunk: chunk, barrierID: barrierID, record: record))
        }
        return RollbackPlan(target: segments[start].info, restores: restores, newer: segments[(start + 1)...].map(\.info))
    }

    /// Checks the index's own bookkeeping (tests).
    public func checkInvariants() {
        var bytes: UInt64 = 0, records = 0, previous: UInt64 = 0
        for segment in segments {
            precondition(segment.info.id > previous)
            previous = segment.info.id
            records += segment.records.count
            var recordBytes: UInt64 = 0
            for (chunk, record) in segment.records {
                precondition(chunk == record.chunk && chunk < geometry.chunkCount)
                recordBytes += record.recordBytes
            }
            precondition(segment.bytes >= recordBytes + UInt64(UndoSegmentHeader.encodedBytes))
            bytes += segment.bytes
        }
        precondition(bytes == totalBytes && records == recordCount)
    }
}

/// A stretch of a barrier's image and where its bytes are.
public struct ImagePiece: Equatable, Sendable {
    public enum Source: Equatable, Sendable {
        /// The device's current bytes at this offset.
        case device(offset: UInt64)
        /// Bytes of a record in barrier `barrierID`'s segment file, from `fileOffset` (inside the
        /// record's data). `record` is the whole record, for a reader that verifies its checksum.
        case record(barrierID: UInt64, fileOffset: UInt64, record: UndoRecordLocation)
    }

    public var length: Int
    public var source: Source

    public init(length: Int, source: Source) {
        self.length = length
        self.source = source
    }
}

/// What rolling back to a barrier writes.
public struct RollbackPlan: Equatable, Sendable {
    public struct Restore: Equatable, Sendable {
        public var chunk: UInt64
        /// The segment holding the content (the smallest tag ≥ the target).
        public var barrierID: UInt64
        public var record: UndoRecordLocation
    }

    public var target: BarrierInfo
    /// In chunk order; also the chunks changed since the target.
    public var restores: [Restore]
    /// Barriers newer than the target, oldest first: dropped once the rollback is done.
    public var newer: [BarrierInfo]
}

/// Retention of barriers: by count, age and space, always dropping the oldest first.
public struct BarrierRetention: Equatable, Sendable {
    public enum Reason: String, Equatable, Sendable {
        case count, age, space
        /// The in-memory index is full (`Limits.undoRecordsMax`).
        case records
    }

    /// Barriers kept at most (at most `Limits.barriersRetainedMax`).
    public var countMax: Int
    /// Seconds a barrier is kept at most (nil: no age limit).
    public var ageSecondsMax: Int64?
    /// Bytes of segment files at most (nil: no limit but the disk's).
    public var bytesMax: UInt64?

    public init(countMax: Int = Limits.barriersRetainedMax, ageSecondsMax: Int64? = nil, bytesMax: UInt64? = nil) {
        precondition(countMax >= 1 && countMax <= Limits.barriersRetainedMax)
        self.countMax = countMax
        self.ageSecondsMax = ageSecondsMax
        self.bytesMax = bytesMax
    }

    /// The oldest barriers to drop, oldest first with why, so that the index keeps the policy and
    /// still has room for `extraBarriers` more barriers and `extraRecordBytes` in `extraRecords`
    /// more records (what the caller is about to add). May name every barrier: then the write
    /// that wanted room needs no saving at all. Replication never waits on the undo store.
    public func drops(_ index: UndoIndex, nowUnixSeconds: Int64, extraBarriers: Int = 0,
                      extraRecords: Int = 0, extraRecordBytes: UInt64 = 0) -> [(BarrierInfo, Reason)] {
        let barriers = index.barriers
        var result: [(BarrierInfo, Reason)] = []
        var kept = barriers.count, bytes = index.totalBytes, records = index.recordCount
        for barrier in barriers {
            let reason: Reason
            if kept + extraBarriers > countMax {
                reason = .count
            } else if let age = ageSecondsMax, nowUnixSeconds - barrier.createdUnixSeconds > age {
                reason = .age
            } else if let max = bytesMax, bytes + extraRecordBytes > max {
                reason = .space
            } else if records + extraRecords > Limits.undoRecordsMax {
                reason = .records
            } else {
                break
            }
            result.append((barrier, reason))
            kept -= 1
            bytes -= index.bytesHeld(barrier.id)!
            records -= index.recordCount(barrier.id)!
        }
        return result
    }
}

/// Why a barrier operation cannot be done.
public enum BarrierError: Error, Equatable, Sendable, CustomStringConvertible {
    case unknownBarrier(UInt64)
    case notIncreasing(id: UInt64, newest: UInt64)
    case tooManyBarriers
    case badBarrier(UndoFormatError)
    case geometryMismatch(id: UInt64)

    public var description: String {
        switch self {
        case .unknownBarrier(let id): "no barrier \(id) is retained"
        case .notIncreasing(let id, let newest): "barrier \(id) is not newer than barrier \(newest)"
        case .tooManyBarriers: "\(Limits.barriersRetainedMax) barriers are retained already"
        case .badBarrier(let error): "\(error)"
        case .geometryMismatch(let id): "barrier \(id) was saved for another device size or chunk size"
        }
    }
}
