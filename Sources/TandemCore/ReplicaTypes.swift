/// The vocabulary of the replication state machine (`ReplicaCore`): roles, states, the events it
/// takes and the actions it returns. Modelled on DRBD 9 (see shared/notes/drbd.md), reduced to two
/// data nodes.

/// The state of the link to the peer.
public enum LinkState: String, Sendable, Equatable {
    /// Not trying to connect (administratively down, or after split brain / unrelated data).
    case standalone
    /// Trying to reach the peer.
    case connecting
    /// Hello exchanged; bitmaps being exchanged before a resync.
    case handshaking
    /// Replicating; `sync` says whether a resync runs.
    case connected
}

/// What runs over a connected link besides replication.
public enum SyncState: String, Sendable, Equatable {
    case established
    case syncSource
    case syncTarget
}

/// Why the link went down, as both sides log it.
public enum LinkDownReason: Sendable, Equatable {
    case peerClosed
    case timeout
    case protocolError(String)
    case splitBrain
    case unrelatedData
    case sizeMismatch
    case administrative
    /// Both nodes are primary, or the connect would make a primary the sync target.
    case roleConflict

    /// The reason a `disconnect` message tells the peer, for the verdicts it must share (the
    /// peer then stays down too); nil for the link failures, which need no message.
    public var wire: PeerDisconnectReason? {
        switch self {
        case .splitBrain: .splitBrain
        case .unrelatedData: .unrelatedData
        case .roleConflict: .roleConflict
        case .sizeMismatch: .sizeMismatch
        case .administrative: .shutdown
        case .peerClosed, .timeout, .protocolError: nil
        }
    }
}

/// What to do when a connect finds a split brain (the resource file's `after-split-brain`).
/// Every policy other than `disconnect` discards one side's changes automatically; all are off
/// by default, as in DRBD.
public enum SplitBrainPolicy: String, Sendable, Equatable, CaseIterable {
    /// Refuse to connect and wait for an operator (`tandem connect --discard-my-data`).
    case disconnect
    /// A side that wrote nothing since the split becomes the target; else disconnect.
    case discardZeroChanges = "discard-zero-changes"
    /// The side with fewer changed blocks becomes the target (a tie disconnects).
    case discardLeastChanges = "discard-least-changes"
    /// The side that became primary later becomes the target (unknown times disconnect).
    case discardYoungerPrimary = "discard-younger-primary"
}

/// Why a role change was refused (the operator reads `description`).
public enum RoleChangeRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    case peerIsPrimary
    case diskNotUpToDate(PeerDiskState)
    case resyncTarget
    case noUsableData
    case requestsInFlight(Int)
    case outOfSync(UInt64)
    /// This node's hello is on its way and the peer's has not come: a forced promotion now
    /// would change the state the peer is deciding on.
    case helloOut

    public var description: String {
        switch self {
        case .peerIsPrimary: "the peer is primary: demote it first (two primaries would diverge)"
        case .diskNotUpToDate(let state):
            "the local disk is \(state), not upToDate: promoting would serve data that may be older than the peer's; --force does it anyway"
        case .resyncTarget: "a resync into this node is running: its data is not consistent until it ends"
        case .noUsableData: "the local disk has failed and no UpToDate peer is connected"
        case .requestsInFlight(let n): "\(n) client requests are still in flight"
        case .outOfSync(let bytes): "\(bytes) bytes are out of sync with the peer, which could not serve them: a resync of them started; demote once it ends"
        case .helloOut: "the link to the peer is exchanging state (this node's is on its way): a forced promotion would change it after the peer saw it; try again in a moment"
        }
    }
}

/// The kind of a write-like request.
public enum WriteKind: Sendable, Equatable {
    case write
    case trim
    /// Zeroes; `noHole` keeps the range allocated.
    case zeroes(noHole: Bool)
}

/// Where the bytes of a data transfer live; the node maps these to its buffers.
public enum BufferRef: Sendable, Equatable, Hashable {
    /// The payload of a client (NBD) write, or the buffer of a client read.
    case client(UInt64)
    /// The payload of a write received from the peer (by its write id).
    case peer(UInt64)
    /// A resync buffer slot.
    case resync(Int)
}

/// A local disk operation the node must carry out; the tag comes back with its result.
public struct LocalIO: Sendable, Equatable {
    public enum Operation: Sendable, Equatable {
        case write(kind: WriteKind, fua: Bool)
        case read
        case flush
    }

    public enum Tag: Sendable, Equatable, Hashable {
        case client(UInt64)
        case clientFlush(UInt64)
        case peerWrite(UInt64)
        case peerFlush(UInt64)
        case resyncRead(Int)
        case resyncWrite(Int)
        /// The source's flush before it ends a resync (see `ReplicaCore`, resync).
        case resyncFlush
        /// The target's flush that makes written resync runs durable before it acknowledges them.
        case resyncTargetFlush
    }

    public var tag: Tag
    public var operation: Operation
    public var offset: UInt64
    public var length: UInt32
    public var buffer: BufferRef?
}
