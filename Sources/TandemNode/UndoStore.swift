import CTandem
import Glibc
import TandemCore
import TandemIO

/// A failed undo-store or stream operation: one line for the operator, and the errno when a
/// syscall failed (ENOSPC and EDQUOT mean "drop the oldest barrier and go on").
public struct UndoStoreError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public let errno: Int32

    public init(_ message: String, errno: Int32 = 0) {
        self.message = message
        self.errno = errno
    }

    public var description: String { message }

    /// Out of room on the undo store's filesystem.
    public var isNoSpace: Bool { errno == ENOSPC || errno == EDQUOT }
}

/// Positioned, synchronous, whole-buffer I/O (EINTR retried in one place) for the barrier code,
/// which runs off the hot path: at attach, in the offline tools, copy-on-write, export reads and
/// rollback.
public enum BlockFile {
    public static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, _ what: @autoclosure () -> String) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw UndoStoreError("cannot read \(what()): \(SystemError.text(errno))", errno: errno) }
            if n == 0 { throw UndoStoreError("cannot read \(what()): it ends at \(offset + UInt64(done)), before \(offset + UInt64(buffer.count))") }
            done += n
        }
    }

    public static func write(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: UInt64, _ what: @autoclosure () -> String) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw UndoStoreError("cannot write \(what()): \(SystemError.text(errno))", errno: errno) }
            // A short write with no error is the filesystem filling up; the retry reports ENOSPC.
            done += n
        }
    }

    /// `read` from a backing device at any offset and length, through an aligned bounce buffer
    /// (an O_DIRECT device takes only aligned buffers, offsets and lengths).
    public static func read(_ device: BackingDevice, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try bounced(device, at: offset, count: buffer.count, readFirst: true) { bounce, inside, _ in
            buffer.baseAddress!.copyMemory(from: bounce + inside, byteCount: buffer.count)
        }
    }

    /// `write` to a backing device at any offset and length (the partial blocks at either end
    /// are read first).
    public static func write(_ device: BackingDevice, _ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let align = UInt64(max(device.alignment, 512))
        let aligned = offset % align == 0 && UInt64(bytes.count) % align == 0
        try bounced(device, at: offset, count: bytes.count, readFirst: !aligned) { bounce, inside, whole in
            (bounce + inside).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
            try write(device.fd, UnsafeRawBufferPointer(whole), at: offset - UInt64(inside), device.path)
        }
    }

    private static func bounced(_ device: BackingDevice, at offset: UInt64, count: Int, readFirst: Bool,
                                _ body: (UnsafeMutableRawPointer, Int, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        let align = UInt64(max(device.alignment, 512))
        let start = offset / align * align
        let end = (offset + UInt64(count) + align - 1) / align * align
        let bytes = Int(end - start)
        let bounce = allocateAligned(bytes)
        defer { freeAligned(bounce, bytes) }
        let whole = UnsafeMutableRawBufferPointer(start: bounce, count: bytes)
        // A read serves a read, and keeps the edges of a write that does not cover whole blocks.
        if readFirst { try read(device.fd, into: whole, at: start, device.path) }
        try body(bounce, Int(offset - start), whole)
    }

    static func dataSync(_ fd: Int32, _ what: @autoclosure () -> String) throws {
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw UndoStoreError("cannot sync \(what()): \(SystemError.text(errno))", errno: errno)
        }
    }

    static func size(_ fd: Int32, _ what: @autoclosure () -> String) throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw UndoStoreError("cannot stat \(what()): \(SystemError.text(errno))", errno: errno) }
        return UInt64(st.st_size)
    }

    /// Makes a directory's entries (a created or unlinked file) durable.
    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw UndoStoreError("cannot open directory \(path): \(SystemError.text(errno))", errno: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw UndoStoreError("cannot sync directory \(path): \(SystemError.text(errno))", errno: errno) }
    }
}

