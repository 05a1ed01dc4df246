import CTandem
import Glibc
import TandemCore
import TandemIO

/// A node's metadata file (Protocol/metadata.md): creating it (`tandem init`) and reading it back
/// at attach. Both run before the event loop starts, so plain synchronous I/O is right here.
public enum MetadataFile {
    /// What attach finds on disk.
    public struct Loaded {
        public var superblock: Superblock
        public var bitmap: DirtyBitmap
        public var recovery: ActivityLog.Recovery
    }

    /// Writes fresh metadata: superblock slot A, a blank slot B, a zeroed activity-log ring and
    /// bitmap (the file is created sparse, so zeros cost nothing), then fsyncs the file and its
    /// directory. An existing file is refused unless `force`, and an existing valid superblock
    /// is named in the message so nobody wipes a live node by accident.
    public static func create(path: String, superblock: Superblock, force: Bool) throws(ServeError) {
        if access(path, F_OK) == 0 && !force {
            let what = (try? load(path: path, deviceBytes: nil)).map { "metadata of resource \"\($0.superblock.resourceName)\" node \($0.superblock.nodeID)" } ?? "a file"
            throw ServeError("\(path) already holds \(what); use --force to overwrite it (the node's bitmap and generation history are lost)")
        }
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ServeError("cannot create \(path): \(SystemError.text(errno))") }
        defer { close(fd) }
        let layout = superblock.layout
        guard ftruncate(fd, off_t(layout.totalBytes)) == 0 else { throw ServeError("cannot size \(path): \(SystemError.text(errno))") }
        var block = [UInt8](repeating: 0, count: Superblock.encodedBytes)
        block.withUnsafeMutableBytes { superblock.encode(into: $0) }
        try writeAll(fd, block, at: superblock.offset, path: path)
        guard fsync(fd) == 0 else { throw ServeError("cannot sync \(path): \(SystemError.text(errno))") }
        syncDirectory(of: path)
    }

    /// Reads the newest valid superblock, the bitmap and the activity log's recovery.
    /// `deviceBytes`, when given, must match the superblock's.
    public static func load(path: String, deviceBytes: UInt64?) throws(ServeError) -> Loaded {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ServeError("cannot open metadata \(path): \(SystemError.text(errno))") }
        defer { close(fd) }
        var slots: [Superblock?] = []
        var errors: [String] = []
        for slot in 0..<2 {
            let bytes = try readAll(fd, count: Superblock.encodedBytes, at: UInt64(slot * Superblock.encodedBytes), path: path)
            do {
                slots.append(try bytes.withUnsafeBytes { raw throws(MetadataError) in try Superblock(decoding: raw, slot: slot) })
            } catch {
                slots.append(nil)
                if let error = error as? MetadataError, error == .blank { continue }
                errors.append("slot \(slot == 0 ? "A" : "B"): \(error)")
            }
        }
        guard let superblock = Superblock.newest(slots[0], slots[1]) else {
            throw ServeError("\(path) holds no valid superblock\(errors.isEmpty ? "" : " (\(errors.joined(separator: "; ")))")")
        }
        let layout = superblock.layout
        if let deviceBytes, deviceBytes != layout.deviceBytes {
            throw ServeError("\(path) describes a device of \(layout.deviceBytes) bytes, but the device has \(deviceBytes)")
        }
        var bitmap = DirtyBitmap(deviceBytes: layout.deviceBytes, granularityBytes: layout.granularityBytes)
        // A MiB at a time: the bitmap of a 1 TiB device is 32 MiB, and a second copy of it would
        // double the node's resident peak at start.
        let pagesPerRead = (1 << 20) / MetadataLayout.blockBytes
        var firstPage = 0
        while firstPage < bitmap.pageCount {
            let pages = min(pagesPerRead, bitmap.pageCount - firstPage)
            let at = layout.bitmapOffset + UInt64(firstPage * MetadataLayout.blockBytes)
            let chunk = try readAll(fd, count: pages * MetadataLayout.blockBytes, at: at, path: path)
            chunk.withUnsafeBytes { raw in
                for i in 0..<pages {
                    let start = i * MetadataLayout.blockBytes
                    bitmap.loadPage(firstPage + i, from: UnsafeRawBufferPointer(rebasing: raw[start..<start + MetadataLayout.blockBytes]))
                }
            }
            firstPage += pages
        }
        bitmap.markAllPagesPersisted()
        let ring = try readAll(fd, count: Int(layout.activityLogBytes), at: layout.activityLogOffset, path: path)
        let recovery = ring.withUnsafeBytes { raw in
            ActivityLog.recover(slots: (0..<layout.activityLogSlotCount).map { i in
                UnsafeRawBufferPointer(rebasing: raw[i * MetadataLayout.blockBytes..<(i + 1) * MetadataLayout.blockBytes])
            })
        }
        return Loaded(superblock: superblock, bitmap: bitmap, recovery: recovery)
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], at offset: UInt64, path: String) throws(ServeError) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, $0.count - done, off_t(offset) + off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw ServeError("cannot write \(path): \(SystemError.text(errno))") }
            done += n
        }
    }

    private static func readAll(_ fd: Int32, count: Int, at offset: UInt64, path: String) throws(ServeError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw ServeError("cannot read \(path): \(n == 0 ? "file too short" : SystemError.text(errno))") }
            done += n
        }
        return bytes
    }

    /// A new file's directory entry is durable only once its directory is synced.
    private static func syncDirectory(of path: String) {
        let dir = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let fd = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 {
            _ = fsync(fd)
            close(fd)
        }
    }
}
