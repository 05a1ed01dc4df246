/// DRBD's data-generation identifiers (DRBD 8.4: current, bitmap, two history), which tell two
/// nodes on connect whether their data is the same, which side is newer, and whether the bitmap
/// can say what differs.
///
/// - `current` names the data generation this node holds. A new one starts when a primary writes
///   without its peer (the caller supplies the random value: the core has no RNG).
/// - `bitmap` is the generation the peer was left with when this node's bitmap started tracking
///   changes (the old current at that moment), or 0 when the bitmap tracks nothing.
/// - `history0` (newer) and `history1` (older) are earlier bitmap generations, kept so that a node
///   that fell further behind is still recognized (full sync) rather than called unrelated.
///
/// Bit 0 of every value is ignored in comparisons, as DRBD does (it marks "primary" there).
/// Tandem keeps that fact in the superblock flags and sends the flags with the UUIDs, so bit 0
/// carries nothing here; a node may still mirror DRBD.
///
/// `decide` implements the handshake rules (DRBD `drbd_receiver.c` `drbd_uuid_compare` and
/// `drbd_sync_handshake`, 8.4); the table is in Protocol/metadata.md "Generation UUIDs".
public struct GenerationUUIDs: Equatable, Sendable, CustomStringConvertible {
    /// The current UUID of metadata that was just created and never held a data generation
    /// (DRBD's `UUID_JUST_CREATED`).
    public static let initialCurrent: UInt64 = 4
    /// Bits compared: all but bit 0.
    public static let comparedBits: UInt64 = ~1

    public var current: UInt64
    public var bitmap: UInt64
    /// The newer history UUID.
    public var history0: UInt64
    /// The older history UUID.
    public var history1: UInt64

    /// Fresh metadata: current is `initialCurrent`, nothing else.
    public init() {
        self.init(current: GenerationUUIDs.initialCurrent, bitmap: 0, history0: 0, history1: 0)
    }

    public init(current: UInt64, bitmap: UInt64, history0: UInt64, history1: UInt64) {
        self.current = current
        self.bitmap = bitmap
        self.history0 = history0
        self.history1 = history1
    }

    /// Whether this node never held a data generation.
    public var isInitial: Bool { masked(current) == GenerationUUIDs.initialCurrent }

    public var description: String {
        "\(hex(current)):\(hex(bitmap)):\(hex(history0)):\(hex(history1))"
    }

    // MARK: Transitions

    /// A primary is about to write without its peer (it lost the connection, or it was promoted
    /// while disconnected): the peer keeps the old generation, so the bitmap now tracks changes
    /// relative to it (bitmap = current) and this node's data becomes a new generation
    /// (current = `newCurrent`, a random value from the caller).
    ///
    /// If the bitmap UUID is already set, the bitmap has tracked every change since the
    /// generation the peer holds, and the node stays in its generation: returns `self`, as DRBD
    /// does. From the initial UUID the bitmap stays 0: a fresh peer needs a full sync anyway, and
    /// two nodes created apart would otherwise share the ancestor "initial".
    public func rotatedForNewPrimaryDataWhileDisconnected(newCurrent: UInt64) -> GenerationUUIDs {
        checkFresh(newCurrent)
        guard bitmap == 0 else { return self }
        var next = self
        next.bitmap = isInitial ? 0 : current
        next.current = newCurrent
        return next
    }

    /// A resync as source finished: the peer now holds this generation, so the bitmap UUID retires
    /// into history (bitmap = 0).
    public func afterResyncAsSource() -> GenerationUUIDs {
        guard bitmap != 0 else { return self }
        var next = self
        next.history1 = history0
        next.history0 = bitmap
        next.bitmap = 0
        return next
    }

    /// A resync as target finished: this node now holds the source's generation `sourceCurrent`.
    /// The generations it leaves (its bitmap, then its current) go into history, newest first.
    public func adoptedAfterResyncAsTarget(sourceCurrent: UInt64) -> GenerationUUIDs {
        precondition(masked(sourceCurrent) != 0, "GenerationUUIDs: a source has a current UUID")
        var next = self
        if next.bitmap != 0 {
            next.history1 = next.history0
            next.history0 = next.bitmap
            next.bitmap = 0
        }
        if masked(next.current) != masked(sourceCurrent) {
            if !next.isInitial {
                next.history1 = next.history0
                next.history0 = next.current
            }
            next.current = sourceCurrent
        }
        return next
    }

