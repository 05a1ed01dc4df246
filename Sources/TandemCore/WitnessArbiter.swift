/// The decisions of a witness, sans I/O: a third node without data that lets a data node become
/// primary only when that cannot make two primaries or promote stale data.
///
/// The witness keeps what each data node last told it (role, disk, whether it is connected now,
/// and for a primary whether it writes without its peer) and answers promotion requests:
///
/// - the requester's disk must be UpToDate;
/// - the other data node must not be primary and reachable by the witness;
/// - the witness must have heard from the other node since it started (else it cannot know
///   whether the requester is current), unless the other node never was primary;
/// - if the other node is (was) primary and told the witness it writes without its peer, the
///   requester is Outdated: refused.
///
/// A primary that loses its peer asks the witness to record `peerOutdated` before it answers any
/// client write without the peer (fencing, as DRBD's `fence-peer`). A primary that loses both
/// its peer and the witness has no quorum and fails writes, so at most one side of any
/// partition accepts writes. The witness records that for one primary only, and only once it has
/// heard from the other node since it started: a restarted witness knows nothing, and the other
/// node may be a primary it (before the restart) let take over, writing without this one.
///
/// A secondary about to roll back to a barrier asks the witness to record that first, unless
/// its peer acknowledged the notice over the link (Protocol/barriers.md "Rollback and the
/// witness"): its image is about to become the newest and the peer's older, so while the record
/// stands the peer is not promoted. The record is refused while the peer is (recorded as)
/// primary, while the witness has not heard from it since it started (it may be a primary
/// the witness let take over before a restart), or while the peer's generation descends from
/// the node's (it wrote without the node, then demoted: the rolled-back generation would meet
/// it as a split brain); the first request the witness handles wins
/// (a grant to the peer, or the record). It ends when the node says it no longer rolls back
/// (its peer resynced from it, or the rollback did not start), when it becomes primary, or once
/// the peer reports the rolled-back generation as its own (it resynced, and the node could not
/// tell the witness). It lives in memory like the rest: the node repeats it in every state it
/// reports, its hello included, so a restarted witness has it again before anything else.
public struct WitnessArbiter: Sendable {
    public struct NodeView: Sendable, Equatable {
        public var connected = false
        /// The witness heard from this node since it started.
        public var known = false
        public var role: PeerRole = .secondary
        public var disk: PeerDiskState = .diskless
        /// A primary writing without its peer: the peer's data is outdated.
        public var writesWithoutPeer = false
        /// Told to demote (the other node was promoted while it was away); what it claims until
        /// it announces itself secondary counts for nothing.
        public var deposed = false
        /// The generation UUIDs it last reported (nil before it said any).
        public var uuids: PeerGenerationUUIDs?
        /// It rolls back to a barrier (or rolled back, and the other node has not resynced from
        /// it yet): the current generation (compared bits) it reported when the witness recorded
        /// it. While set, the other node is not promoted. Nil: no rollback recorded.
        public var rollingBackFrom: UInt64?
    }

    public enum Verdict: Sendable, Equatable {
        case granted
        case refused(String)
    }

    public private(set) var nodes: [UInt8: NodeView]
    private let names: [UInt8: String]

    /// The two data nodes, by id, with their names for messages.
    public init(dataNodes: [(id: UInt8, name: String)]) {
        precondition(dataNodes.count == 2, "a witness arbitrates between two data nodes")
        nodes = Dictionary(uniqueKeysWithValues: dataNodes.map { ($0.id, NodeView()) })
        names = Dictionary(uniqueKeysWithValues: dataNodes.map { ($0.id, $0.name) })
    }

    public func isDataNode(_ id: UInt8) -> Bool { nodes[id] != nil }

    private func other(_ id: UInt8) -> UInt8 { nodes.keys.first { $0 != id }! }

    /// Whether `a`'s data generation descends from `b`'s: `a` wrote since `b`'s generation (its
    /// bitmap or history UUID is `b`'s current).
    static func descends(_ a: PeerGenerationUUIDs?, from b: PeerGenerationUUIDs?) -> Bool {
        guard let a, let b else { return false }
        let mask = GenerationUUIDs.comparedBits
        let base = b.current & mask
        guard base != 0, a.current & mask != base else { return false }
        return a.bitmap & mask == base || a.history.contains { $0 & mask == base }
    }

