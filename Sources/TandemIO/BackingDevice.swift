import CTandem
import Glibc
import TandemCore

/// How data moves between Tandem and the backing device.
///
/// - `direct` (O_DIRECT): data goes straight to the device, no double caching in the page cache,
///   latency is the device's and memory use is bounded by Tandem's own buffers. Reads never hit a
///   cache, so a re-read costs a device read; requests must be aligned to the device's logical
///   block (advertised as the NBD minimum block size). The default, as for qemu-nbd `cache=none`.
/// - `page`: through the page cache. Writes finish at memory speed and re-reads are cached, but
///   data waits in RAM until FLUSH/FUA (or writeback) and the cache competes with the VMs using the
///   disk. Any alignment works.
/// FLUSH (fdatasync) and FUA (RWF_DSYNC) are honoured in both modes.
public enum CacheMode: String, Sendable, CaseIterable {
    case direct
    case page
}

public struct BackingError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public var description: String { message }
}

/// The backing file or block device of a node, opened for the I/O engine.
public final class BackingDevice {
    public let path: String
    public let fd: Int32
    public let size: UInt64
    public let isBlockDevice: Bool
    public let cache: CacheMode
    public let readOnly: Bool
    /// Alignment requests must keep (the logical block size with O_DIRECT, 1 otherwise).
    public let alignment: UInt32
    /// Whether SEEK_DATA/SEEK_HOLE report allocation (files on most filesystems).
    public let reportsHoles: Bool

    public static func open(path: String, readOnly: Bool, cache: CacheMode) throws(BackingError) -> BackingDevice {
        var st = stat()
        if stat(path, &st) != 0 {
            let err = errno
            if err == ENOENT { throw BackingError(message: "backing device \(path) does not exist") }
            throw BackingError(message: "cannot stat backing device \(path): \(SystemError.text(err))")
        }
        let mode = st.st_mode & S_IFMT
        let isBlock = mode == S_IFBLK
        guard isBlock || mode == S_IFREG else {
            throw BackingError(message: "backing device \(path) is neither a regular file nor a block device")
        }
        var flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if cache == .direct { flags |= ctandem_O_DIRECT }
        let fd = Glibc.open(path, flags)
        if fd < 0 {
            let err = errno
            if err == EINVAL && cache == .direct {
                throw BackingError(message: "the filesystem of \(path) does not support O_DIRECT (tmpfs?); use --cache page")
            }
            throw BackingError(message: "cannot open backing device \(path): \(SystemError.text(err))")
        }
        var size = UInt64(st.st_size)
        if isBlock {
            let s = ctandem_blockdev_size(fd)
            if s < 0 {
                close(fd)
                throw BackingError(message: "cannot read the size of \(path): \(SystemError.text(Int32(-s)))")
            }
            size = UInt64(s)
        }
        if size == 0 {
            close(fd)
            throw BackingError(message: "backing device \(path) is empty (size 0)")
        }
        if size % UInt64(Limits.blockSize) != 0 {
            close(fd)
            throw BackingError(message: "backing device \(path) is \(size) bytes, not a multiple of the \(Limits.blockSize)-byte block size")
        }
        var alignment: UInt32 = 1
        if cache == .direct {
            alignment = Self.probeDirectAlignment(fd: fd, isBlockDevice: isBlock)
        }
        let holes = !isBlock && ctandem_seek_data(fd, 0) != -Int64(EINVAL)
        return BackingDevice(path: path, fd: fd, size: size, isBlockDevice: isBlock, cache: cache, readOnly: readOnly, alignment: alignment, reportsHoles: holes)
    }

    private init(path: String, fd: Int32, size: UInt64, isBlockDevice: Bool, cache: CacheMode, readOnly: Bool, alignment: UInt32, reportsHoles: Bool) {
        self.path = path
        self.fd = fd
        self.size = size
        self.isBlockDevice = isBlockDevice
        self.cache = cache
        self.readOnly = readOnly
        self.alignment = alignment
        self.reportsHoles = reportsHoles
    }

    deinit { close(fd) }

    /// The smallest O_DIRECT transfer the device takes: its logical block size for block devices;
    /// for files, whether a 512-byte read is accepted (else 4096).
    private static func probeDirectAlignment(fd: Int32, isBlockDevice: Bool) -> UInt32 {
        if isBlockDevice {
            let n = ctandem_blockdev_logical_block_size(fd)
            return n > 0 ? UInt32(n) : 4096
        }
        let buffer = allocateAligned(4096)
        defer { freeAligned(buffer, 4096) }
        let n = ctandem_pread(fd, buffer, 512, 0)
        return n >= 0 ? 512 : 4096
    }

    /// Allocation of `[offset, offset + length)`: runs of (length, isHole), at most `max`.
    /// Files report holes through SEEK_DATA/SEEK_HOLE; block devices are all data.
    public func allocationRuns(offset: UInt64, length: UInt64, max: Int, into runs: inout [(length: UInt32, flags: UInt32)]) {
        runs.removeAll(keepingCapacity: true)
        let end = offset + length
        guard reportsHoles else {
            runs.append((UInt32(min(length, UInt64(UInt32.max) & ~4095)), 0))
            return
        }
        var at = offset
        while at < end && runs.count < max {
            let data = ctandem_seek_data(fd, Int64(at))
            let hole = UInt64(data == -Int64(ENXIO) ? Int64(end) : (data < 0 ? Int64(at) : data))
            if hole > at {
                // A hole (reads as zeros) from `at` up to the next data.
                let runEnd = Swift.min(hole, end)
                appendRun(&runs, runEnd - at, NBDStateHoleZero)
                at = runEnd
                continue
            }
            let nextHole = ctandem_seek_hole(fd, Int64(at))
            let dataEnd = nextHole < 0 ? end : Swift.min(UInt64(nextHole), end)
            appendRun(&runs, Swift.max(dataEnd - at, 1), 0)
            at += Swift.max(dataEnd - at, 1)
        }
    }

    private func appendRun(_ runs: inout [(length: UInt32, flags: UInt32)], _ length: UInt64, _ flags: UInt32) {
        // Runs longer than 4 GiB split; the extent length field is 32 bits.
        var left = length
        while left > 0 {
            let piece = Swift.min(left, UInt64(UInt32.max) & ~4095)
            runs.append((UInt32(piece), flags))
            left -= piece
        }
    }
}

/// base:allocation flags for a hole: NBD_STATE_HOLE | NBD_STATE_ZERO.
let NBDStateHoleZero: UInt32 = 3