    /// Both sides skipped the initial sync (`SyncDecision.skipInitialSync`): they hold the same
    /// (zeroed) data and start one generation, `newCurrent`, chosen by one side and sent to the
    /// other, so both store the same value.
    public func afterSkippedInitialSync(newCurrent: UInt64) -> GenerationUUIDs {
        precondition(isInitial, "GenerationUUIDs: only fresh metadata skips the initial sync")
        checkFresh(newCurrent)
        return GenerationUUIDs(current: newCurrent, bitmap: 0, history0: 0, history1: 0)
    }

    private func checkFresh(_ value: UInt64) {
        let v = masked(value)
        precondition(v != 0 && v != GenerationUUIDs.initialCurrent, "GenerationUUIDs: \(hex(value)) is reserved")
        precondition(v != masked(current) && v != masked(bitmap) && v != masked(history0) && v != masked(history1),
                     "GenerationUUIDs: new UUID \(hex(value)) is already in \(self)")
    }

    // MARK: Sync decision

    /// What two nodes do about their data when they connect.
    public enum SyncDecision: Equatable, Sendable {
        /// Same data: nothing to copy.
        case noSync
        /// This node is the resync source; the granules in the (merged) bitmaps are copied.
        case becomeSource
        /// This node is the resync target (Inconsistent until done); bitmap-based.
        case becomeTarget
        /// This node is the source of a full sync: every granule is copied.
        case fullSyncAsSource
        /// This node is the target of a full sync.
        case fullSyncAsTarget
        /// Both sides wrote since they last agreed: disconnect, report, wait for an operator.
        case splitBrain
        /// No common generation: refuse to connect.
        case unrelatedData
        /// Both sides were created on zeroed devices and never written: both are UpToDate with
        /// no copy (DRBD's `new-current-uuid --clear-bitmap`); see `afterSkippedInitialSync`.
        case skipInitialSync
    }

    /// The rule a decision came from, for the log line an operator reads (DRBD logs
    /// "uuid_compare()=N by rule R"); raw values are DRBD's rule numbers where one exists.
    public enum SyncRule: Int, Sendable, CustomStringConvertible {
        case bothInitial = 10
        case localInitial = 20
        case peerInitial = 30
        case equalLocalBitmapOnly = 36
        case equalPeerBitmapOnly = 37
        case equalCurrents = 40
        case peerBitmapIsLocalCurrent = 50
        case localCurrentInPeerHistory = 60
        case localBitmapIsPeerCurrent = 70
        case peerCurrentInLocalHistory = 80
        case equalBitmaps = 90
        case sharedAncestor = 100
        case noRelation = 1000
        case contradictory = 1001
        /// Not a UUID rule: a side's disk is detached, so nothing is compared (`ReplicaCore`).
        case detachedDisk = 2000

        public var description: String {
            switch self {
            case .bothInitial: "both sides just created"
            case .localInitial: "this side just created"
            case .peerInitial: "peer just created"
            case .equalLocalBitmapOnly: "same generation, only this side's bitmap UUID set (an unfinished resync as source)"
            case .equalPeerBitmapOnly: "same generation, only the peer's bitmap UUID set (an unfinished resync as target)"
            case .equalCurrents: "same generation"
            case .peerBitmapIsLocalCurrent: "peer wrote since this side's generation"
            case .localCurrentInPeerHistory: "this side's generation is in the peer's history"
            case .localBitmapIsPeerCurrent: "this side wrote since the peer's generation"
            case .peerCurrentInLocalHistory: "peer's generation is in this side's history"
            case .equalBitmaps: "both sides wrote since the same generation"
            case .sharedAncestor: "both sides wrote since a common older generation"
            case .noRelation: "no common generation"
            case .contradictory: "each side's UUIDs say the other is older (reused or damaged UUIDs)"
            case .detachedDisk: "a disk is detached: no resync until it is attached again"
            }
        }
    }

