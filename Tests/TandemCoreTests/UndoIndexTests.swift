import Testing
import TandemCore

/// The undo index against a brute-force model: a full copy of the image at every barrier.
/// Segment files are byte arrays here, laid out exactly as the store writes them.
struct UndoModel {
    let geometry: UndoGeometry
    var index: UndoIndex
    var device: [UInt8]
    var files: [UInt64: [UInt8]] = [:]
    /// The model: the image at each retained barrier, and the chunks written while it was newest.
    var images: [UInt64: [UInt8]] = [:]
    var writtenIn: [UInt64: Set<UInt64>] = [:]
    var nextID: UInt64 = 1
    var now: Int64 = 1_000
    var rng: SplitMix64

    init(seed: UInt64, geometry: UndoGeometry) {
        self.geometry = geometry
        index = UndoIndex(geometry: geometry)
        rng = SplitMix64(seed: seed)
        device = (0..<Int(geometry.deviceBytes)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
    }

    mutating func barrier() throws {
        let info = BarrierInfo(id: nextID, createdUnixSeconds: now, label: "b\(nextID)")
        let header = UndoSegmentHeader(barrier: info, geometry: geometry, previousID: index.newestID)
        try index.addBarrier(info)
        files[info.id] = header.encoded
        images[info.id] = device
        writtenIn[info.id] = []
        nextID += UInt64(1 + rng.below(3))
        now += Int64(rng.below(100))
    }

    /// A write as the node does it: save what needs saving, then overwrite.
    mutating func write(offset: UInt64, length: Int, fill: UInt8) {
        var chunks: [UInt64] = []
        index.chunksToSave(offset: offset, length: UInt64(length), into: &chunks)
        for chunk in chunks {
            let newest = index.newest!.id
            let start = Int(geometry.offset(ofChunk: chunk))
            let data = Array(device[start..<start + geometry.length(ofChunk: chunk)])
            var head = [UInt8](repeating: 0, count: UndoRecordHeader.encodedBytes)
            let crc = CRC32C.checksum(data)
            head.withUnsafeMutableBytes { UndoRecordHeader(chunk: chunk, dataBytes: data.count, dataChecksum: crc, barrierID: newest).encode(into: $0) }
            let dataOffset = UInt64(files[newest]!.count + head.count)
            files[newest]! += head + data
            index.addRecord(UndoRecordLocation(chunk: chunk, dataOffset: dataOffset, dataBytes: data.count, dataChecksum: crc))
        }
        if let newest = index.newest?.id {
            for chunk in geometry.chunks(offset: offset, length: UInt64(length)) { writtenIn[newest]!.insert(chunk) }
        }
        for i in Int(offset)..<Int(offset) + length { device[i] = fill }
    }

    mutating func randomWrite() {
        let offset = UInt64(rng.below(Int(geometry.deviceBytes)))
        let length = 1 + rng.below(min(3 * geometry.chunkBytes, Int(geometry.deviceBytes - offset)))
        write(offset: offset, length: length, fill: UInt8(truncatingIfNeeded: rng.next()))
    }

    mutating func dropOldest() {
        let gone = index.dropOldest()
        files[gone.id] = nil
        images[gone.id] = nil
        writtenIn[gone.id] = nil
    }

    /// Reads a range of the image at `id` through the read plan.
    func read(at id: UInt64, offset: UInt64, length: Int) -> [UInt8] {
        var pieces: [ImagePiece] = []
        index.readPlan(at: id, offset: offset, length: UInt64(length), into: &pieces)
        var out: [UInt8] = []
        var at = offset
        for piece in pieces {
            switch piece.source {
            case .device(let from):
                #expect(from == at)
                out += device[Int(from)..<Int(from) + piece.length]
            case .record(let barrierID, let fileOffset, let record):
                let file = files[barrierID]!
                #expect(CRC32C.checksum(Array(file[Int(record.dataOffset)..<Int(record.dataOffset) + record.dataBytes])) == record.dataChecksum)
                out += file[Int(fileOffset)..<Int(fileOffset) + piece.length]
            }
            at += UInt64(piece.length)
        }
        #expect(out.count == length)
        return out
    }

    mutating func rollback(to id: UInt64) throws {
        let plan = try index.rollbackPlan(to: id)
        #expect(plan.restores.map(\.chunk) == writtenIn[id]!.union(plan.newer.flatMap { writtenIn[$0.id]! }).sorted())
        for restore in plan.restores {
            let file = files[restore.barrierID]!
            let data = file[Int(restore.record.dataOffset)..<Int(restore.record.dataOffset) + restore.record.dataBytes]
            let start = Int(geometry.offset(ofChunk: restore.chunk))
            device.replaceSubrange(start..<start + data.count, with: data)
        }
        #expect(firstDifference(device, images[id]!) == nil, "rollback to \(id) restores its image")
        for _ in plan.newer {
            let gone = index.dropNewest()
            files[gone.id] = nil
            images[gone.id] = nil
            writtenIn[gone.id] = nil
        }
        index.clearRecords(of: id)
        files[id] = Array(files[id]![0..<UndoSegmentHeader.encodedBytes])
        writtenIn[id] = []
    }

    func checkEveryBarrier() throws {
        index.checkInvariants()
        #expect(Set(index.barriers.map(\.id)) == Set(images.keys))
        #expect(index.totalBytes == files.values.reduce(0) { $0 + UInt64($1.count) })
        for barrier in index.barriers {
            #expect(firstDifference(read(at: barrier.id, offset: 0, length: Int(geometry.deviceBytes)), images[barrier.id]!) == nil, "image at \(barrier.id)")
            #expect(index.bytesHeld(barrier.id) == UInt64(files[barrier.id]!.count))
        }
        let ids = index.barriers.map(\.id)
        for (i, from) in ids.enumerated() {
            for to in ids[(i + 1)...].map(Optional.some) + [nil] {
                let changed = try index.changedChunks(from: from, to: to)
                let model = ids.filter { $0 >= from && (to == nil || $0 < to!) }.reduce(into: Set<UInt64>()) { $0.formUnion(writtenIn[$1]!) }
                #expect(changed == model.sorted())
                // Whatever differs between the two images is among the changed chunks.
                let a = images[from]!, b = to.map { images[$0]! } ?? device
                for chunk in 0..<geometry.chunkCount where !changed.contains(chunk) {
                    let start = Int(geometry.offset(ofChunk: chunk))
                    let range = start..<start + geometry.length(ofChunk: chunk)
                    #expect(a[range] == b[range], "chunk \(chunk) differs \(from)->\(String(describing: to)) but is not changed")
                }
            }
        }
    }
}

/// Where two byte arrays first differ (nil when equal): short failure messages for images.
func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int? {
    if a == b { return nil }
    if a.count != b.count { return min(a.count, b.count) }
    return a.indices.first { a[$0] != b[$0] }
}

@Suite struct UndoIndexTests {
    static let geometry = try! UndoGeometry(deviceBytes: 11 * 8192 + 4096, chunkBytes: 8192)

