import TandemCore

/// The simulated geometry: small, so that writes, resync runs and activity-log extents collide
/// often.
enum SimLayout {
    static let blockBytes = 4096
    static let blocks = 512
    static let deviceBytes = UInt64(blocks * blockBytes)
    /// Largest client write (bounds the extents one write touches).
    static let writeBlocksMax = 16
    /// Activity log: 64 KiB extents (32 of them), 6 hot at most, so evictions are frequent.
    static let extentBytes = 64 << 10
    static let alCapacity = 6
    static let alRingSlots = ActivityLog.ringSlotsMin(capacity: alCapacity) + 2
    static let resourceName = "sim"
    static let transferLogEntriesMax = 16
    /// Undo chunks of 4 blocks (a write saves its neighbours too), 4 barriers kept per node.
    static let chunkBytes = 4 * blockBytes
    static let barriersKept = 4
    /// Chunks a rollback restores per step (the node: 256 per tick), so crashes fall mid-way.
    static let rollbackChunksPerStep = 16

    /// `fencing` as the node sets it: with a witness.
    static func configuration(nodeID: UInt8, fencing: Bool) -> ReplicaCore.Configuration {
        ReplicaCore.Configuration(
            nodeID: nodeID, deviceBytes: deviceBytes, granularityBytes: blockBytes, transferLogEntriesMax: transferLogEntriesMax,
            resyncInFlightMax: 4, resyncRunBytesMax: 4 * blockBytes, resyncBytesPerSecond: 8 << 20, fencing: fencing)
    }

    static func activityLog(nextSequence: UInt64) -> ActivityLog {
        ActivityLog(deviceBytes: deviceBytes, extentBytes: extentBytes, capacity: alCapacity, ringSlots: alRingSlots,
                    nextSequence: nextSequence, writeBytesMax: writeBlocksMax * blockBytes)
    }
}

/// What a node keeps on its metadata device: written synchronously and durably by the node
/// (as `ReplicatedNode` does with pwrite + fdatasync), so a crash never tears it here.
struct SimMetadata {
    var uuids: GenerationUUIDs
    var flags: Superblock.Flags
    var bitmap: DirtyBitmap
    /// The activity-log ring, `alRingSlots` transactions of 4 KiB, as `ActivityLog.encode` wrote them.
    var ring: [UInt8]

    init(uuids: GenerationUUIDs, flags: Superblock.Flags) {
        self.uuids = uuids
        self.flags = flags
        bitmap = DirtyBitmap(deviceBytes: SimLayout.deviceBytes, granularityBytes: SimLayout.blockBytes)
        ring = Array(repeating: 0, count: SimLayout.alRingSlots * ActivityLog.transactionBytes)
    }

    func recover() -> ActivityLog.Recovery {
        ring.withUnsafeBytes { raw in
            ActivityLog.recover(slots: (0..<SimLayout.alRingSlots).map { i in
                UnsafeRawBufferPointer(rebasing: raw[i * ActivityLog.transactionBytes..<(i + 1) * ActivityLog.transactionBytes])
            })
        }
    }
}

/// A demotion the node runs on its own (deposed by the witness): its requests finish, then a
/// flush of both sides, then `ReplicaCore.demote`.
enum Demotion {
    case draining
    case flushing
}

/// One node: the core, its disk, its metadata, and the state `ReplicatedNode` keeps around the
/// core (buffers by id, the activity log, the clients in flight).
struct SimNode {
    let id: Int
    var up = false
    /// Bumped at every crash or stop: events of an earlier life are ignored.
    var life = 0
    var core: ReplicaCore!
    /// The role the node had when it last stopped or crashed (an operator restarts a node in
    /// the role it had: `tandem up --primary` only where it was primary).
    var lastRole: PeerRole?
    var disk = SimDisk(blocks: SimLayout.blocks)
    var meta: SimMetadata
    /// The node's in-memory superblock flags (what `persistMetadata` starts from).
    var superblockFlags: Superblock.Flags = []
    var activityLog = SimLayout.activityLog(nextSequence: 1)
    /// The disk detached while primary and the activity log's extents were marked for it
    /// (`ReplicatedNode.logMarkedAtDetach`); reset at every start.
    var logMarkedAtDetach = false
    var connection: Int?
    /// The undo store's files (they survive crashes; see `SimUndoStore`).
    var undo = SimUndoStore()

    // Barriers, as ReplicatedNode and CopyOnWrite keep them in memory (`--barriers`).
    var undoIndex = UndoIndex(geometry: SimUndoStore.geometry)
    var cow = CopyOnWriteQueue(readChunksMax: 4)
    var cowWrites: [UInt64: SimDisk.Op] = [:]
    var nextTicket: UInt64 = 1
    /// Records of the newest segment the sync in flight covers.
    var cowSyncRecords = 0
    /// Copy-on-write reads and the sync in flight (a clean stop finishes them).
    var cowReads: [UInt32: (firstChunk: UInt64, chunkCount: Int)] = [:]
    var cowSync: UInt64?
    /// The barrier the core asked to record, waiting for copy-on-write to be idle.
    var barrierToRecord: BarrierInfo?
    var rollbackRun: (id: UInt64, plan: RollbackPlan, next: Int)?
    /// This rollback restores slowly (seconds in all).
    var rollbackSlow = false
    /// With a witness, a rollback waiting for its record (`ReplicatedNode.rollbackAsking`): the
    /// barrier, whether the peer is asked (else the witness), and the peer's answer once it came.
    var rollbackAsking: (id: UInt64, viaPeer: Bool, peerAnswer: Bool?)?
    /// `ReplicatedNode.rollbackRecord`: it rolls back, or rolled back and its peer has not
    /// resynced from it; every state it reports to the witness says so.
    var rollbackRecord = false