    /// Both claim to be primary: whether `id` must give way. The one whose generation descends
    /// from the other's holds the newer data; otherwise the one the witness recorded first (or
    /// let take over) keeps the role.
    private func loses(_ id: UInt8, uuids: PeerGenerationUUIDs?) -> Bool {
        let o = other(id)
        if Self.descends(uuids, from: nodes[o]!.uuids) { return false }
        if Self.descends(nodes[o]!.uuids, from: uuids) { return true }
        return (nodes[id]!.known && nodes[id]!.role != .primary) || nodes[o]!.writesWithoutPeer
    }

    /// A data node connected and said hello (with its generation UUIDs, and whether it rolls back
    /// to a barrier). Returns why it must be turned away (it claims to be primary while the
    /// witness granted the other node, or the other node holds newer data as primary), or nil.
    /// A rollback in the hello is recorded unless the other node is recorded as primary: the
    /// node already rolls back (a witness that restarted forgot it), nothing is left to refuse.
    public mutating func connected(_ id: UInt8, role: PeerRole, disk: PeerDiskState, uuids: PeerGenerationUUIDs? = nil,
                                   rollingBack: Bool = false) -> String? {
        precondition(isDataNode(id))
        let o = other(id)
        if role == .primary, nodes[o]!.role == .primary, loses(id, uuids: uuids) {
            // It was deposed while away: the other node was promoted with the witness's consent,
            // or (after a restart of the witness) is recorded writing without this one.
            nodes[id]!.connected = true
            nodes[id]!.deposed = true
            nodes[id]!.uuids = uuids
            nodes[id]!.rollingBackFrom = nil
            return "\(names[o]!) was promoted while \(names[id]!) was unreachable; \(names[id]!) must demote"
        }
        let uuids = uuids ?? nodes[id]!.uuids
        var from: UInt64?
        if rollingBack && role == .secondary && nodes[o]!.role != .primary {
            from = nodes[id]!.rollingBackFrom ?? Self.compared(uuids)
        }
        nodes[id]! = NodeView(connected: true, known: true, role: role, disk: disk, writesWithoutPeer: nodes[id]!.writesWithoutPeer && role == .primary,
                              deposed: false, uuids: uuids, rollingBackFrom: from)
        supersedeRollback(of: o)
        return nil
    }

    private static func compared(_ uuids: PeerGenerationUUIDs?) -> UInt64 {
        (uuids?.current ?? 0) & GenerationUUIDs.comparedBits
    }

    /// Whether the witness holds a rollback of this node (the other node is not promoted).
    public func rollsBack(_ id: UInt8) -> Bool { nodes[id]?.rollingBackFrom != nil }

    /// `o`'s rollback record is superseded once the other node reports the generation `o` rolled
    /// back to as its own: it resynced from `o` (`o` had reported the new generation, which
    /// differs from the one it rolled back from).
    private mutating func supersedeRollback(of o: UInt8) {
        guard let from = nodes[o]!.rollingBackFrom, let theirs = nodes[o]!.uuids, let mine = nodes[other(o)]!.uuids else { return }
        let current = Self.compared(theirs)
        if current != from && current != 0 && Self.compared(mine) == current { nodes[o]!.rollingBackFrom = nil }
    }

    public mutating func disconnected(_ id: UInt8) {
        nodes[id]?.connected = false
    }