    @Test func noBarrierNoSaving() {
        let index = UndoIndex(geometry: Self.geometry)
        var chunks: [UInt64] = [99]
        index.chunksToSave(offset: 0, length: Self.geometry.deviceBytes, into: &chunks)
        #expect(chunks.isEmpty && !index.needsSave(chunk: 0))
    }

    @Test func savesOnlyTheFirstOverwriteAfterTheNewestBarrier() throws {
        var m = UndoModel(seed: 1, geometry: Self.geometry)
        try m.barrier()
        var chunks: [UInt64] = []
        m.index.chunksToSave(offset: 8191, length: 2, into: &chunks)
        #expect(chunks == [0, 1])
        m.write(offset: 8191, length: 2, fill: 1)
        m.index.chunksToSave(offset: 0, length: 3 * 8192, into: &chunks)
        #expect(chunks == [2])
        m.index.chunksToSave(offset: 11 * 8192, length: 4096, into: &chunks)
        #expect(chunks == [11])
        try m.barrier()
        m.index.chunksToSave(offset: 0, length: 8192, into: &chunks)
        #expect(chunks == [0])
        try m.checkEveryBarrier()
    }

    @Test func idsMustIncrease() throws {
        var index = UndoIndex(geometry: Self.geometry)
        try index.addBarrier(BarrierInfo(id: 5, createdUnixSeconds: 0))
        #expect(throws: BarrierError.notIncreasing(id: 5, newest: 5)) { try index.addBarrier(BarrierInfo(id: 5, createdUnixSeconds: 0)) }
        #expect(throws: BarrierError.notIncreasing(id: 4, newest: 5)) { try index.addBarrier(BarrierInfo(id: 4, createdUnixSeconds: 0)) }
        #expect(throws: BarrierError.unknownBarrier(3)) { try index.changedChunks(from: 3, to: nil) }
        #expect(throws: BarrierError.unknownBarrier(3)) { try index.rollbackPlan(to: 3) }
    }

    @Test func readPlanMergesDevicePieces() throws {
        var m = UndoModel(seed: 2, geometry: Self.geometry)
        try m.barrier()
        m.write(offset: 3 * 8192 + 5, length: 1, fill: 9)
        var pieces: [ImagePiece] = []
        m.index.readPlan(at: 1, offset: 100, length: 6 * 8192, into: &pieces)
        #expect(pieces.count == 3)
        #expect(pieces[0] == ImagePiece(length: 3 * 8192 - 100, source: .device(offset: 100)))
        #expect(pieces[1].length == 8192)
        guard case .record(1, let fileOffset, _) = pieces[1].source else { Issue.record("\(pieces[1])"); return }
        #expect(fileOffset == 128 + 32)
        #expect(pieces[2] == ImagePiece(length: 2 * 8192 + 100, source: .device(offset: 4 * 8192)))
    }