    // Client side (primary), as ReplicatedNode: ids per process life, from 1.
    var nextClientID: UInt64 = 1
    /// Client id -> workload op key.
    var clients: [UInt64: Int] = [:]
    /// Workload op keys waiting for room in the activity log, in order.
    var waitingForLog: [Int] = []
    /// Client id -> the connection on which the peer acknowledged it successfully.
    var peerAcked: [UInt64: Int] = [:]
    /// The flush a demotion waits for (ReplicatedNode's `internalFlushes`).
    var demotionFlushID: UInt64?
    /// A demotion the witness asked for (deposed), in progress.
    var demotion: Demotion?

    // The witness and quorum (`--witness`), as WitnessClient and ReplicatedNode keep them.
    var witnessConn: Int?
    /// The witness's hello arrived on the link.
    var witnessUp = false
    var witnessRequests: [UInt64: WitnessRequest] = [:]
    var nextWitnessRequest: UInt64 = 1
    /// The witness recorded that this primary writes without its peer.
    var fenced = false
    var fenceInFlight = false
    /// Client answers held until the peer is fenced: client id and the core's result.
    var held: [(id: UInt64, result: Int32)] = []
    var hadQuorum = true
    var promotionRequested = false
    var nextPromotionTry: UInt64 = 0

    // Buffers, keyed as ReplicatedNode keys them.
    /// Replicated writes received: write id -> block value.
    var peerValues: [UInt64: UInt64] = [:]
    /// Resync data received (target): resync id -> values.
    var resyncIn: [Int: [UInt64]] = [:]
    /// Resync reads done (source): slot -> values.
    var resyncOut: [Int: [UInt64]] = [:]

    // The re-entrant action loop (ReplicatedNode.beginActions/perform).
    var actions: [ReplicaCore.Action] = []
    var performing = false
    var ticks = 0

    // Ground truth for the checker.
    /// This node acknowledged a write the peer never acknowledged (it wrote without the peer):
    /// the peer lacks it, and it must start a generation the peer does not have. A write the
    /// peer acknowledged does not count, even if the link died before the answer: the peer wrote
    /// it (what its power loss may take from its cache is `crash`'s model), and the node had no
    /// way to know (`--failover --primary-disk-errors --double-faults --switchover` 1857, 5922).
    var wroteAlone = false
    /// This node submitted a client write to its disk without the peer (the write that starts a
    /// generation of its own), answered or not: its disk may hold data the peer lacks, in a
    /// generation the peer does not have. Both nodes so diverged is a split brain to the core
    /// too (as DRBD's new current UUID at the first write): a write submitted alone and never
    /// answered (the node killed just after its promotion) cannot be told from an answered one
    /// after a crash (`--failover --double-faults --overlapping-writes` 108010).
    var submittedAlone = false
    /// This node demoted after its flush failed on the disk it kept, and marked its activity
    /// log's extents: until the pair is in sync again its disk is the source of those blocks,
    /// with whatever its power loss keeps of them (`ReplicaCore.markLogExtentsAfterFailedDemotionFlush`).
    var demotedUnflushed = false
    /// This node stopped as primary after its final sync failed (`ReplicatedNode.stop`): it kept
    /// `wasPrimary`, and until the pair is in sync again its disk is the source of its log's
    /// extents, with whatever a power loss keeps of them.
    var stoppedUnflushed = false

    /// The pair is one copy again (in sync, or rolled back together): nothing is this node's
    /// alone any more.
    mutating func forgetDivergence() {
        wroteAlone = false
        submittedAlone = false
        demotedUnflushed = false
        stoppedUnflushed = false
    }

    init(id: Int, meta: SimMetadata) {
        self.id = id
        self.meta = meta
    }

    /// Forgets everything a process holds in memory.
    mutating func die() {
        up = false
        life += 1
        lastRole = core?.role
        core = nil
        connection = nil
        nextClientID = 1
        clients = [:]
        waitingForLog = []
        peerAcked = [:]
        demotionFlushID = nil
        demotion = nil
        witnessConn = nil
        witnessUp = false
        witnessRequests = [:]
        fenced = false
        fenceInFlight = false
        held = []
        hadQuorum = true
        promotionRequested = false
        nextPromotionTry = 0
        peerValues = [:]
        resyncIn = [:]
        resyncOut = [:]
        actions = []
        performing = false
        ticks = 0
        cow = CopyOnWriteQueue(readChunksMax: 4)
        cowWrites = [:]
        nextTicket = 1
        cowSyncRecords = 0
        cowReads = [:]
        cowSync = nil
        barrierToRecord = nil
        rollbackRun = nil
        rollbackSlow = false
        rollbackAsking = nil
        rollbackRecord = false
    }
}
