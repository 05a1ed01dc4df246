import Glibc
import Testing
import TandemCore
@testable import TandemNode

/// A device file, an undo directory, and the expected image at every barrier (the oracle).
final class UndoFixture {
    let dir: String
    let devicePath: String
    let undoPath: String
    let deviceBytes: UInt64
    let chunkBytes = 8192
    let fd: Int32
    var store: UndoStore!
    var oracle: [UInt64: [UInt8]] = [:]
    var rng: SplitMix64
    var nextID: UInt64 = 1
    var now: Int64 = 1_000

    init(seed: UInt64, chunks: Int = 24) throws {
        var template = Array("/tmp/tandem-undo-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
        devicePath = "\(dir)/device.img"
        undoPath = "\(dir)/undo"
        deviceBytes = UInt64(chunks * chunkBytes - 4096)
        rng = SplitMix64(seed: seed)
        fd = open(devicePath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        precondition(fd >= 0)
        let initial = (0..<Int(deviceBytes)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
        try initial.withUnsafeBytes { try BlockFile.write(fd, $0, at: 0, "device") }
        try reopen()
    }

    deinit {
        store = nil
        close(fd)
        _ = system("rm -rf '\(dir)'")
    }

    /// A fresh store object on the same directory: what a restart after a crash sees.
    func reopen(retention: BarrierRetention = BarrierRetention()) throws {
        store = nil
        store = try UndoStore(directory: undoPath, deviceBytes: deviceBytes, chunkBytes: chunkBytes, retention: retention)
    }

    var device: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(deviceBytes))
        try! bytes.withUnsafeMutableBytes { try BlockFile.read(fd, into: $0, at: 0, "device") }
        return bytes
    }

    func readDevice(_ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws {
        try BlockFile.read(fd, into: buffer, at: offset, "device")
    }

    func barrier() throws {
        let dropped = try store.createBarrier(BarrierInfo(id: nextID, createdUnixSeconds: now, label: "b\(nextID)"), nowUnixSeconds: now)
        for (gone, _) in dropped { oracle[gone.id] = nil }
        oracle[nextID] = device
        nextID += 1
        now += 10
    }

    /// A random write as the secondary applies it: save, sync, then overwrite.
    func write(crashBeforeDeviceWrite: Bool = false) throws -> (offset: UInt64, length: Int) {
        let offset = UInt64(rng.below(Int(deviceBytes)))
        let length = 1 + rng.below(min(3 * chunkBytes, Int(deviceBytes - offset)))
        let dropped = try store.save(offset: offset, length: UInt64(length), nowUnixSeconds: now, readDevice: readDevice)
        for (gone, _) in dropped { oracle[gone.id] = nil }
        if !crashBeforeDeviceWrite {
            let data = (0..<length).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            try data.withUnsafeBytes { try BlockFile.write(fd, $0, at: offset, "device") }
        }
        return (offset, length)
    }

    func segmentSize(_ id: UInt64) -> UInt64 {
        var st = stat()
        return stat("\(undoPath)/\(UndoStore.segmentName(id))", &st) == 0 ? UInt64(st.st_size) : 0
    }

    /// Every retained barrier reads back exactly its expected image, and the expected images of
    /// the barriers still retained are exactly the store's.
    func checkEveryBarrier(_ comment: Comment? = nil) throws {
        store.index.checkInvariants()
        #expect(Set(store.index.barriers.map(\.id)) == Set(oracle.keys), comment)
        for barrier in store.index.barriers {
            var image = [UInt8](repeating: 0, count: Int(deviceBytes))
            try image.withUnsafeMutableBytes { try store.readImage(at: barrier.id, offset: 0, into: $0, readDevice: readDevice) }
            #expect(image == oracle[barrier.id], "image at barrier \(barrier.id) \(comment.map { "\($0)" } ?? "")")
            // The newest segment has zeros written ahead of its records; the others just records.
            let held = store.index.bytesHeld(barrier.id)!, size = segmentSize(barrier.id)
            if barrier.id == store.index.newestID {
                #expect(held <= size && size - held <= UInt64(Limits.undoPreallocateBytes + chunkBytes + 4096))
            } else {
                #expect(held == size, "barrier \(barrier.id)")
            }
        }
    }

    func rollback(to id: UInt64) throws {
        _ = try store.rollback(to: id, writeDevice: { offset, bytes in try BlockFile.write(fd, bytes, at: offset, "device") },
                               syncDevice: {})
        for key in oracle.keys where key > id { oracle[key] = nil }
    }
}

@Suite struct UndoStoreTests {
    @Test func barriersSurviveRestartAndRestoreExactly() throws {
        let f = try UndoFixture(seed: 1)
        try f.barrier()
        for round in 0..<6 {
            for _ in 0..<8 { _ = try f.write() }
            try f.barrier()
            try f.checkEveryBarrier("round \(round)")
        }
        for _ in 0..<5 { _ = try f.write() }
        try f.reopen()
        #expect(f.store.recoveryLog.isEmpty)
        try f.checkEveryBarrier("after restart")
        try f.rollback(to: 3)
        #expect(f.device == f.oracle[3])
        #expect(f.store.index.newest?.id == 3 && f.store.index.recordCount(3) == 0 && f.segmentSize(3) == 128)
        try f.reopen()
        try f.checkEveryBarrier("after rollback and restart")
        // Barrier ids go on from the newest retained one.
        try f.barrier()
        _ = try f.write()
        try f.checkEveryBarrier()
    }

    /// A crash while appending: the records of the write that was being saved are cut anywhere
    /// (or followed by garbage), and its device write never happened. Recovery must keep every
    /// retained barrier exact.
    @Test(arguments: 0..<4 as Range<UInt64>)
    func crashWhileWritingTheUndoStore(seed: UInt64) throws {
        let f = try UndoFixture(seed: 100 + seed)
        try f.barrier()
        for step in 0..<60 {
            if f.rng.below(8) == 0 { try f.barrier() }
            let newest = f.store.index.newest!.id
            let before = f.segmentSize(newest)
            _ = try f.write(crashBeforeDeviceWrite: true)
            let after = f.segmentSize(newest)
            if after > before {
                // Anything between the last sync and now may or may not have reached the disk.
                let cut = before + UInt64(f.rng.below(Int(after - before) + 1))
                #expect(truncate("\(f.undoPath)/\(UndoStore.segmentName(newest))", off_t(cut)) == 0)
                if f.rng.below(3) == 0 {
                    let garbage = (0..<f.rng.below(100)).map { _ in UInt8(truncatingIfNeeded: f.rng.next()) }
                    let sfd = open("\(f.undoPath)/\(UndoStore.segmentName(newest))", O_WRONLY | O_APPEND)
                    _ = garbage.withUnsafeBytes { write(sfd, $0.baseAddress, $0.count) }
                    close(sfd)
                }
            }
            try f.reopen()
            try f.checkEveryBarrier("step \(step)")
            // The write happens after the restart (the primary resends it).
            _ = try f.write()
            try f.checkEveryBarrier("step \(step) rewritten")
        }
    }

    /// Records appended without their sync (a process killed before it) are read back at the
    /// next open and count as saved: writes to their chunks go to the device with no save and no
    /// sync, so the open must make them durable (seed 40506, `--barriers`).
    @Test func recordsReadBackAtOpenAreSynced() throws {
        let f = try UndoFixture(seed: 7)
        try f.barrier()
        #expect(!f.store.recoveredRecordsSynced)
        try f.store.save(offset: 0, length: UInt64(f.chunkBytes), nowUnixSeconds: f.now, sync: false, readDevice: f.readDevice)
        try f.reopen()
        #expect(!f.store.index.needsSave(chunk: 0))
        #expect(f.store.recoveredRecordsSynced)
        let readOnly = try UndoStore(directory: f.undoPath, deviceBytes: f.deviceBytes, readOnly: true)
        #expect(!readOnly.recoveredRecordsSynced)
    }

    @Test func aSegmentWithATornHeaderWasNeverABarrier() throws {
        let f = try UndoFixture(seed: 2)
        try f.barrier()
        _ = try f.write()
        try f.barrier()
        #expect(truncate("\(f.undoPath)/\(UndoStore.segmentName(2))", 60) == 0)
        f.oracle[2] = nil
        try f.reopen()
        #expect(f.store.recoveryLog.count == 1 && f.store.recoveryLog[0].contains("unfinished barrier creation"))
        try f.checkEveryBarrier()
    }

    @Test func aMissingMiddleSegmentDropsTheOlderBarriers() throws {
        let f = try UndoFixture(seed: 3)
        for _ in 0..<4 {
            try f.barrier()
            for _ in 0..<4 { _ = try f.write() }
        }
        #expect(unlink("\(f.undoPath)/\(UndoStore.segmentName(2))") == 0)
        f.oracle[1] = nil
        f.oracle[2] = nil
        try f.reopen()
        #expect(f.store.recoveryLog.contains { $0.contains("dropped barrier 1") })
        try f.checkEveryBarrier()
    }

    @Test func aRollbackInterruptedByACrashIsFinishedByRunningItAgain() throws {
        let f = try UndoFixture(seed: 4)
        for _ in 0..<4 {
            try f.barrier()
            for _ in 0..<6 { _ = try f.write() }
        }
        let plan = try f.store.beginRollback(to: 2)
        #expect(plan.restores.count > 2)
        // Half the restores reach the device, then the process dies.
        var buffer = [UInt8](repeating: 0, count: f.chunkBytes)
        for restore in plan.restores.prefix(plan.restores.count / 2) {
            try buffer.withUnsafeMutableBytes { raw in
                let data = UnsafeMutableRawBufferPointer(rebasing: raw[0..<restore.record.dataBytes])
                try f.store.readRecord(restore.record, of: restore.barrierID, into: data)
                try BlockFile.write(f.fd, UnsafeRawBufferPointer(data), at: f.store.geometry.offset(ofChunk: restore.chunk), "device")
            }
        }
        try f.reopen()
        #expect(f.store.pendingRollback == 2)
        try f.rollback(to: 2)
        #expect(f.store.pendingRollback == nil)
        #expect(f.device == f.oracle[2])
        try f.reopen()
        #expect(f.store.pendingRollback == nil)
        try f.checkEveryBarrier()
    }

    @Test func retentionDropsTheOldestAndWritesNeverFail() throws {
        let f = try UndoFixture(seed: 5)
        try f.reopen(retention: BarrierRetention(countMax: 3))
        for _ in 0..<6 {
            try f.barrier()
            for _ in 0..<3 { _ = try f.write() }
        }
        #expect(f.store.index.barriers.map(\.id) == [4, 5, 6])
        try f.checkEveryBarrier()
        // Space: room for about two chunks' records. The barriers over it go when the next one
        // is made; then the new one goes too once its records would not fit.
        let bytesMax = UInt64(128 + 2 * (32 + f.chunkBytes))
        try f.reopen(retention: BarrierRetention(bytesMax: bytesMax))
        let atCreate = try f.store.createBarrier(BarrierInfo(id: 7, createdUnixSeconds: f.now), nowUnixSeconds: f.now)
        #expect(atCreate.map { $0.0.id } == [4, 5, 6] && atCreate.allSatisfy { $0.1 == .space })
        var dropped: [UInt64] = []
        var saved = 0
        for chunk in 0..<UInt64(5) {
            let result = try f.store.save(offset: chunk * UInt64(f.chunkBytes), length: 1, nowUnixSeconds: f.now, readDevice: f.readDevice)
            dropped += result.map { $0.0.id }
            #expect(result.allSatisfy { $0.1 == .space })
            if f.store.index.newest != nil { saved = f.store.index.recordCount(7)! }
            #expect(f.store.index.totalBytes <= bytesMax)
        }
        #expect(saved == 2 && dropped == [7] && f.store.index.isEmpty)
        // No barrier: nothing to save, nothing fails.
        #expect(try f.store.save(offset: 0, length: f.deviceBytes, nowUnixSeconds: f.now, readDevice: f.readDevice).isEmpty)
    }

    @Test func aDamagedRecordIsAnErrorNotData() throws {
        let f = try UndoFixture(seed: 6)
        try f.barrier()
        _ = try f.write()
        let record = f.store.index.location(chunk: try f.store.index.changedChunks(from: 1, to: nil)[0], at: 1)!.record
        let sfd = open("\(f.undoPath)/\(UndoStore.segmentName(1))", O_WRONLY)
        var byte: UInt8 = 0x5A
        #expect(pwrite(sfd, &byte, 1, off_t(record.dataOffset + 5)) == 1)
        close(sfd)
        var image = [UInt8](repeating: 0, count: Int(f.deviceBytes))
        #expect(throws: UndoStoreError.self) {
            try image.withUnsafeMutableBytes { try f.store.readImage(at: 1, offset: 0, into: $0, readDevice: f.readDevice) }
        }
    }

    @Test func diffAndApplyRoundTrip() throws {
        let f = try UndoFixture(seed: 7)
        for _ in 0..<3 {
            try f.barrier()
            for _ in 0..<6 { _ = try f.write() }
        }
        let full1 = "\(f.dir)/full1.tdiff", d13 = "\(f.dir)/d13.tdiff", target = "\(f.dir)/target.img"
        let m1 = try BarrierStream.make(store: f.store, deviceFD: f.fd, deviceBytes: f.deviceBytes, from: nil, to: 1, output: full1, nowUnixSeconds: 0)
        #expect(m1.chunks == f.store.geometry.chunkCount)
        let m2 = try BarrierStream.make(store: f.store, deviceFD: f.fd, deviceBytes: f.deviceBytes, from: 1, to: 3, output: d13, nowUnixSeconds: 0)
        let changed = try f.store.index.changedChunks(from: 1, to: 3)
        #expect(m2.chunks > 0 && m2.chunks <= UInt64(changed.count))
        // Wrong base: the incremental stream on an empty file is refused, and nothing is written.
        let applyFails = { (path: String) -> String in
            do { _ = try BarrierStream.apply(stream: path, to: target); return "" } catch { return "\(error)" }
        }
        #expect(truncate(target, 0) != 0)
        let tfd = open(target, O_RDWR | O_CREAT, 0o600)
        #expect(ftruncate(tfd, off_t(f.deviceBytes)) == 0)
        close(tfd)
        #expect(applyFails(d13).contains("does not hold the base"))
        let zeros = [UInt8](repeating: 0, count: Int(f.deviceBytes))
        #expect(readFile(target) == zeros)
        _ = try BarrierStream.apply(stream: full1, to: target)
        #expect(readFile(target) == f.oracle[1])
        let applied = try BarrierStream.apply(stream: d13, to: target)
        #expect(applied.written == m2.chunks)
        #expect(readFile(target) == f.oracle[3])
        // Again: every chunk is there already.
        #expect(try BarrierStream.apply(stream: d13, to: target).alreadyApplied == m2.chunks)
    }

    /// A diff written a step at a time while writes go on (what a running node does): the
    /// stream is the same as one made at once; a barrier dropped part way stops it, leaving no file.
    @Test func aDiffMadeInStepsWhileWritesGoOn() throws {
        let f = try UndoFixture(seed: 11)
        for _ in 0..<3 {
            try f.barrier()
            for _ in 0..<6 { _ = try f.write() }
        }
        let stepped = "\(f.dir)/stepped.tdiff", atOnce = "\(f.dir)/at-once.tdiff"
        let maker = try DiffMaker(store: f.store, deviceBytes: f.deviceBytes, from: 1, to: 2, output: stepped, nowUnixSeconds: 0, readDevice: f.readDevice)
        while try !maker.step(chunksMax: 1) {
            _ = try f.write()  // saved under barrier 3: the images at 1 and 2 do not move
        }
        try maker.writeTrailer()
        _ = try maker.commit(synced: false)
        _ = try BarrierStream.make(store: f.store, deviceFD: f.fd, deviceBytes: f.deviceBytes, from: 1, to: 2, output: atOnce, nowUnixSeconds: 0)
        #expect(readFile(stepped) == readFile(atOnce))
        let doomed = "\(f.dir)/doomed.tdiff"
        let second = try DiffMaker(store: f.store, deviceBytes: f.deviceBytes, from: 1, to: 3, output: doomed, nowUnixSeconds: 0, readDevice: f.readDevice)
        _ = try second.step(chunksMax: 1)
        try f.store.dropOldest()
        #expect(throws: UndoStoreError.self) { while try !second.step(chunksMax: 1) {} }
        second.abandon()
        #expect(access(doomed + ".partial", F_OK) != 0 && access(doomed, F_OK) != 0)
    }

    func readFile(_ path: String) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        try! bytes.withUnsafeMutableBytes { try BlockFile.read(fd, into: $0, at: 0, path) }
        return bytes
    }
}