    /// A data node's state changed (announcement, fencing request or rollback request). A fencing
    /// request (a primary writing without its peer) is refused while the witness has not heard
    /// from the other node since it started, and refused with the requester deposed while the
    /// other node is recorded as primary with data at least as new (two primaries would both
    /// accept writes; the one with the older generation is deposed). A primary whose UUIDs say it
    /// holds writes the peer lacks (a bitmap UUID) is recorded so even when its request is
    /// refused, so that a witness that restarted since does not promote the other node.
    ///
    /// `rollingBack` (a secondary): record that it rolls back to a barrier. Granted at once if
    /// recorded already; refused, and not recorded, while the other node is recorded as primary,
    /// the witness has not heard from it since it started, or its generation descends from this
    /// node's (it holds writes this one lacks). A state without it ends the record.
    /// The role and disk are recorded in every case.
    @discardableResult
    public mutating func announced(_ id: UInt8, role: PeerRole, disk: PeerDiskState, writesWithoutPeer: Bool, uuids: PeerGenerationUUIDs? = nil,
                                   rollingBack: Bool = false) -> Verdict {
        precondition(isDataNode(id))
        let o = other(id)
        let me = names[id]!, them = names[o]!
        if let uuids { nodes[id]!.uuids = uuids }
        let aheadOfPeer = (uuids?.bitmap ?? 0) & GenerationUUIDs.comparedBits != 0
        if nodes[id]!.deposed {
            guard role == .secondary else { return .refused("\(me) was deposed and has not demoted yet") }
            nodes[id]!.deposed = false
        }
        var rollback = Verdict.granted
        if !rollingBack || role != .secondary {
            nodes[id]!.rollingBackFrom = nil
        } else if nodes[id]!.rollingBackFrom == nil {
            if nodes[o]!.role == .primary {
                rollback = .refused("\(them) is primary: \(me) may not roll back under it (demote \(them) first)")
            } else if !nodes[o]!.known {
                rollback = .refused("the witness has not heard from \(them) since it started: \(them) may be primary elsewhere")
            } else if Self.descends(nodes[o]!.uuids, from: nodes[id]!.uuids) {
                // The other node wrote since this one's generation (it wrote without this one as
                // primary, then demoted): the rolled-back generation would not descend from its
                // data, and the two would meet as a split brain. This node resyncs first.
                rollback = .refused("\(them) holds writes \(me) lacks (its generation descends from \(me)'s): \(me) may not roll back before it resynced from \(them)")
            } else {
                nodes[id]!.rollingBackFrom = Self.compared(nodes[id]!.uuids)
            }
        }
        defer { supersedeRollback(of: id); supersedeRollback(of: o) }
        if role == .primary && writesWithoutPeer {
            if !nodes[o]!.known {
                nodes[id]!.known = true
                nodes[id]!.role = .primary
                nodes[id]!.disk = disk
                nodes[id]!.writesWithoutPeer = aheadOfPeer
                return .refused("the witness has not heard from \(them) since it started: \(them) may be primary elsewhere")
            }
            if Self.descends(nodes[o]!.uuids, from: nodes[id]!.uuids) {
                // The other node wrote since this one's generation (it took over, then demoted or
                // restarted): this primary's data is older; it must not write on alone.
                nodes[id]!.known = true
                nodes[id]!.deposed = true
                return .refused("\(them) holds writes \(me) lacks (its generation descends from \(me)'s): \(me) must demote")
            }
            if nodes[o]!.role == .primary {
                if loses(id, uuids: nodes[id]!.uuids) {
                    nodes[id]!.known = true
                    nodes[id]!.deposed = true
                    return .refused("\(them) is primary: \(me) must demote")
                }
                // This one holds the newer generation: the other must give way when it next
                // talks to the witness.
                nodes[o]!.deposed = true
                nodes[o]!.role = .secondary
                nodes[o]!.writesWithoutPeer = false
            }
        }
        // A promotion the witness did not grant (`--force`) is recorded as it is: with both
        // primary, no promotion is granted until one of them announces itself secondary.
        nodes[id]!.known = true
        nodes[id]!.role = role
        nodes[id]!.disk = disk
        nodes[id]!.writesWithoutPeer = role == .primary && (writesWithoutPeer || aheadOfPeer)
        return rollback
    }

    /// A data node asks to become primary (with its generation UUIDs).
    public mutating func requestPrimary(_ id: UInt8, disk: PeerDiskState, uuids: PeerGenerationUUIDs? = nil) -> Verdict {
        precondition(isDataNode(id))
        let o = other(id)
        let me = names[id]!, them = names[o]!
        if let uuids { nodes[id]!.uuids = uuids }
        supersedeRollback(of: o)
        let view = nodes[o]!
        guard disk == .upToDate else { return .refused("\(me)'s disk is \(disk), not upToDate") }
        if nodes[id]!.deposed { return .refused("\(me) was deposed and has not demoted yet") }
        if view.rollingBackFrom != nil {
            return .refused("\(them) rolls back to a barrier: \(me)'s data is about to be older than \(them)'s; \(me) resyncs from \(them)")
        }
        if view.role == .primary && view.connected { return .refused("\(them) is primary and the witness still reaches it") }
        if !view.known { return .refused("the witness has not heard from \(them) since it started: it cannot tell whether \(me) has the newest data") }
        if view.role == .primary && view.writesWithoutPeer {
            return .refused("\(them) wrote without \(me) before it was lost: \(me)'s data is outdated")
        }
        if Self.descends(view.uuids, from: nodes[id]!.uuids) {
            // The other node wrote since this one's generation (and then demoted, or restarted):
            // this one's data is older, whatever roles the witness recorded.
            return .refused("\(them) holds writes \(me) lacks (its generation descends from \(me)'s): \(me)'s data is outdated")
        }
        nodes[id]!.role = .primary
        nodes[id]!.disk = disk
        nodes[id]!.known = true
        nodes[id]!.rollingBackFrom = nil
        nodes[o]!.role = .secondary
        nodes[o]!.writesWithoutPeer = false
        return .granted
    }
}
