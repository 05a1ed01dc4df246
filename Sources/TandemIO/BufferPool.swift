import CTandem
import Glibc
import TandemCore

/// One buffer of the pool: page-aligned, `capacity` bytes, handed back with `BufferPool.release`.
public struct PoolBuffer: Equatable {
    public let pointer: UnsafeMutableRawPointer
    public let capacity: Int
    /// Size class; also the io_uring registered-buffer index when `registered`.
    public let sizeClass: Int32
    public let registered: Bool

    /// The registered-buffer index for READ_FIXED/WRITE_FIXED, or -1.
    public var fixedIndex: Int32 { registered ? sizeClass : -1 }
}

/// Aligned I/O buffers allocated once at start, in power-of-two size classes from 4 KiB to the
/// largest request. Nothing is allocated per request: a request takes the smallest free buffer
/// that fits and gives it back when its reply is sent. An empty class is back-pressure (the
/// connection stops reading requests until a buffer returns), never an allocation.
///
/// The small classes are registered with io_uring (READ_FIXED/WRITE_FIXED skip pinning pages on
/// every I/O, which matters at 4 KiB); large ones are not, since registration pins them resident.
public final class BufferPool {
    public struct SizeClass: Sendable {
        public let bytes: Int
        public let count: Int
    }

    /// The default layout: many small buffers for deep 4 KiB queues, a few large ones.
    public static let defaultClasses: [SizeClass] = [
        .init(bytes: 4 << 10, count: 512), .init(bytes: 8 << 10, count: 128),
        .init(bytes: 16 << 10, count: 64), .init(bytes: 32 << 10, count: 64),
        .init(bytes: 64 << 10, count: 64), .init(bytes: 128 << 10, count: 32),
        .init(bytes: 256 << 10, count: 32), .init(bytes: 512 << 10, count: 32),
        .init(bytes: 1 << 20, count: 48), .init(bytes: 2 << 20, count: 16),
        .init(bytes: 4 << 20, count: 8), .init(bytes: 8 << 20, count: 4),
        .init(bytes: 16 << 20, count: 2), .init(bytes: 32 << 20, count: 2),
    ]
    /// The default layout for one of `loops` event loops that share a server's connections
    /// (`tandem serve --loops`): each class's count divided among them, at least one buffer of
    /// each size, so the loops together hold and pin about what one loop does alone (the
    /// registered classes are pinned at start).
    public static func classes(sharedBy loops: Int) -> [SizeClass] {
        precondition(loops >= 1)
        return defaultClasses.map { .init(bytes: $0.bytes, count: max(1, ($0.count + loops - 1) / loops)) }
    }

    /// Classes up to this size are registered with io_uring.
    public static let registeredBytesMax = 256 << 10

    private struct Region {
        let base: UnsafeMutableRawPointer
        let bytesPerBuffer: Int
        let count: Int
        var free: [Int32]
    }

    private var regions: [Region]
    public let largestBuffer: Int
    public private(set) var registeredWithRing = false

    public init(classes: [SizeClass] = BufferPool.defaultClasses) {
        precondition(!classes.isEmpty)
        var regions: [Region] = []
        for (i, c) in classes.enumerated() {
            precondition(c.bytes.nonzeroBitCount == 1 && c.bytes >= 4096 && c.count > 0)
            precondition(i == 0 || c.bytes > classes[i - 1].bytes, "classes ascend")
            let base = allocateAligned(c.bytes * c.count)
            if c.bytes > Self.registeredBytesMax {
                // Transparent huge pages for the large classes, which are not registered: pinning
                // a 1 MiB O_DIRECT buffer per I/O walks 256 small pages (gup was 4-5% of a node
                // at 1 MiB writes) and copying into it misses the TLB. Pages still come on first
                // touch, so what is never used stays unbacked.
                _ = madvise(base, c.bytes * c.count, MADV_HUGEPAGE)
            }
            regions.append(Region(base: base, bytesPerBuffer: c.bytes, count: c.count, free: (0..<Int32(c.count)).reversed()))
        }
        self.regions = regions
        self.largestBuffer = classes.last!.bytes
        precondition(largestBuffer >= Limits.nbdRequestBytesMax, "the pool must hold the largest request")
    }

    deinit {
        for r in regions { freeAligned(r.base, r.bytesPerBuffer * r.count) }
    }

    /// The iovecs to register with io_uring: one per registered class (index = class).
    func registrationIOVecs() -> [iovec] {
        var out: [iovec] = []
        for r in regions where r.bytesPerBuffer <= Self.registeredBytesMax {
            out.append(iovec(iov_base: r.base, iov_len: r.bytesPerBuffer * r.count))
        }
        return out
    }

    public func markRegistered() { registeredWithRing = true }

    /// The smallest free buffer of at least `bytes`, looking up to two classes larger when the
    /// best class is empty; nil when none is free (back-pressure).
    @inline(__always)
    public func take(_ bytes: Int) -> PoolBuffer? {
        precondition(bytes > 0 && bytes <= largestBuffer)
        var index = 0
        while regions[index].bytesPerBuffer < bytes { index += 1 }
        let last = min(index + 2, regions.count - 1)
        while index <= last {
            if let slot = regions[index].free.popLast() {
                let r = regions[index]
                return PoolBuffer(
                    pointer: r.base + Int(slot) * r.bytesPerBuffer, capacity: r.bytesPerBuffer,
                    sizeClass: Int32(index), registered: registeredWithRing && r.bytesPerBuffer <= Self.registeredBytesMax)
            }
            index += 1
        }
        return nil
    }

    @inline(__always)
    public func release(_ buffer: PoolBuffer) {
        let index = Int(buffer.sizeClass)
        let r = regions[index]
        let slot = (buffer.pointer - r.base) / r.bytesPerBuffer
        precondition(slot >= 0 && slot < r.count && buffer.pointer == r.base + slot * r.bytesPerBuffer, "foreign buffer")
        assert(!regions[index].free.contains(Int32(slot)), "double release")
        regions[index].free.append(Int32(slot))
    }

    /// Free buffers per class (for status and tests).
    public var freeCounts: [Int] { regions.map { $0.free.count } }
}
