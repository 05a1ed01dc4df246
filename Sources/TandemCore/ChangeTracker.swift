/// Changed-block tracking on the node that creates barriers (Protocol/barriers.md "Changed-block
/// tracking"): for every barrier it tracks, which granules of the device were written since.
///
/// One `UInt16` per granule, the **stamp**: the sequence number of the newest tracked barrier when
/// the granule was last written (0: before the first). Barrier B gets sequence s(B), one more than
/// the previous barrier's, so a granule changed since B exactly when its stamp ≥ s(B):
///
/// ```
/// write g1   barrier B1 (s=1)   write g2 (stamp 1)   barrier B2 (s=2)   write g3 (stamp 2)
/// since B1: g2, g3 (stamps ≥ 1)        since B2: g3 (stamp ≥ 2)
/// ```
///
/// A write's stamp is the sequence when the node hands the write on (to the core or the disk),
/// which is before the barrier exactly when the write is in the barrier's image. Reporting a
/// granule changed that was not (a write counted after the barrier, a partial granule, a granule
/// rewritten with the same bytes) is safe for a backup; missing a change never is, so whatever
/// is not known (a barrier no longer tracked) is reported changed by the caller.
///
/// Memory: nothing until the first barrier, then `granuleCount * 2` bytes, at most
/// `Limits.changeTrackingGranulesMax * 2` (16 MiB): a large device gets coarser granules. Sequence
/// numbers are renumbered (stamps rewritten once) when they would pass `UInt16.max`.
public struct ChangeTracker: Sendable {
    public let deviceBytes: UInt64
    /// Bytes one stamp covers, a power of two.
    public let granuleBytes: Int
    public let granuleCount: Int
    private let granuleShift: UInt64
    /// Allocated at the first barrier.
    private var stamps: [UInt16] = []
    /// Tracked barriers, oldest first: id and sequence, both strictly increasing.
    private var tracked: [(id: UInt64, sequence: UInt16)] = []
    /// The newest tracked barrier's sequence (what a write is stamped with); 0 before any.
    private var current: UInt16 = 0

    /// A tracker for a device of `deviceBytes`, granules of at least `granuleBytesMin` (a power of
    /// two; coarser if the device needs more than `Limits.changeTrackingGranulesMax` of them).
    public init(deviceBytes: UInt64, granuleBytesMin: Int) {
        precondition(deviceBytes > 0 && granuleBytesMin > 0 && granuleBytesMin.nonzeroBitCount == 1)
        granuleBytes = Self.granuleBytes(deviceBytes: deviceBytes, minimum: granuleBytesMin)
        self.deviceBytes = deviceBytes
        granuleShift = UInt64(granuleBytes.trailingZeroBitCount)
        granuleCount = Int((deviceBytes + UInt64(granuleBytes) - 1) >> granuleShift)
        precondition(granuleCount <= Limits.changeTrackingGranulesMax)
    }

    /// The granule size for a device: `minimum`, doubled until the stamps fit the memory bound.
    public static func granuleBytes(deviceBytes: UInt64, minimum: Int) -> Int {
        var granule = UInt64(minimum)
        while (deviceBytes + granule - 1) / granule > UInt64(Limits.changeTrackingGranulesMax) { granule *= 2 }
        return Int(granule)
    }

    /// Tracked barrier ids, oldest first.
    public var barrierIDs: [UInt64] { tracked.map(\.id) }

    public func tracks(_ id: UInt64) -> Bool { sequence(of: id) != nil }

    /// Bytes of memory the stamps take (0 before the first barrier).
    public var memoryBytes: Int { stamps.count * MemoryLayout<UInt16>.stride }

    private func sequence(of id: UInt64) -> UInt16? {
        tracked.first { $0.id == id }?.sequence
    }