    /// Random writes, barriers, drops and rollbacks; after each step every retained barrier's
    /// image, the changed-chunk sets and the index's accounts match the model.
    @Test(arguments: 0..<12 as Range<UInt64>)
    func againstTheModel(seed: UInt64) throws {
        let geometry = seed % 2 == 0 ? Self.geometry : try UndoGeometry(deviceBytes: 20 * 4096, chunkBytes: 4096)
        var m = UndoModel(seed: seed, geometry: geometry)
        for step in 0..<300 {
            let roll = m.rng.below(100)
            if roll < 12 || m.index.isEmpty && roll < 30 {
                try m.barrier()
            } else if roll < 18 && !m.index.isEmpty {
                m.dropOldest()
            } else if roll < 21 && !m.index.isEmpty {
                let ids = m.index.barriers.map(\.id)
                try m.rollback(to: ids[m.rng.below(ids.count)])
            } else {
                m.randomWrite()
            }
            if step % 10 == 0 { try m.checkEveryBarrier() }
            // Random ranges at random barriers, not only whole images.
            if let ids = Optional(m.index.barriers.map(\.id)), !ids.isEmpty {
                let id = ids[m.rng.below(ids.count)]
                let offset = m.rng.below(Int(geometry.deviceBytes))
                let length = m.rng.below(Int(geometry.deviceBytes) - offset + 1)
                #expect(firstDifference(m.read(at: id, offset: UInt64(offset), length: length), Array(m.images[id]![offset..<offset + length])) == nil)
            }
        }
        try m.checkEveryBarrier()
    }

    @Test func changedBitmap() throws {
        var m = UndoModel(seed: 3, geometry: Self.geometry)
        try m.barrier()
        m.write(offset: 8192 * 2, length: 8192 * 2 + 1, fill: 1)
        let bitmap = try m.index.changedBitmap(from: 1, to: nil)
        #expect(bitmap.granularityBytes == 8192 && bitmap.setBitCount == 3 && bitmap.isSet(bit: 2) && bitmap.isSet(bit: 4))
    }

    // MARK: Retention

    func index(times: [Int64], recordsEach: Int = 0) throws -> UndoIndex {
        var index = UndoIndex(geometry: Self.geometry)
        for (i, t) in times.enumerated() {
            try index.addBarrier(BarrierInfo(id: UInt64(i + 1), createdUnixSeconds: t))
            for chunk in 0..<UInt64(recordsEach) {
                index.addRecord(UndoRecordLocation(chunk: chunk, dataOffset: 0, dataBytes: 8192, dataChecksum: 0))
            }
        }
        return index
    }

    @Test func retentionByCountDropsTheOldest() throws {
        let index = try index(times: [10, 20, 30, 40])
        let policy = BarrierRetention(countMax: 2)
        #expect(policy.drops(index, nowUnixSeconds: 50).map { $0.0.id } == [1, 2])
        #expect(policy.drops(index, nowUnixSeconds: 50).allSatisfy { $0.1 == .count })
        // Making room for a new barrier.
        #expect(policy.drops(index, nowUnixSeconds: 50, extraBarriers: 1).map { $0.0.id } == [1, 2, 3])
        #expect(BarrierRetention(countMax: 4).drops(index, nowUnixSeconds: 50).isEmpty)
    }

    @Test func retentionByAge() throws {
        let index = try index(times: [10, 20, 30, 40])
        let policy = BarrierRetention(ageSecondsMax: 15)
        #expect(policy.drops(index, nowUnixSeconds: 50).map { $0.0.id } == [1, 2, 3])
        #expect(policy.drops(index, nowUnixSeconds: 50).allSatisfy { $0.1 == .age })
        // Everything may go, the newest too: then writes save nothing.
        #expect(policy.drops(index, nowUnixSeconds: 1000).count == 4)
    }

    @Test func retentionBySpace() throws {
        let index = try index(times: [10, 20, 30], recordsEach: 2)
        let each = UInt64(128 + 2 * (32 + 8192))
        #expect(index.totalBytes == 3 * each)
        #expect(BarrierRetention(bytesMax: 3 * each).drops(index, nowUnixSeconds: 30).isEmpty)
        let policy = BarrierRetention(bytesMax: 3 * each)
        let room = policy.drops(index, nowUnixSeconds: 30, extraRecords: 1, extraRecordBytes: 8224)
        #expect(room.map { $0.0.id } == [1] && room[0].1 == .space)
        #expect(BarrierRetention(bytesMax: each).drops(index, nowUnixSeconds: 30, extraRecordBytes: 1).map { $0.0.id } == [1, 2, 3])
    }
}