    /// The sync decision on connect. `localFlags` and `peerFlags` are each side's superblock
    /// flags: `.crashedPrimary` or `.wasPrimary` marks a primary that crashed (a live primary's
    /// `.wasPrimary` is also safe: it only makes the primary the source of a bitmap resync),
    /// `.consistent` separates usable data from Inconsistent, `.newZeroed` allows skipping the
    /// initial sync.
    /// Both crashed as primary with the same generation: `localMarked` and `peerMarked` say
    /// whether each side's bitmap holds marks (the hello's out-of-sync count); a side with marks
    /// is the source over one without. `localWinsTie` breaks the one symmetric case left (both
    /// marked, or neither: DRBD's `DISCARD_CONCURRENT`); the two nodes must pass opposite values,
    /// e.g. `localNodeID < peerNodeID`.
    public static func decide(
        local: GenerationUUIDs, peer: GenerationUUIDs,
        localFlags: Superblock.Flags, peerFlags: Superblock.Flags,
        localMarked: Bool = false, peerMarked: Bool = false,
        localWinsTie: Bool
    ) -> SyncDecision {
        decideWithRule(local: local, peer: peer, localFlags: localFlags, peerFlags: peerFlags,
                       localMarked: localMarked, peerMarked: peerMarked, localWinsTie: localWinsTie).decision
    }

    /// `decide`, with the UUID rule that matched. When exactly one side is consistent, the
    /// consistent side becomes source whatever the rule said, as DRBD's `drbd_sync_handshake`
    /// does (Inconsistent data is never a source and has nothing to lose): a full sync if the
    /// rule asked for one or found the split brain through history, bitmap-based otherwise.
    public static func decideWithRule(
        local: GenerationUUIDs, peer: GenerationUUIDs,
        localFlags: Superblock.Flags, peerFlags: Superblock.Flags,
        localMarked: Bool = false, peerMarked: Bool = false,
        localWinsTie: Bool
    ) -> (decision: SyncDecision, rule: SyncRule) {
        var (byUUIDs, rule) = compare(local: local, peer: peer, localFlags: localFlags, peerFlags: peerFlags,
                                      localMarked: localMarked, peerMarked: peerMarked, localWinsTie: localWinsTie)
        // The peer runs the same rules from its side. Generations made in time order always give
        // mirror images; when they do not (reused or damaged UUIDs: each side's say the other is
        // older), both could become target or both source, so stop as for a split brain.
        let (theirs, _) = compare(local: peer, peer: local, localFlags: peerFlags, peerFlags: localFlags,
                                  localMarked: peerMarked, peerMarked: localMarked, localWinsTie: !localWinsTie)
        if theirs != mirrored(byUUIDs) {
            (byUUIDs, rule) = (.splitBrain, .contradictory)
        }
        let localConsistent = localFlags.contains(.consistent)
        let peerConsistent = peerFlags.contains(.consistent)
        if !localConsistent && !peerConsistent {
            // Neither side holds a consistent image (both detached, or both unfinished targets):
            // no source exists, both stay Inconsistent until an operator forces one primary
            // (DRBD refuses: "I shall become SyncSource, but I am inconsistent").
            switch byUUIDs {
            case .becomeSource, .becomeTarget, .fullSyncAsSource, .fullSyncAsTarget: return (.noSync, rule)
            case .noSync, .splitBrain, .unrelatedData, .skipInitialSync: return (byUUIDs, rule)
            }
        }
        guard localConsistent != peerConsistent, byUUIDs != .unrelatedData else { return (byUUIDs, rule) }
        let full = switch byUUIDs {
        case .fullSyncAsSource, .fullSyncAsTarget: true
        case .splitBrain: rule != .equalBitmaps
        case .noSync, .becomeSource, .becomeTarget, .unrelatedData, .skipInitialSync: false
        }
        if localConsistent {
            return (full ? .fullSyncAsSource : .becomeSource, rule)
        }
        return (full ? .fullSyncAsTarget : .becomeTarget, rule)
    }

    /// What the peer decides when this node decides `decision`.
    private static func mirrored(_ decision: SyncDecision) -> SyncDecision {
        switch decision {
        case .becomeSource: .becomeTarget
        case .becomeTarget: .becomeSource
        case .fullSyncAsSource: .fullSyncAsTarget
        case .fullSyncAsTarget: .fullSyncAsSource
        case .noSync, .splitBrain, .unrelatedData, .skipInitialSync: decision
        }
    }