    /// A barrier was created (id above every tracked one): writes from now on are changes since it.
    /// The oldest is forgotten when `Limits.barriersRetainedMax` are tracked.
    public mutating func barrierCreated(_ id: UInt64) {
        precondition(id > (tracked.last?.id ?? 0), "barrier \(id) is not newer than the last tracked")
        if stamps.isEmpty { stamps = Array(repeating: 0, count: granuleCount) }
        if tracked.count == Limits.barriersRetainedMax { tracked.removeFirst() }
        if current == UInt16.max { renumber() }
        current += 1
        tracked.append((id, current))
    }

    /// Stops tracking barrier `id` (its changes can no longer be asked for).
    public mutating func forget(_ id: UInt64) {
        tracked.removeAll { $0.id == id }
    }

    /// Gives the tracked barriers sequences 1...n and rewrites every stamp to match: a stamp
    /// becomes the number of tracked barriers whose sequence is ≤ it, which keeps
    /// `stamp ≥ sequence(B)` true for exactly the same granules and barriers.
    private mutating func renumber() {
        var map = [UInt16](repeating: 0, count: Int(UInt16.max) + 1)
        var rank: UInt16 = 0
        var next = 0
        for old in 0...Int(UInt16.max) {
            while next < tracked.count && Int(tracked[next].sequence) <= old {
                rank += 1
                next += 1
            }
            map[old] = rank
        }
        for i in stamps.indices { stamps[i] = map[Int(stamps[i])] }
        for i in tracked.indices { tracked[i].sequence = UInt16(i + 1) }
        current = UInt16(tracked.count)
    }

    /// A write (or trim, or zeroes) of `[offset, offset + length)` reached, or is about to reach,
    /// the device.
    @inline(__always)
    public mutating func written(offset: UInt64, length: UInt64) {
        guard current != 0, length > 0 else { return }
        precondition(offset < deviceBytes && length <= deviceBytes - offset, "write \(offset)+\(length) past the device end")
        let first = Int(offset >> granuleShift)
        let last = Int((offset + length - 1) >> granuleShift)
        for g in first...last { stamps[g] = current }
    }

    /// Every granule changed (the device was written in a way not tracked granule by granule).
    public mutating func writtenAll() {
        guard current != 0 else { return }
        for i in stamps.indices { stamps[i] = current }
    }

    /// Whether granule `granule` changed since barrier `id` (nil: `id` is not tracked).
    public func changed(granule: Int, since id: UInt64) -> Bool? {
        guard let s = sequence(of: id) else { return nil }
        return stamps[granule] >= s
    }

    /// The extents of `[offset, offset + length)` (inside the device) changed since barrier `id`,
    /// into `runs` (emptied first) as (length, 1 = changed / 0 = not), neighbours of one state
    /// merged, the first starting at `offset`, at most `runsMax` of them (a reply may cover less
    /// than the range). False when `id` is not tracked (`runs` is then empty): the caller must
    /// report the range changed.
    public func changedRuns(since id: UInt64, offset: UInt64, length: UInt32, runsMax: Int,
                            into runs: inout [(length: UInt32, flags: UInt32)]) -> Bool {
        runs.removeAll(keepingCapacity: true)
        guard let s = sequence(of: id) else { return false }
        precondition(runsMax >= 1 && length > 0 && offset < deviceBytes && UInt64(length) <= deviceBytes - offset)
        let end = offset + UInt64(length)
        var at = offset
        while at < end {
            let granule = Int(at >> granuleShift)
            let flags: UInt32 = stamps[granule] >= s ? 1 : 0
            let granuleEnd = min(UInt64(granule + 1) << granuleShift, end)
            let piece = UInt32(granuleEnd - at)
            if let last = runs.last, last.flags == flags {
                runs[runs.count - 1].length += piece
            } else {
                if runs.count == runsMax { break }
                runs.append((piece, flags))
            }
            at = granuleEnd
        }
        return true
    }
}

extension Limits {
    /// Granules of the changed-block tracker: 2 bytes each, so 16 MiB at most (a 1 TiB device
    /// tracks 128 KiB granules, a 512 GiB one 64 KiB).
    public static let changeTrackingGranulesMax = 8 << 20
}