/// A secondary's undo store (Protocol/barriers.md "Undo store"): a directory with one append-only
/// segment file per retained barrier, `<id, 20 digits>.undo`, and while a rollback runs a
/// `rollback` marker. The bookkeeping is `UndoIndex`; this class does the file I/O in the order
/// the spec gives and keeps the index in step.
///
/// Write path (the node, for every write, trim or zeroes it applies, replicated or resync):
/// `chunksToSave`, read each chunk's current content from the device, `append` it, `sync` once for
/// the batch, and only then overwrite the device. `save(offset:length:readDevice:)` does all but
/// the overwrite for synchronous callers.
///
/// Retention and space never stall the write path: `append` drops the oldest barriers (with
/// their reasons in the result, for a log line) until the record fits, by policy or because the
/// filesystem is full; when even the newest has to go, nothing needs saving any more.
public final class UndoStore {
    public let directory: String
    public let readOnly: Bool
    public private(set) var index: UndoIndex
    public var retention: BarrierRetention
    /// What recovery found and did at open, one line each (the node logs them).
    public private(set) var recoveryLog: [String] = []
    /// A rollback that began and did not finish: the node must run `rollback(to:)` again before
    /// it uses the device (nil normally).
    public private(set) var pendingRollback: UInt64?

    /// Open segment files by barrier id (read-write for the newest, read-only when `readOnly`).
    private var files: [UInt64: Int32] = [:]
    private var newestUnsynced = false
    /// The open synced the newest segment's recovered records (for tests).
    private(set) var recoveredRecordsSynced = false
    /// Bytes of the newest segment file: its records, then zeros written ahead for the next ones.
    private var allocatedEnd: UInt64 = 0
    /// Zeros to write ahead with, allocated at the first preallocation.
    private var zeros: UnsafeMutableRawPointer?
    private static let zerosBytes = 1 << 20
    /// Scratch for record headers, reused.
    private var headerBytes = [UInt8](repeating: 0, count: UndoRecordHeader.encodedBytes)

    public var geometry: UndoGeometry { index.geometry }

    static let markerName = "rollback"

    static func segmentName(_ id: UInt64) -> String {
        let digits = String(id)
        return String(repeating: "0", count: 20 - digits.count) + digits + ".undo"
    }

    func segmentPath(_ id: UInt64) -> String { "\(directory)/\(Self.segmentName(id))" }