    /// The UUID rules alone, in DRBD's order (the first that matches decides).
    private static func compare(
        local: GenerationUUIDs, peer: GenerationUUIDs,
        localFlags: Superblock.Flags, peerFlags: Superblock.Flags,
        localMarked: Bool, peerMarked: Bool,
        localWinsTie: Bool
    ) -> (SyncDecision, SyncRule) {
        let initial = GenerationUUIDs.initialCurrent
        let localCurrent = masked(local.current)
        let peerCurrent = masked(peer.current)
        let localBitmap = masked(local.bitmap)
        let peerBitmap = masked(peer.bitmap)

        if localCurrent == initial && peerCurrent == initial {
            // Neither side ever held data. Zeroed on both sides means equal: no copy needed.
            // Otherwise both stay Inconsistent until an operator forces one primary, which starts
            // a generation and makes the other side's sync a full one.
            if localFlags.contains(.newZeroed) && peerFlags.contains(.newZeroed) {
                return (.skipInitialSync, .bothInitial)
            }
            return (.noSync, .bothInitial)
        }
        if localCurrent == initial || localCurrent == 0 { return (.fullSyncAsTarget, .localInitial) }
        if peerCurrent == initial || peerCurrent == 0 { return (.fullSyncAsSource, .peerInitial) }

        if localCurrent == peerCurrent {
            // A resync finished on one side but the other never recorded it (a crash in
            // between): the side still holding a bitmap UUID was the source and resyncs what its
            // bitmap still says (DRBD rules 34..37).
            if localBitmap != 0 && peerBitmap == 0 { return (.becomeSource, .equalLocalBitmapOnly) }
            if localBitmap == 0 && peerBitmap != 0 { return (.becomeTarget, .equalPeerBitmapOnly) }
            // Same generation. A primary that crashed may hold writes the peer never saw (and
            // the peer may hold some it never completed): its activity log marked those extents
            // in its bitmap, so it is the source of a bitmap resync.
            let localCrashed = !localFlags.isDisjoint(with: [.crashedPrimary, .wasPrimary])
            let peerCrashed = !peerFlags.isDisjoint(with: [.crashedPrimary, .wasPrimary])
            switch (localCrashed, peerCrashed) {
            case (false, false): return (.noSync, .equalCurrents)
            case (true, false): return (.becomeSource, .equalCurrents)
            case (false, true): return (.becomeTarget, .equalCurrents)
            case (true, true):
                // Both crashed as primary of this generation (one took over and crashed before
                // its first write without the peer, which would have started a generation). A
                // side whose bitmap is empty had every write it answered covered by a peer flush:
                // the peer holds them. The side with marks may hold writes the other lacks
                // (its hot extents), so it is the source; copying the other way could put older
                // blocks over acknowledged writes. Only marks on both sides (or none) leave the
                // tie to the node ids.
                if localMarked != peerMarked { return (localMarked ? .becomeSource : .becomeTarget, .equalCurrents) }
                return (localWinsTie ? .becomeSource : .becomeTarget, .equalCurrents)
            }
        }

        if localCurrent == peerBitmap { return (.becomeTarget, .peerBitmapIsLocalCurrent) }
        if localCurrent == masked(peer.history0) || localCurrent == masked(peer.history1) {
            return (.fullSyncAsTarget, .localCurrentInPeerHistory)
        }
        if localBitmap == peerCurrent { return (.becomeSource, .localBitmapIsPeerCurrent) }
        if peerCurrent == masked(local.history0) || peerCurrent == masked(local.history1) {
            return (.fullSyncAsSource, .peerCurrentInLocalHistory)
        }
        if localBitmap != 0 && localBitmap == peerBitmap { return (.splitBrain, .equalBitmaps) }
        // A generation both descend from, found anywhere below the currents: both moved on.
        let localAncestors = [localBitmap, masked(local.history0), masked(local.history1)]
        let peerAncestors = [peerBitmap, masked(peer.history0), masked(peer.history1)]
        for a in localAncestors where a != 0 && peerAncestors.contains(a) {
            return (.splitBrain, .sharedAncestor)
        }
        return (.unrelatedData, .noRelation)
    }
}

@inline(__always)
private func masked(_ uuid: UInt64) -> UInt64 { uuid & GenerationUUIDs.comparedBits }

private func hex(_ value: UInt64) -> String {
    let digits = String(value, radix: 16, uppercase: true)
    return String(repeating: "0", count: 16 - digits.count) + digits
}