    /// Opens (creating it unless `readOnly`) the undo directory of a device of `deviceBytes`, and
    /// recovers it: torn record tails are truncated, a segment whose header never became durable
    /// is removed, a broken chain drops the barriers older than the break. `chunkBytes` nil takes
    /// the segments' (or the default for an empty store). Read-only opens change nothing on disk.
    public init(directory: String, deviceBytes: UInt64, chunkBytes: Int? = nil, readOnly: Bool = false,
                retention: BarrierRetention = BarrierRetention()) throws {
        self.directory = directory
        self.readOnly = readOnly
        self.retention = retention
        if !readOnly && mkdir(directory, 0o700) != 0 && errno != EEXIST {
            throw UndoStoreError("cannot create undo directory \(directory): \(SystemError.text(errno))", errno: errno)
        }
        let ids = try Self.listSegments(directory)
        var scans: [(UInt64, UndoSegmentScan, Int32)] = []
        // Until the index owns them, the descriptors are closed here if recovery gives up.
        var recovered = false
        defer { if !recovered { for (_, _, fd) in scans { close(fd) } } }
        let defaultGeometry: UndoGeometry
        do { defaultGeometry = try UndoGeometry(deviceBytes: deviceBytes, chunkBytes: chunkBytes ?? Limits.undoChunkBytesDefault) } catch {
            throw UndoStoreError("undo store \(directory): \(error)")
        }
        var geometry: UndoGeometry? = chunkBytes == nil ? nil : defaultGeometry
        var log: [String] = []
        for (position, id) in ids.enumerated() {
            let path = "\(directory)/\(Self.segmentName(id))"
            let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
            guard fd >= 0 else { throw UndoStoreError("cannot open \(path): \(SystemError.text(errno))", errno: errno) }
            var scan = UndoSegmentScan(fileBytes: try BlockFile.size(fd, path))
            var buffer = [UInt8]()
            while let want = scan.next {
                if buffer.count < want.count { buffer = [UInt8](repeating: 0, count: want.count) }
                try buffer.withUnsafeMutableBytes { raw in
                    try BlockFile.read(fd, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<want.count]), at: want.offset, path)
                }
                buffer.withUnsafeBytes { scan.feed(UnsafeRawBufferPointer(rebasing: $0[0..<want.count])) }
            }
            if case .badHeader(let why) = scan.outcome {
                close(fd)
                if position == ids.count - 1 {
                    // Creation writes and syncs the header before the barrier counts: a newest
                    // segment without one was never a barrier.
                    log.append("removed \(path): unfinished barrier creation (\(why))")
                    if !readOnly { unlink(path) }
                    continue
                }
                throw UndoStoreError("\(path): damaged segment header (\(why)); move the file away to drop barrier \(id) and every older one")
            }
            let header = scan.header!
            guard header.barrier.id == id else {
                close(fd)
                throw UndoStoreError("\(path) holds barrier \(header.barrier.id), not \(id)")
            }
            guard header.geometry.deviceBytes == deviceBytes, geometry == nil || header.geometry == geometry else {
                close(fd)
                throw UndoStoreError("\(path) was saved for a device of \(header.geometry.deviceBytes) bytes in \(header.geometry.chunkBytes)-byte chunks, not this one (\(deviceBytes) bytes)")
            }
            geometry = header.geometry
            if scan.outcome == .zeroTail && !readOnly {
                // Space written ahead for records (a node that stopped keeps some): cut, quietly.
                guard ftruncate(fd, off_t(scan.validBytes)) == 0 else {
                    close(fd)
                    throw UndoStoreError("cannot truncate \(path): \(SystemError.text(errno))", errno: errno)
                }
            }
            if case .torn(let why) = scan.outcome {
                log.append("barrier \(id): cut \(scan.fileBytes - scan.validBytes) bytes of a torn record at \(scan.validBytes) (\(why))")
                if !readOnly {
                    guard ftruncate(fd, off_t(scan.validBytes)) == 0 else {
                        close(fd)
                        throw UndoStoreError("cannot truncate \(path): \(SystemError.text(errno))", errno: errno)
                    }
                    try BlockFile.dataSync(fd, path)
                }
            }
            scans.append((id, scan, fd))
        }
        index = UndoIndex(geometry: geometry ?? defaultGeometry)
        // A segment names its predecessor: a missing one in the middle breaks every older image.
        var start = 0
        for i in 1..<max(scans.count, 1) where scans[i].1.header!.previousID != scans[i - 1].0 {
            start = i
        }
        for (id, _, fd) in scans[0..<start] {
            log.append("dropped barrier \(id): a newer barrier's segment is missing, so its image cannot be rebuilt")
            close(fd)
            if !readOnly { unlink(segmentPath(id)) }
        }
        recovered = true
        for (id, scan, fd) in scans[start...] {
            do {
                try index.addRecovered(scan.header!, records: scan.records, bytes: scan.validBytes)
            } catch {
                throw UndoStoreError("undo store \(directory): barrier \(id): \(error)")
            }
            files[id] = fd
        }
        if let marker = try? readTextFile("\(directory)/\(Self.markerName)", maxBytes: 64),
           let id = UInt64(marker.filter(\.isNumber)) {
            pendingRollback = id
            log.append("a rollback to barrier \(id) did not finish; it must be run again")
        }
        if !readOnly && !log.isEmpty { try BlockFile.syncDirectory(directory) }
        recoveryLog = log
        allocatedEnd = index.newest.map { index.bytesHeld($0.id)! } ?? 0
        if !readOnly, let newest = index.newest, let fd = files[newest.id] {
            // The newest segment's records were read back, so the index counts their chunks
            // saved and writes to them go to the device without a save (or a sync). After a
            // killed process they may be in the page cache only (appended, the sync not yet
            // done): a power loss after such a write, made durable on the device, would take
            // the record and leave the barrier's image wrong. Synced here, before any write.
            // (Older segments were synced when the next barrier was created.)
            try BlockFile.dataSync(fd, segmentPath(newest.id))
            recoveredRecordsSynced = true
        }
    }

    deinit {
        for fd in files.values { close(fd) }
        if let zeros { freeAligned(zeros, Self.zerosBytes) }
    }

    /// The device size the store's newest readable segment was saved for (nil: no segment), so
    /// tools can open a store without being told the device.
    public static func recordedDeviceBytes(directory: String) -> UInt64? {
        guard let ids = try? listSegments(directory) else { return nil }
        for id in ids.reversed() {
            let fd = open("\(directory)/\(segmentName(id))", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            var bytes = [UInt8](repeating: 0, count: UndoSegmentHeader.encodedBytes)
            guard (try? bytes.withUnsafeMutableBytes { try BlockFile.read(fd, into: $0, at: 0, "") }) != nil,
                  let header = bytes.withUnsafeBytes({ try? UndoSegmentHeader(decoding: $0) })
            else { continue }
            return header.geometry.deviceBytes
        }
        return nil
    }

    /// Barrier ids with a segment file, ascending.
    private static func listSegments(_ directory: String) throws -> [UInt64] {
        guard let dir = opendir(directory) else {
            throw UndoStoreError("cannot open undo directory \(directory): \(SystemError.text(errno))", errno: errno)
        }
        defer { closedir(dir) }
        var ids: [UInt64] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard name.hasSuffix(".undo"), name.count == 25, let id = UInt64(name.prefix(20)), id > 0 else { continue }
            ids.append(id)
        }
        return ids.sorted()
    }

    // MARK: Barriers

    /// Retained barriers, oldest first, with the bytes each holds.
    public var barriers: [(info: BarrierInfo, bytesHeld: UInt64)] {
        index.barriers.map { ($0, index.bytesHeld($0.id)!) }
    }

    /// Records barrier `info` (id above every retained one): its segment header is written and
    /// synced, with the directory, before it counts, so a crash leaves it whole or absent. Drops
    /// the oldest barriers the retention policy asks for first (returned for the log).
    @discardableResult
    public func createBarrier(_ info: BarrierInfo, nowUnixSeconds: Int64) throws -> [(BarrierInfo, BarrierRetention.Reason)] {
        precondition(!readOnly, "createBarrier on a read-only store")
        do { try info.validate() } catch { throw UndoStoreError("barrier \(info.id): \(error)") }
        guard info.id > index.newestID else { throw UndoStoreError("barrier \(info.id) is not newer than barrier \(index.newestID)") }
        // Records of the previous barrier must be durable before its epoch closes.
        try sync()
        let dropped = retention.drops(index, nowUnixSeconds: nowUnixSeconds, extraBarriers: 1)
        for _ in dropped { try dropOldest() }
        if let previous = index.newest, let fd = files[previous.id] {
            // Its zeros written ahead are no use any more: the file holds just its records.
            _ = ftruncate(fd, off_t(index.bytesHeld(previous.id)!))
        }
        let header = UndoSegmentHeader(barrier: info, geometry: geometry, previousID: index.newestID)
        let path = segmentPath(info.id)
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw UndoStoreError("cannot create \(path): \(SystemError.text(errno))", errno: errno) }
        do {
            try header.encoded.withUnsafeBytes { raw in try BlockFile.write(fd, raw, at: 0, path) }
            try BlockFile.dataSync(fd, path)
            try BlockFile.syncDirectory(directory)
            try index.addBarrier(info)
        } catch {
            close(fd)
            unlink(path)
            throw UndoStoreError("\(error)", errno: (error as? UndoStoreError)?.errno ?? 0)
        }
        files[info.id] = fd
        allocatedEnd = UInt64(UndoSegmentHeader.encodedBytes)
        return dropped
    }

    /// Drops the oldest barrier: forgets it and unlinks its segment.
    @discardableResult
    public func dropOldest() throws -> BarrierInfo {
        precondition(!readOnly)
        let gone = index.dropOldest()
        try removeSegment(gone.id)
        return gone
    }

    /// Drops every barrier (the undo store failed in a way dropping the oldest cannot fix, or the
    /// operator asked): the device is then protected by nothing, and nothing slows writes.
    public func dropAll() throws {
        while !index.isEmpty { try dropOldest() }
    }

    private func removeSegment(_ id: UInt64) throws {
        if let fd = files.removeValue(forKey: id) { close(fd) }
        let path = segmentPath(id)
        guard unlink(path) == 0 || errno == ENOENT else { throw UndoStoreError("cannot remove \(path): \(SystemError.text(errno))", errno: errno) }
        try BlockFile.syncDirectory(directory)
    }

    /// Applies the retention policy now (age limits expire without writes; the node calls this
    /// from a timer). Returns what it dropped.
    @discardableResult
    public func applyRetention(nowUnixSeconds: Int64) throws -> [(BarrierInfo, BarrierRetention.Reason)] {
        let dropped = retention.drops(index, nowUnixSeconds: nowUnixSeconds)
        for _ in dropped { try dropOldest() }
        return dropped
    }

    // MARK: The write path

    /// The chunks a write of `[offset, offset + length)` must save first (see `UndoIndex`).
    public func chunksToSave(offset: UInt64, length: UInt64, into chunks: inout [UInt64]) {
        index.chunksToSave(offset: offset, length: length, into: &chunks)
    }

    /// Appends chunk `chunk`'s current content `data` (read from the device) as a record of the
    /// newest barrier. Not durable until `sync`. Drops the oldest barriers the policy or a full
    /// filesystem require first; if that leaves no barrier, nothing is appended.
    @discardableResult
    public func append(chunk: UInt64, data: UnsafeRawBufferPointer, nowUnixSeconds: Int64) throws -> [(BarrierInfo, BarrierRetention.Reason)] {
        precondition(!readOnly)
        precondition(data.count == geometry.length(ofChunk: chunk))
        let recordBytes = UInt64(UndoRecordHeader.encodedBytes + data.count)
        var dropped: [(BarrierInfo, BarrierRetention.Reason)] = []
        for drop in retention.drops(index, nowUnixSeconds: nowUnixSeconds, extraRecords: 1, extraRecordBytes: recordBytes) {
            try dropOldest()
            dropped.append(drop)
        }
        while let newest = index.newest {
            guard index.needsSave(chunk: chunk) else { return dropped }
            let fd = files[newest.id]!
            let end = index.bytesHeld(newest.id)!
            let crc = CRC32C.checksum(data)
            let path = segmentPath(newest.id)
            headerBytes.withUnsafeMutableBytes {
                UndoRecordHeader(chunk: chunk, dataBytes: data.count, dataChecksum: crc, barrierID: newest.id).encode(into: $0)
            }
            if end + recordBytes > allocatedEnd { preallocate(fd, path, end: end, recordBytes: recordBytes) }
            do {
                try headerBytes.withUnsafeBytes { raw in try BlockFile.write(fd, raw, at: end, path) }
                try BlockFile.write(fd, data, at: end + UInt64(UndoRecordHeader.encodedBytes), path)
            } catch let error as UndoStoreError {
                // Leave no partial record behind: recovery would cut it, but a later append
                // would land after it.
                _ = ftruncate(fd, off_t(end))
                allocatedEnd = end
                guard error.isNoSpace else { throw error }
                // The filesystem is full: the oldest barrier gives its space (maybe the newest
                // itself, and then this chunk needs no saving).
                dropped.append((try dropOldest(), .space))
                continue
            }
            index.addRecord(UndoRecordLocation(chunk: chunk, dataOffset: end + UInt64(UndoRecordHeader.encodedBytes),
                                               dataBytes: data.count, dataChecksum: crc))
            newestUnsynced = true
            return dropped
        }
        return dropped
    }

    /// The newest segment's descriptor (nil: no barrier), for a caller that syncs the records
    /// itself, off the loop (on a duplicate: retention may close this one meanwhile).
    public var newestSegmentDescriptor: Int32? { index.newest.flatMap { files[$0.id] } }

    /// Writes zeros ahead of the newest segment's records (`Limits.undoPreallocateBytes` at a
    /// time), so a record lands on blocks the file already has and the sync after it flushes data
    /// only: growing the file costs a filesystem journal commit in every `fdatasync` (on ext4
    /// about 290 µs against 165 µs), which is what bounds copy-on-write. Recovery reads the zeros
    /// as the end of the records (`zeroTail`). Best effort: on an error (a full filesystem) the
    /// file is cut back and the record extends it, as without.
    private func preallocate(_ fd: Int32, _ path: String, end: UInt64, recordBytes: UInt64) {
        if zeros == nil { zeros = allocateAligned(Self.zerosBytes) }
        let block = UInt64(Limits.blockSize)
        let target = (end + recordBytes + UInt64(Limits.undoPreallocateBytes) + block - 1) / block * block
        var at = max(allocatedEnd, end)
        do {
            while at < target {
                let n = Int(min(UInt64(Self.zerosBytes), target - at))
                try BlockFile.write(fd, UnsafeRawBufferPointer(start: zeros, count: n), at: at, path)
                at += UInt64(n)
            }
            allocatedEnd = target
        } catch {
            _ = ftruncate(fd, off_t(end))
            allocatedEnd = end
        }
    }

    /// Makes every appended record durable (one fdatasync of the newest segment): the node calls
    /// it once per batch, before the device writes the records protect.
    public func sync() throws {
        guard newestUnsynced, let newest = index.newest else { return }
        try BlockFile.dataSync(files[newest.id]!, segmentPath(newest.id))
        newestUnsynced = false
    }

    /// Saves, durably, every chunk a write of `[offset, offset + length)` would overwrite for the
    /// first time since the newest barrier; `readDevice(offset, buffer)` fills a buffer with the
    /// device's current bytes. After it returns the write may go to the device.
    @discardableResult
    public func save(offset: UInt64, length: UInt64, nowUnixSeconds: Int64, sync: Bool = true,
                     readDevice: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws -> [(BarrierInfo, BarrierRetention.Reason)] {
        var chunks: [UInt64] = []
        chunksToSave(offset: offset, length: length, into: &chunks)
        guard !chunks.isEmpty else { return [] }
        var dropped: [(BarrierInfo, BarrierRetention.Reason)] = []
        var buffer = [UInt8](repeating: 0, count: geometry.chunkBytes)
        for chunk in chunks {
            let count = geometry.length(ofChunk: chunk)
            try buffer.withUnsafeMutableBytes { raw in
                let slice = UnsafeMutableRawBufferPointer(rebasing: raw[0..<count])
                try readDevice(geometry.offset(ofChunk: chunk), slice)
                dropped += try append(chunk: chunk, data: UnsafeRawBufferPointer(slice), nowUnixSeconds: nowUnixSeconds)
            }
        }
        // `sync: false`: the caller syncs once for a batch of saves (group commit) before any of
        // their writes reaches the device.
        if sync { try self.sync() }
        return dropped
    }

    // MARK: Reading

    /// Reads the data of `record` in barrier `barrierID`'s segment into `buffer` (exactly its
    /// length) and checks its checksum: a damaged record is an error, never returned as data.
    public func readRecord(_ record: UndoRecordLocation, of barrierID: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        precondition(buffer.count == record.dataBytes)
        guard let fd = files[barrierID] else { throw UndoStoreError("barrier \(barrierID) is not retained") }
        try BlockFile.read(fd, into: buffer, at: record.dataOffset, segmentPath(barrierID))
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(buffer))
        guard crc == record.dataChecksum else {
            throw UndoStoreError("\(segmentPath(barrierID)): the saved chunk \(record.chunk) is damaged (checksum mismatch)", errno: EIO)
        }
    }

    /// Reads `[offset, offset + buffer.count)` of the image at barrier `id` into `buffer`: saved
    /// chunks from their records (checked), the rest through `readDevice`.
    public func readImage(at id: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                          readDevice: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard index.contains(id) else { throw UndoStoreError("no barrier \(id) is retained") }
        var pieces: [ImagePiece] = []
        index.readPlan(at: id, offset: offset, length: UInt64(buffer.count), into: &pieces)
        var at = 0
        var chunk = [UInt8]()
        for piece in pieces {
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + piece.length])
            switch piece.source {
            case .device(let from):
                try readDevice(from, target)
            case .record(let barrierID, let fileOffset, let record):
                if chunk.count < record.dataBytes { chunk = [UInt8](repeating: 0, count: record.dataBytes) }
                try chunk.withUnsafeMutableBytes { raw in
                    try readRecord(record, of: barrierID, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<record.dataBytes]))
                }
                let inside = Int(fileOffset - record.dataOffset)
                chunk.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inside..<inside + piece.length])) }
            }
            at += piece.length
        }
    }

    // MARK: Rollback

    /// Starts a rollback to barrier `id`: the marker is made durable first, so a crash part way
    /// leaves a store that says so (`pendingRollback`) instead of barriers whose images no longer
    /// match the device. Returns the plan: write each restore to the device, sync the device,
    /// then `finishRollback`.
    public func beginRollback(to id: UInt64) throws -> RollbackPlan {
        precondition(!readOnly)
        let plan: RollbackPlan
        do { plan = try index.rollbackPlan(to: id) } catch { throw UndoStoreError("\(error)") }
        try sync()
        let path = "\(directory)/\(Self.markerName)"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw UndoStoreError("cannot create \(path): \(SystemError.text(errno))", errno: errno) }
        defer { close(fd) }
        try Array("\(id)\n".utf8).withUnsafeBytes { raw in try BlockFile.write(fd, raw, at: 0, path) }
        try BlockFile.dataSync(fd, path)
        try BlockFile.syncDirectory(directory)
        pendingRollback = id
        return plan
    }

    /// Ends a rollback whose restores are on the device, durably: barriers newer than `id` go
    /// (newest first), `id`'s records go (the device is its image again), then the marker.
    public func finishRollback(to id: UInt64) throws {
        precondition(pendingRollback == id, "finishRollback without beginRollback")
        while let newest = index.newest, newest.id > id {
            index.dropNewest()
            try removeSegment(newest.id)
        }
        let fd = files[id]!
        guard ftruncate(fd, off_t(UndoSegmentHeader.encodedBytes)) == 0 else {
            throw UndoStoreError("cannot truncate \(segmentPath(id)): \(SystemError.text(errno))", errno: errno)
        }
        try BlockFile.dataSync(fd, segmentPath(id))
        index.clearRecords(of: id)
        newestUnsynced = false
        allocatedEnd = UInt64(UndoSegmentHeader.encodedBytes)
        let path = "\(directory)/\(Self.markerName)"
        guard unlink(path) == 0 || errno == ENOENT else { throw UndoStoreError("cannot remove \(path): \(SystemError.text(errno))", errno: errno) }
        try BlockFile.syncDirectory(directory)
        pendingRollback = nil
    }

    /// A whole rollback for synchronous callers (offline tool, tests): begin, write every restore
    /// through `writeDevice`, `syncDevice`, finish. Safe to run again after a crash.
    public func rollback(to id: UInt64, writeDevice: (UInt64, UnsafeRawBufferPointer) throws -> Void,
                         syncDevice: () throws -> Void) throws -> RollbackPlan {
        let plan = try beginRollback(to: id)
        var buffer = [UInt8](repeating: 0, count: geometry.chunkBytes)
        for restore in plan.restores {
            try buffer.withUnsafeMutableBytes { raw in
                let data = UnsafeMutableRawBufferPointer(rebasing: raw[0..<restore.record.dataBytes])
                try readRecord(restore.record, of: restore.barrierID, into: data)
                try writeDevice(geometry.offset(ofChunk: restore.chunk), UnsafeRawBufferPointer(data))
            }
        }
        try syncDevice()
        try finishRollback(to: id)
        return plan
    }
}
