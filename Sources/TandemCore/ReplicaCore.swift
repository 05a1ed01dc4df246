/// The replication state machine of one node, sans I/O: events in (a client write, a local disk
/// completion, a peer message, the link going up or down, a tick), actions out (write locally,
/// send to the peer, answer the client, persist metadata). It never reads a clock, a socket or a
/// random number: the node supplies time and fresh identifiers in the events. The same code runs
/// in `tandem up` and in the simulator.
///
/// Protocol C (DRBD's): a client write is answered once it is done on the local disk and the
/// peer has acknowledged it as written on its disk. A client FLUSH is answered once the local
/// fdatasync and the peer's flush are both done; the peer's flush covers every write it received
/// before it, so writes the peer acknowledged stay in the transfer log until a flush covers them:
/// if the link drops first, they are marked out of sync (the peer may have lost them from a
/// volatile cache) and the next resync sends them again.
///
/// Status: the write path (both roles), flushes, epochs and barriers, the transfer log and link
/// loss are here and tested; the connect handshake (sync decision, bitmap exchange), resync,
/// verify and role changes are the next steps (see DEVELOPERS.md, "Replication: state of work").
public struct ReplicaCore {
    public struct Configuration: Sendable {
        public var nodeID: UInt8
        public var deviceBytes: UInt64
        public var granularityBytes: Int
        /// Writes acknowledged by the peer but not yet covered by a peer flush. When full, the
        /// primary sends a flush of its own to make room (bounded memory, bounded exposure).
        public var transferLogEntriesMax: Int
        /// Resync reads in flight at once (and runs sent but not yet acknowledged; at most
        /// `Limits.resyncRunsUnacknowledgedMax`, what a target accepts), and the largest range
        /// one covers.
        public var resyncInFlightMax: Int
        public var resyncRunBytesMax: Int
        /// Resync pace (bytes per second of `tick` time) while nothing else uses the disk, and
        /// while application I/O competes with it (as DRBD's c-max-rate and c-min-rate).
        public var resyncBytesPerSecond: UInt64
        public var resyncBytesPerSecondMin: UInt64
        /// What a connect that finds a split brain does (`after-split-brain`).
        public var splitBrainPolicy: SplitBrainPolicy
        /// A witness fences the peer: after a link loss the node holds client answers until the
        /// witness has recorded the peer as outdated, then calls `startGenerationWithoutPeer`;
        /// without quorum those answers fail. So the link loss alone starts no generation.
        public var fencing = false

        public init(nodeID: UInt8, deviceBytes: UInt64, granularityBytes: Int = 4096, transferLogEntriesMax: Int = Limits.transferLogEntriesMax,
                    resyncInFlightMax: Int = Limits.resyncRunsUnacknowledgedMax, resyncRunBytesMax: Int = 1 << 20, resyncBytesPerSecond: UInt64 = 256 << 20,
                    resyncBytesPerSecondMin: UInt64 = 10 << 20, splitBrainPolicy: SplitBrainPolicy = .disconnect, fencing: Bool = false) {
            self.splitBrainPolicy = splitBrainPolicy
            self.fencing = fencing
            precondition(transferLogEntriesMax > 0)
            precondition(resyncInFlightMax > 0 && resyncInFlightMax <= Limits.resyncRunsUnacknowledgedMax)
            precondition(resyncRunBytesMax >= granularityBytes && resyncRunBytesMax <= Limits.nbdRequestBytesMax)
            self.resyncInFlightMax = resyncInFlightMax
            self.resyncRunBytesMax = resyncRunBytesMax
            self.resyncBytesPerSecond = resyncBytesPerSecond
            self.resyncBytesPerSecondMin = min(resyncBytesPerSecondMin, resyncBytesPerSecond)
            self.nodeID = nodeID
            self.deviceBytes = deviceBytes
            self.granularityBytes = granularityBytes
            self.transferLogEntriesMax = transferLogEntriesMax
        }
    }

    /// What the node must do, in order.
    public enum Action: Sendable, Equatable {
        case submitLocal(LocalIO)
        /// A control message for the peer.
        case send(PeerMessage)
        /// A replicated write (`data`, `trim` or `zeroes`); a `data` payload comes from `buffer`.
        case sendWrite(PeerWrite, kind: WriteKind, buffer: BufferRef?)
        /// Resync data from `buffer` (source only).
        case sendResync(PeerResyncData, buffer: BufferRef)
        case completeClient(id: UInt64, result: Int32)
        case completeClientFlush(id: UInt64, result: Int32)
        /// Close the link (it will be re-established by the node unless `standalone`).
        case dropLink(LinkDownReason)
        /// A state worth telling the operator (role, disk, link and sync state changes).
        case stateChanged(ReplicaStatus)
        /// Secondary: every replicated write before the barrier is on the disk and none after
        /// it has started: record the barrier (its undo segment), then call `barrierRecorded`.
        case recordBarrier(BarrierInfo)
        /// A client write no longer needs its activity-log extents (`ActivityLog.endWrite`): it
        /// is answered, and the peer's copy is durable (a peer flush covered it) or the range is
        /// marked out of sync (the peer failed it, never got it, or the link went down). Once
        /// per client write, after its `completeClient` or later; until then a crash of this
        /// primary must resync the write's extents, as the peer may still lose it from a
        /// volatile cache (DRBD keeps the extent until the barrier ack).
        case writeSettled(offset: UInt64, length: UInt32)
        /// The peer answered `noticeRollback` (true: it outdated itself, persisted, before it
        /// replied), or the link went down first (false), or it refused (false: it is primary).
        case rollbackNoticeAnswered(accepted: Bool)
    }

    public let configuration: Configuration
    public private(set) var role: PeerRole
    public private(set) var disk: PeerDiskState
    public private(set) var peerDisk: PeerDiskState?
    /// The peer's role while the link is up.
    public private(set) var peerRole: PeerRole?
    /// The last connect found a split brain (or unrelated data); cleared by the next good connect.
    public private(set) var splitBrain = false
    /// The operator gave this node's changes up (`tandem connect --discard-my-data`): sent in the
    /// next hello, cleared once a connect has made this node the sync target.
    public private(set) var discardMyData = false
    public private(set) var link: LinkState = .connecting
    public private(set) var sync: SyncState = .established
    public private(set) var uuids: GenerationUUIDs
    public private(set) var bitmap: DirtyBitmap
    /// This node's superblock flags that the sync decision needs (the node keeps them current;
    /// never `wasPrimary`, which the node keeps).
    public var localFlags: Superblock.Flags
    /// What the last connect decided, and by which rule (for status and the log).
    public private(set) var lastDecision: (decision: GenerationUUIDs.SyncDecision, rule: GenerationUUIDs.SyncRule)?
    /// Why the last connect ended in `roleConflict`, until a connect gets past the role check or
    /// this node changes role: an operator must act (DRBD's `rr-conflict disconnect`).
    public private(set) var roleConflict: RoleConflict?

    // MARK: Connect state

    /// The resync role the connect decided, waiting for the peer's bitmap.
    private var pendingSync: SyncState?
    /// The link went down while this side was, or was about to be, the resync source (`sync`
    /// and `pendingSync` end with the link): the peer may be left an interrupted target,
    /// Inconsistent, that only this disk can resync. Until the next connect decides again.
    private var sourceWhenTheLinkDropped = false
    /// The node sent its hello on a new link (`helloSent`) and the peer's has not come yet: the
    /// peer decides on the UUIDs that hello carried, so no generation starts until this side has
    /// decided too (`clientWrite` holds the answers).
    private var helloOut = false
    /// The lower node id chose the UUID after a skipped initial sync; the other adopts it.
    private var awaitingSkippedSyncUUID = false
    /// The peer's current UUID as of the connect: what a resync target adopts at the end.
    private var peerCurrentUUID: UInt64 = 0
    /// A replicated write or flush failed on this disk while it was not detached for it (a
    /// resync target): the resync's end leaves it without that write.
    private var replicationFailedDuringResync = false

    // MARK: Resync state (source)

    private struct ResyncSlot {
        var offset: UInt64
        var length: UInt32
        /// The data was sent; a client write after this point follows it on the wire.
        var sent = false
        /// A client write touched the range before the data was sent: the data is stale.
        var stale = false
        /// The range was marked out of sync after the data was sent (a client write that failed
        /// here, a transfer-log entry given up): the mark is newer than the data, so the ack
        /// must not clear it, and the run is copied again.
        var remarked = false
    }

    private var resyncSlots: [ResyncSlot?]
    /// Resync ids are this per-link random base plus slot + 1: a target may still be writing
    /// data of an earlier link when the same slot's next data arrives, and the two must not
    /// share an id (the tag of the write, and the node's buffer key).
    private var resyncIDBase: UInt64 = 0
    private static let resyncSlotMask: UInt64 = 0xFFFF
    private var resyncCursor = 0
    private var resyncBudget: Int64 = 0
    /// Application I/O since the last tick: the resync keeps to its competing pace.
    private var applicationIOSinceTick = false
    private var lastTickNanos: UInt64?
    /// Bytes the current resync has copied (for status and the note in the log).
    public private(set) var resyncedBytes: UInt64 = 0
    /// The source's first or final flush is on the disk, submitted during the link with this
    /// resync id base (a flush of an earlier link covers nothing read since).
    private var resyncFlushLink: UInt64?
    /// A flush submitted since this resync began has completed on the source: what it reads from
    /// now on is durable here, not only in a volatile cache (`pumpResync` reads nothing before).
    private var resyncSourceFlushed = false

    // MARK: Resync state (target)

    /// A resync run written here whose ack waits for a flush: the ack tells the source the run
    /// is durable (it clears its bits on it), and a completed write may still be in the cache.
    private struct HeldResyncAck {
        var id: UInt64
        var offset: UInt64
        var length: UInt32
    }

    /// Resync writes on the disk or queued (behind an overlapping write or a barrier), of any
    /// link: their ids key the node's payload buffers until they complete, so data arriving with
    /// one of them again must not reach the node's buffers.
    private var resyncWritesPending: Set<Int> = []
    /// Resync writes of the current link on the disk or queued, not yet completed: id -> 0, or
    /// the errno their ack must carry whatever the write's result (a flush failed meanwhile).
    /// Their acks are owed on this link; a write of an earlier link is acknowledged on none (its
    /// source kept the bits and copies the run again).
    private var resyncWritesOwed: [Int: UInt32] = [:]
    /// Acks of resync writes completed since the last target flush was submitted: the next one
    /// covers them.
    private var resyncAcksHeld: [HeldResyncAck] = []
    /// The acks the target flush in flight covers (what was held when it was submitted). Emptied
    /// when the link or the resync ends (the acks are dropped with the link), while the flush
    /// itself may still be on the disk: it then completes with nothing to send.
    private var resyncAcksFlushing: [HeldResyncAck] = []
    private var resyncTargetFlushInFlight = false

    // MARK: Ordering on the receiving side

    /// Writes on the local disk now (client writes on a primary; replicated and resync writes on
    /// a secondary), and those waiting for an overlapping earlier one: overlapping writes are
    /// applied in the order they arrived.
    private var appliedInFlight: [(tag: LocalIO.Tag, offset: UInt64, length: UInt32)] = []
    private var appliedWaiting: [LocalIO] = []

    // MARK: Primary state

    private struct ClientWrite {
        var offset: UInt64
        var length: UInt32
        var localDone = false
        var localResult: Int32 = 0
        var peerPending = false
        var peerResult: Int32 = 0
        /// The link sequence of the data message (for transfer-log coverage by flushes).
        var linkSequence: UInt64 = 0
        /// Its entry is in the transfer log: it settles when a peer flush covers it.
        var awaitingPeerFlush = false
        /// Written while this node's hello was out: answered once the connect decided
        /// (`releaseWritesHeldForHandshake`), in a generation of its own if still without the peer.
        var heldForHandshake = false
    }

    private struct ClientFlush {
        var localDone = false
        var localResult: Int32 = 0
        var peerPending = false
        var peerResult: Int32 = 0
    }

    private struct TransferLogEntry {
        var offset: UInt64
        var length: UInt32
        var linkSequence: UInt64
        /// The client write's id (it may still be in flight: the peer can ack before the disk).
        var id: UInt64
    }

    private var writes: [UInt64: ClientWrite] = [:]
    private var flushes: [UInt64: ClientFlush] = [:]
    private var transferLog: FixedQueue<TransferLogEntry>
    /// Sequence numbers of data messages sent on the current link.
    private var linkSequence: UInt64 = 0
    /// Peer flushes in flight: flush id -> data messages it covers (sequence below this).
    private var peerFlushCoverage: [UInt64: UInt64] = [:]
    /// Ids of flushes the core sent on its own (to trim the transfer log), not a client's.
    private var ownFlushID: UInt64 = 1 << 63
    private var epoch: UInt64 = 1
    /// A client write completed since the last barrier: the next write opens a new epoch.
    private var epochClosePending = false

    // MARK: Secondary state

    /// Peer writes being written locally: write id -> arrival number.
    private var peerWritesInFlight: [UInt64: UInt64] = [:]
    private var peerArrivals: UInt64 = 0
    /// Arrivals before the current link came up: writes of an earlier link (still on the disk,
    /// or held behind a barrier) are not acknowledged on this one, whose primary never sent them
    /// (after a restart it may reuse their ids).
    private var peerArrivalsBeforeLink: UInt64 = 0
    /// Peer flushes waiting for earlier writes: (flush id, arrivals before it).
    private var peerFlushesWaiting: [(id: UInt64, before: UInt64)] = []
    /// Barriers waiting for earlier writes: (epoch, arrivals before it, writes in the epoch).
    private var barriersWaiting: [(epoch: UInt64, before: UInt64, writes: UInt32)] = []
    /// Peer flushes submitted to the local disk and not yet completed (of any link).
    private var peerFlushesOnDisk = 0
    /// Point-in-time barriers from the primary, oldest first: the writes that arrived before
    /// each (`before`) finish first, those after it wait in `held` until it is recorded.
    private var snapshots: [(info: BarrierInfo, before: UInt64, held: [LocalIO], recording: Bool)] = []
    private var peerEpochWrites: UInt32 = 0
    /// A replicated write failed on this disk since the link came up: the block stays wrong
    /// until the resync of the next connect, so no barrier is recorded meanwhile (a resync that
    /// ends meanwhile may have cleared this side's mark; the primary learns it only at the ack).
    private var peerWriteFailedOnLink = false

    public init(configuration: Configuration, role: PeerRole, disk: PeerDiskState, uuids: GenerationUUIDs, bitmap: DirtyBitmap, flags: Superblock.Flags = [.consistent]) {
        precondition(bitmap.deviceBytes == configuration.deviceBytes, "bitmap of another size")
        self.configuration = configuration
        // `wasPrimary` is the node's own bookkeeping: it sets it while primary and clears it at a
        // demotion or a clean stop, and persists the core's flags with its own. Kept here, a flag
        // the node cleared would come back at the next persist, and a later crash as secondary
        // would mark stale hot extents and make this node the sync source over newer data.
        self.localFlags = flags.subtracting(.wasPrimary)
        self.role = role
        self.disk = disk
        self.uuids = uuids
        self.bitmap = bitmap
        transferLog = FixedQueue(capacity: configuration.transferLogEntriesMax)
        resyncSlots = Array(repeating: nil, count: configuration.resyncInFlightMax)
        resyncWritesOwed.reserveCapacity(Limits.resyncRunsUnacknowledgedMax)
        resyncWritesPending.reserveCapacity(Limits.resyncRunsUnacknowledgedMax * 2)
        resyncAcksHeld.reserveCapacity(Limits.resyncRunsUnacknowledgedMax)
        resyncAcksFlushing.reserveCapacity(Limits.resyncRunsUnacknowledgedMax)
        writes.reserveCapacity(Limits.nbdRequestsInFlightMax * 4)
        peerWritesInFlight.reserveCapacity(Limits.nbdRequestsInFlightMax * 4)
    }

    /// Whether client writes go to the peer right now.
    public var replicating: Bool {
        link == .connected && (sync == .established || sync == .syncSource) && peerDisk != nil && peerDisk != .failed
    }

    public var status: ReplicaStatus {
        ReplicaStatus(
            role: role, disk: disk, peerDisk: peerDisk, peerRole: peerRole, link: link, sync: sync, splitBrain: splitBrain,
            roleConflict: roleConflict, outOfSyncBytes: bitmap.outOfSyncBytes, writesInFlight: writes.count, transferLogEntries: transferLog.count)
    }

    // MARK: Client requests (primary)

    /// A client write (WRITE, TRIM or WRITE_ZEROES) whose payload the node holds as
    /// `.client(id)`. `id` must be unique among writes and flushes in flight.
    public mutating func clientWrite(id: UInt64, offset: UInt64, length: UInt32, kind: WriteKind, fua: Bool, into actions: inout [Action]) {
        applicationIOSinceTick = true
        precondition(role == .primary, "client write on a secondary")
        precondition(writes[id] == nil, "duplicate client write id \(id)")
        var write = ClientWrite(offset: offset, length: length)
        let payload: BufferRef? = kind == .write ? .client(id) : nil
        if writeStartsGeneration {
            if helloOut {
                // Our hello is on its way with the peer's generation as ours, and the peer
                // decides on it: a generation started now would be one it never saw, and it
                // could make itself the source over this write (`--failover --overlapping-writes
                // --double-faults --primary-disk-errors` 91108538). The write goes to the disk,
                // marked out of sync, and its answer waits until this side has decided on the
                // same two hellos.
                write.heldForHandshake = true
            } else {
                // New data from here on belongs to a generation the peer does not have; the node
                // persists it (on this state change) before it submits the write. Also during a
                // handshake: the resync that follows copies these blocks, and the target adopts
                // the generation the source announces at its end.
                startGenerationFromSpare(into: &actions)
            }
        }
        if disk == .failed {
            // Detached: no local copy (EIO), so the peer's answer is the client's. The local disk
            // lacks the range: resynced into it once it is attached again.
            write.localDone = true
            write.localResult = -5
            markOutOfSync(offset: offset, length: UInt64(length))
        } else {
            // Overlapping writes reach the local disk in the order they reach the peer's (which
            // applies in arrival order), or the two copies could end with different data.
            applyAfterBarriers(LocalIO(tag: .client(id), operation: .write(kind: kind, fua: fua), offset: offset, length: length, buffer: payload), into: &actions)
        }
        if sync == .syncSource { markResyncStale(offset: offset, length: length) }
        if replicating {
            if epochClosePending {
                actions.append(.send(.barrier(epoch: epoch)))
                epoch &+= 1
                epochClosePending = false
            }
            linkSequence += 1
            write.linkSequence = linkSequence
            write.peerPending = true
            var flags: UInt16 = fua ? PeerFlags.Write.fua : 0
            if case .zeroes(noHole: true) = kind { flags |= PeerFlags.Write.noHole }
            actions.append(.sendWrite(PeerWrite(id: id, offset: offset, length: length, epoch: epoch, flags: flags), kind: kind, buffer: payload))
        } else {
            // The peer will need this range: it is out of sync from now on.
            markOutOfSync(offset: offset, length: UInt64(length))
        }
        writes[id] = write
        if write.localDone && !write.peerPending { finishWriteIfDone(id, into: &actions) }
    }

    /// A client FLUSH: durable on both sides before it is answered.
    public mutating func clientFlush(id: UInt64, into actions: inout [Action]) {
        precondition(flushes[id] == nil, "duplicate client flush id \(id)")
        var flush = ClientFlush()
        if disk == .failed {
            // Detached: only the peer's flush counts, and without the peer nothing is durable.
            flush.localDone = true
            flush.localResult = -5
            if !replicating { flush.peerResult = -5 }
        } else {
            actions.append(.submitLocal(LocalIO(tag: .clientFlush(id), operation: .flush, offset: 0, length: 0, buffer: nil)))
        }
        if replicating {
            flush.peerPending = true
            peerFlushCoverage[id] = linkSequence + 1
            actions.append(.send(.flush(id: id)))
        }
        flushes[id] = flush
        finishFlushIfDone(id, into: &actions)
    }

    /// The local disk failed a read: detach it, and tell the node whether the peer can serve
    /// reads instead (UpToDate and connected).
    public mutating func localReadFailed(into actions: inout [Action]) -> Bool {
        detachLocalDisk(into: &actions)
        return link == .connected && peerDisk == .upToDate
    }

    /// Whether reads must go to the peer (the local disk is detached).
    /// Secondary: peer writes received and not yet completed on the local disk.
    public var peerWritesApplying: Int { peerWritesInFlight.count }

    /// Secondary: peer requests held now (writes, flushes and barriers not yet done); at most
    /// `Limits.peerRequestsPendingMax`.
    public var peerRequestsPending: Int { peerWritesInFlight.count + peerFlushesWaiting.count + peerFlushesOnDisk + barriersWaiting.count }

    /// Whether another peer request fits. The node stops reading the link while this is false
    /// (back-pressure, see `Limits.peerRequestsPendingMax`) and reads again once it is true.
    public var acceptsPeerRequests: Bool { peerRequestsPending < Limits.peerRequestsPendingMax }

    /// A peer request past the bound: only a node that kept reading meets it.
    private mutating func refusePeerRequestPastBound(_ what: String, into actions: inout [Action]) -> Bool {
        guard !acceptsPeerRequests else { return false }
        protocolError("\(what) past \(Limits.peerRequestsPendingMax) peer requests pending (writes, flushes, barriers)", into: &actions)
        return true
    }

    public var readsFromPeer: Bool { Self.readsFromPeer(disk: disk, link: link, peerDisk: peerDisk) }

    /// The rule behind `readsFromPeer`, from the three states it reads. A class that keeps the
    /// core in a stored property calls this with the fields: reading a computed property of the
    /// core there copies the whole core first (retaining and releasing everything it holds),
    /// which the node did once per NBD READ.
    @inlinable public static func readsFromPeer(disk: PeerDiskState, link: LinkState, peerDisk: PeerDiskState?) -> Bool {
        disk == .failed && link == .connected && peerDisk == .upToDate
    }

    // MARK: Local completions

    public mutating func localCompleted(_ tag: LocalIO.Tag, result: Int32, into actions: inout [Action]) {
        switch tag {
        case .client(let id):
            guard var write = writes[id] else { preconditionFailure("completion of unknown client write \(id)") }
            precondition(!write.localDone, "client write \(id) completed twice")
            write.localDone = true
            write.localResult = result
            writes[id] = write
            applied(tag, into: &actions)
            finishWriteIfDone(id, into: &actions)
        case .clientFlush(let id):
            guard var flush = flushes[id] else { preconditionFailure("completion of unknown flush \(id)") }
            flush.localDone = true
            flush.localResult = flushResult(result)
            flushes[id] = flush
            finishFlushIfDone(id, into: &actions)
        case .peerWrite(let id):
            guard let arrival = peerWritesInFlight.removeValue(forKey: id) else { preconditionFailure("completion of unknown peer write \(id)") }
            if arrival > peerArrivalsBeforeLink { actions.append(.send(.writeAck(id: id, result: UInt32(bitPattern: -min(result, 0))))) }
            if result < 0 { peerWriteFailedOnLink = true }
            if result < 0, let failed = appliedInFlight.first(where: { $0.tag == tag }) {
                // This copy lacks the write from now on, whatever the primary remembers.
                markOutOfSync(offset: failed.offset, length: UInt64(failed.length))
                failWrittenResyncRuns(overlapping: failed.offset, failed.length, into: &actions)
                detachAfterReplicationError(into: &actions)
            }
            applied(tag, into: &actions)
            startWaitingPeerFlushes(into: &actions)
            recordSnapshotsIfReady(into: &actions)
        case .peerFlush(let id):
            precondition(peerFlushesOnDisk > 0, "completion of a peer flush never submitted")
            peerFlushesOnDisk -= 1
            actions.append(.send(.flushAck(id: id, result: UInt32(bitPattern: -min(result, 0)))))
            if result < 0 {
                failUnacknowledgedResyncRuns(code: UInt32(bitPattern: -result), into: &actions)
                detachAfterReplicationError(into: &actions)
            }
        case .resyncRead(let slot):
            resyncReadCompleted(slot, result: result, into: &actions)
        case .resyncWrite(let id):
            resyncWriteCompleted(id, result: result, into: &actions)
        case .resyncFlush:
            resyncFlushCompleted(result: result, into: &actions)
        case .resyncTargetFlush:
            resyncTargetFlushCompleted(result: result, into: &actions)
        }
    }

    private mutating func finishWriteIfDone(_ id: UInt64, into actions: inout [Action]) {
        guard let write = writes[id], write.localDone, !write.peerPending, !write.heldForHandshake else { return }
        writes[id] = nil
        var result = write.localResult
        let peerHasIt = write.peerResult == 0 && write.linkSequence != 0
        let peerCoversIt = peerHasIt && peerDisk == .upToDate && pendingSync != .syncSource
        if result < 0 && peerCoversIt && disk != .failed && resyncDoneUnconfirmed { detachWhenResyncDoneConfirmed = true }
        if result < 0 && peerHasIt && (disk == .failed || (peerCoversIt && !resyncDoneUnconfirmed)) {
            // The peer has the data and is a full copy: the client loses nothing (the local disk
            // is detached). A peer still being resynced is not: detaching would leave no good copy.
            // Nor is one this side is about to resync (a verify's or a connect's handshake: its
            // hello said UpToDate, but the blocks marked here are copied from this disk): the
            // detached disk would still become the source at `bitmapDone` and send its stale
            // copy of this write's blocks over the peer's good one (`--witness --switchover
            // --primary-disk-errors --double-faults --overlapping-writes` 103109819). Nor is one
            // that has not yet confirmed the end of this side's resync (`resyncDoneUnconfirmed`).
            result = 0
            markOutOfSync(offset: write.offset, length: UInt64(write.length))
            detachLocalDisk(into: &actions)
        } else if result < 0 || disk == .failed {
            // Failed, or done on a disk detached meanwhile: a detached disk is never flushed
            // again, so what landed there may not survive a power loss. Resynced into it once
            // it is attached again.
            markOutOfSync(offset: write.offset, length: UInt64(write.length))
            if disk == .failed && !peerHasIt && result == 0 {
                // Done before the detach, but the peer never confirmed it: only the detached disk
                // holds it, and that disk is a resync target now, overwritten from the peer. As
                // for a write that comes after the detach, the peer's answer is the client's
                // (`--witness --failover --double-faults --overlapping-writes` 20824: the success
                // counted as a write without the peer, and the peer promoted later wrote too).
                result = -5
            }
        }
        epochClosePending = true
        actions.append(.completeClient(id: id, result: result))
        if !write.awaitingPeerFlush { actions.append(.writeSettled(offset: write.offset, length: write.length)) }
    }

    private mutating func finishFlushIfDone(_ id: UInt64, into actions: inout [Action]) {
        guard let flush = flushes[id], flush.localDone, !flush.peerPending else { return }
        flushes[id] = nil
        if flush.localResult < 0 && flush.peerResult == 0 && peerIsFullCopyButUnconfirmed { detachWhenResyncDoneConfirmed = true }
        if flush.localResult < 0 && flush.peerResult == 0 && peerIsFullCopy {
            // The writes this flush covers may not be on the local disk, and the peer's flush
            // made every write it got durable there: handled as a failed write (and as
            // `localSyncFailed`), the disk detaches and the peer's flush answers. Kept, the disk
            // stayed UpToDate without them, and a demotion (the switchover's flush) handed the
            // pair a copy that lost them at its next power loss (`--witness --switchover
            // --primary-disk-errors` 103288). Without the peer's flush (it failed, or the link
            // went down first) the local disk may hold the only copy: it stays, and the client
            // hears of the error (109210, with a detach at the local error alone).
            detachLocalDisk(into: &actions)
        }
        // A peer that failed its flush is out of sync, not the client's problem; a detached local
        // disk leaves the peer's answer as the only one.
        actions.append(.completeClientFlush(id: id, result: disk == .failed ? flush.peerResult : flush.localResult))
    }

    /// The local disk failed: detached (DRBD's `on-io-error detach`). It misses what is written
    /// from now on, so it is no longer a consistent image: persisted as a resync target, it comes
    /// back Inconsistent after a restart (the node's attach) and is resynced from the peer. Until
    /// then it takes no part in sync decisions, starts no generation, and cannot be promoted
    /// without an UpToDate peer.
    private mutating func detachLocalDisk(into actions: inout [Action]) {
        guard disk != .failed else { return }
        disk = .failed
        localFlags.remove(.consistent)
        localFlags.remove(.outdated)
        localFlags.insert(.resyncTarget)
        announceState(into: &actions)
    }

    /// Secondary: a replicated write or flush failed on the local disk. An UpToDate copy that
    /// lacks an acknowledged write must not stay UpToDate (a failover would promote it without
    /// the write): detach. A resync target is Inconsistent already; the source copies the range
    /// again.
    private mutating func detachAfterReplicationError(into actions: inout [Action]) {
        guard role == .secondary, disk != .failed else { return }
        guard sync == .established, disk != .inconsistent else {
            // The source may end the resync before the failed write's ack reaches it (it marks
            // the range then, too late for this link): `resyncDone` must not make this copy
            // UpToDate without it.
            replicationFailedDuringResync = true
            return
        }
        detachLocalDisk(into: &actions)
    }

    /// A sync of the local disk that no request waits for failed (the node's resync checkpoint,
    /// the sync before an activity-log transaction evicts extents, a resync source's flush).
    /// Linux reports a writeback error to one fsync per open file description: this one took
    /// the error that a replicated flush, a resync target flush or a client flush would
    /// otherwise have reported, and a write completed since the last good sync may not be on
    /// the disk. So it is handled as theirs would have been:
    /// - a secondary as a failed replicated flush: every resync run not yet acknowledged fails,
    ///   and the disk detaches (a resync target at the resync's end), unless it holds writes
    ///   its peer lacks (`holdsWritesThePeerLacks`): detached, no copy would hold them, so it
    ///   keeps its disk as a primary whose peer is no full copy does;
    /// - a primary whose peer is a full copy as a failed write: the disk detaches and the peer
    ///   answers reads (DRBD's `on-io-error detach`);
    /// - any other primary keeps its disk (detached, it would serve reads from a disk that no
    ///   longer gets the writes, with no full copy to read instead), and its next client flush
    ///   reports the error, as the kernel would have.
    /// Returns whether the disk was detached.
    @discardableResult
    public mutating func localSyncFailed(result: Int32, into actions: inout [Action]) -> Bool {
        precondition(result < 0, "a failed sync carries an errno")
        guard disk != .failed else { return true }
        if role == .secondary {
            failUnacknowledgedResyncRuns(code: UInt32(min(-Int64(result), Int64(PeerProtocol.resultMax))), into: &actions)
            if !holdsWritesThePeerLacks { detachAfterReplicationError(into: &actions) }
        } else if peerIsFullCopy {
            detachLocalDisk(into: &actions)
        } else {
            if peerIsFullCopyButUnconfirmed { detachWhenResyncDoneConfirmed = true }
            writebackErrorPending = result
        }
        return disk == .failed
    }

    /// A primary whose peer holds every block (connected, in sync, UpToDate, nothing marked):
    /// its local disk can detach after an error and the peer serve.
    private var peerIsFullCopy: Bool { peerHoldsEveryBlock && !resyncDoneUnconfirmed }

    /// Connected, in sync and UpToDate as far as this side knows; a full copy once the target
    /// of this side's last resync has also confirmed its end.
    private var peerHoldsEveryBlock: Bool {
        role == .primary && link == .connected && sync == .established && peerDisk == .upToDate && bitmap.setBitCount == 0
    }

    /// The peer would be a full copy but for that confirmation: a local error now detaches the
    /// disk only once it comes (`detachWhenResyncDoneConfirmed`).
    private var peerIsFullCopyButUnconfirmed: Bool { peerHoldsEveryBlock && resyncDoneUnconfirmed }

    /// A resync this side was the source of ended (`resyncDone` sent) and the target has not yet
    /// said it is UpToDate (its `stateChange` after `resyncDone`). Until then the peer counts as
    /// UpToDate for everything but one decision: detaching this disk for its copy. `resyncDone`
    /// may be lost with the link, leaving the target Inconsistent; a source that detached at a
    /// local error in that window left two Inconsistent disks, though the target held every
    /// acknowledged write (`--switchover --primary-disk-errors --overlapping-writes --barriers`
    /// 320004187, 320013541). Counting the peer Inconsistent for everything in that window
    /// instead broke the generation and witness rules (split brains undetected).
    private var resyncDoneUnconfirmed = false
    /// A local error in that window that would have detached the disk for the peer's copy: the
    /// client got the error, and the disk detaches once the target confirms (a link loss first
    /// keeps it, and the next connect resyncs the marked blocks from it).
    private var detachWhenResyncDoneConfirmed = false

    /// A consistent disk that holds writes its peer lacks: it wrote since the generation its
    /// bitmap tracks (the peer's: a bitmap UUID), or it is, or is about to be, the resync source,
    /// or was when the link dropped (`sourceWhenTheLinkDropped`). The peer is no full copy then,
    /// whether or not the link is up: a secondary source whose flush failed just after its link
    /// dropped, its peer an interrupted resync target, detached the only copy of the newest data
    /// and left a pair that neither a promotion nor a resync could bring back (`--witness
    /// --barriers --failover` 102100484, a bitmap UUID; `--failover --double-faults
    /// --primary-disk-errors --overlapping-writes` 195654 and 199606, a crashed primary, the
    /// source of its hot extents in the peer's own generation: no bitmap UUID, only the source
    /// role, which the link loss had ended).
    private var holdsWritesThePeerLacks: Bool {
        disk != .inconsistent
            && (uuids.bitmap != 0 || sync == .syncSource || pendingSync == .syncSource || sourceWhenTheLinkDropped)
    }

    /// A writeback error a sync of no request took (`localSyncFailed`), for the next local flush
    /// of a primary to report: 0 or -errno.
    private var writebackErrorPending: Int32 = 0

    /// The result of a local flush of a primary, with a writeback error that an earlier sync took.
    private mutating func flushResult(_ result: Int32) -> Int32 {
        guard result >= 0, writebackErrorPending < 0 else { return result }
        defer { writebackErrorPending = 0 }
        return writebackErrorPending
    }

    // MARK: Peer messages

    /// A replicated write arrived. True when it is accepted: a `data` payload is then the node's
    /// to keep as `.peer(id)` until the write completes (the node hands it over only now, so a
    /// write refused here never touches the buffer of one in flight). False when it breaks the
    /// protocol (a `dropLink` says why): the node releases its payload.
    @discardableResult
    public mutating func peerWrite(_ write: PeerWrite, kind: WriteKind, into actions: inout [Action]) -> Bool {
        guard role == .secondary else {
            protocolError("a replicated write arrived while primary", into: &actions)
            return false
        }
        guard peerWritesInFlight[write.id] == nil else {
            protocolError("duplicate write id \(write.id)", into: &actions)
            return false
        }
        if refusePeerRequestPastBound("write \(write.id)", into: &actions) { return false }
        guard Self.fits(offset: write.offset, length: write.length, deviceBytes: configuration.deviceBytes) else {
            protocolError("write \(write.id) at \(write.offset)+\(write.length) past the end of the device", into: &actions)
            return false
        }
        peerArrivals += 1
        peerWritesInFlight[write.id] = peerArrivals
        if write.epoch != epoch {
            epoch = write.epoch
            peerEpochWrites = 0
        }
        // Only reported back in `barrierAck`: a peer that never closes its epoch wraps it, no more.
        peerEpochWrites &+= 1
        let fua = write.flags & PeerFlags.Write.fua != 0
        let io = LocalIO(tag: .peerWrite(write.id), operation: .write(kind: kind, fua: fua), offset: write.offset, length: write.length, buffer: kind == .write ? .peer(write.id) : nil)
        if snapshots.isEmpty {
            apply(io, into: &actions)
        } else {
            // After a barrier that is not recorded yet: it must not reach the disk before.
            snapshots[snapshots.count - 1].held.append(io)
        }
        return true
    }

    /// Whether a range a peer names lies within the device (the codec has checked that
    /// `offset + length` does not overflow; checked again here, the core takes no such thing on
    /// trust).
    static func fits(offset: UInt64, length: UInt32, deviceBytes: UInt64) -> Bool {
        offset <= deviceBytes && UInt64(length) <= deviceBytes - offset
    }

    /// Submits a local write, or queues it behind an overlapping earlier one.
    private mutating func apply(_ io: LocalIO, into actions: inout [Action]) {
        let overlaps = { (o: UInt64, l: UInt32) in o < io.offset + UInt64(io.length) && io.offset < o + UInt64(l) }
        if appliedInFlight.contains(where: { overlaps($0.offset, $0.length) }) || appliedWaiting.contains(where: { overlaps($0.offset, $0.length) }) {
            appliedWaiting.append(io)
            return
        }
        appliedInFlight.append((io.tag, io.offset, io.length))
        actions.append(.submitLocal(io))
    }

    /// A local write finished: start queued writes no longer behind an overlapping one.
    private mutating func applied(_ tag: LocalIO.Tag, into actions: inout [Action]) {
        appliedInFlight.removeAll { $0.tag == tag }
        guard !appliedWaiting.isEmpty else { return }
        let waiting = appliedWaiting
        appliedWaiting.removeAll()
        for io in waiting { apply(io, into: &actions) }
    }

    /// A control message from the peer.
    public mutating func peerMessage(_ message: PeerMessage, into actions: inout [Action]) {
        switch message {
        case .data(let write, _):
            peerWrite(write, kind: .write, into: &actions)
        case .trim(let write):
            peerWrite(write, kind: .trim, into: &actions)
        case .zeroes(let write):
            peerWrite(write, kind: .zeroes(noHole: write.flags & PeerFlags.Write.noHole != 0), into: &actions)
        case .writeAck(let id, let code):
            guard var write = writes[id], write.peerPending else { return protocolError("ack of unknown write \(id)", into: &actions) }
            // Negated below: a result past any errno (the codec refuses it too) would trap.
            guard code <= PeerProtocol.resultMax else { return protocolError("write \(id) acknowledged with result \(code)", into: &actions) }
            write.peerPending = false
            write.peerResult = -Int32(bitPattern: code)
            write.awaitingPeerFlush = code == 0
            writes[id] = write
            if code == 0 {
                recordInTransferLog(TransferLogEntry(offset: write.offset, length: write.length, linkSequence: write.linkSequence, id: id), into: &actions)
            } else {
                // The peer could not write it: out of sync until a resync repairs it.
                markOutOfSync(offset: write.offset, length: UInt64(write.length))
            }
            finishWriteIfDone(id, into: &actions)
        case .flush(let id):
            if refusePeerRequestPastBound("flush \(id)", into: &actions) { return }
            peerFlushesWaiting.append((id, peerArrivals))
            startWaitingPeerFlushes(into: &actions)
        case .flushAck(let id, let code):
            guard code <= PeerProtocol.resultMax else { return protocolError("flush \(id) acknowledged with result \(code)", into: &actions) }
            guard let covered = peerFlushCoverage.removeValue(forKey: id) else { return protocolError("ack of unknown flush \(id)", into: &actions) }
            // A failed flush leaves the writes it covers maybe not durable on the peer: out of
            // sync from now on, as a link loss would leave them.
            while let head = transferLog.first, head.linkSequence < covered {
                settle(transferLog.pop()!, outOfSync: code != 0, into: &actions)
            }
            if var flush = flushes[id] {
                flush.peerPending = false
                flush.peerResult = -Int32(bitPattern: code)
                flushes[id] = flush
                finishFlushIfDone(id, into: &actions)
            }
        case .barrier(let closed):
            if refusePeerRequestPastBound("barrier \(closed)", into: &actions) { return }
            barriersWaiting.append((closed, peerArrivals, peerEpochWrites))
            startWaitingPeerFlushes(into: &actions)
        case .barrierAck:
            // Epoch bookkeeping only: durability comes from flushes (see the type's comment).
            break
        case .snapshot(let info):
            guard role == .secondary else { return protocolError("a point-in-time barrier arrived while primary", into: &actions) }
            guard snapshots.count < Limits.barriersRetainedMax else { return protocolError("too many barriers waiting", into: &actions) }
            snapshots.append((info, peerArrivals, [], false))
            recordSnapshotsIfReady(into: &actions)
        case .ping(let id):
            actions.append(.send(.pingAck(id: id)))
        case .bitmapChunk(let chunk):
            receivedBitmapChunk(chunk, into: &actions)
        case .bitmapDone(let totalBits, _):
            receivedBitmapDone(totalBits: totalBits, into: &actions)
        case .stateChange(let change):
            // The target's announcement after `resyncDone` (it sent nothing UpToDate before it).
            if change.diskState == .upToDate && resyncDoneUnconfirmed {
                resyncDoneUnconfirmed = false
                if detachWhenResyncDoneConfirmed && disk != .failed && role == .primary { detachLocalDisk(into: &actions) }
                detachWhenResyncDoneConfirmed = false
            }
            let changed = peerDisk != change.diskState || peerRole != change.role
            peerDisk = change.diskState
            peerRole = change.role
            if sync == .syncTarget { peerCurrentUUID = change.uuids.current }
            if change.diskState == .failed || change.diskState == .diskless {
                // The peer detached its disk: what it acknowledged but never flushed may be lost
                // with it, and nothing written from now on reaches it.
                while let entry = transferLog.pop() { settle(entry, outOfSync: true, into: &actions) }
            }
            if changed && !awaitingSkippedSyncUUID && !(change.role == .primary && role == .primary) {
                actions.append(.stateChanged(status))
            }
            if change.role == .primary && role == .primary {
                // Both promoted at once: neither may keep writing through this link.
                roleConflict = .twoPrimaries
                actions.append(.dropLink(.roleConflict))
                return
            }
            if awaitingSkippedSyncUUID {
                awaitingSkippedSyncUUID = false
                uuids = uuids.afterSkippedInitialSync(newCurrent: change.uuids.current)
                link = .connected
                // The node persists the adopted generation on this state change.
                actions.append(.stateChanged(status))
            }
            let rollingBack = change.flags & PeerFlags.State.rollingBack != 0
            if change.flags & PeerFlags.State.reply != 0 {
                if let pending = rollbackNoticeID, change.id == pending {
                    rollbackNoticeID = nil
                    actions.append(.rollbackNoticeAnswered(accepted: change.flags & PeerFlags.State.refused == 0))
                }
            } else if rollingBack && change.id != 0 {
                // The peer is about to roll back to a barrier and asks first: outdated, persisted
                // (the node writes the metadata on `stateChanged`, before it sends the reply
                // queued after it), so neither the witness nor an operator without force
                // promotes this node while the peer's image goes back. A primary refuses: the
                // peer must not roll back under it.
                var flags = PeerFlags.State.reply | PeerFlags.State.rollingBack
                if role == .secondary { peerRollsBack(into: &actions) } else { flags |= PeerFlags.State.refused }
                actions.append(.send(.stateChange(PeerStateChange(id: change.id, role: role, diskState: disk, flags: flags, uuids: Self.wire(uuids)))))
            }
        case .resyncData(let data, _):
            peerResyncData(data, into: &actions)
        case .resyncAck(let id, let offset, let length, let code):
            resyncAcked(id: id, offset: offset, length: length, code: code, into: &actions)
        case .resyncDone:
            resyncDone(into: &actions)
        case .disconnect(let reason, _):
            if reason == .splitBrain || reason == .unrelatedData {
                // The peer found it first (its hello decided before ours arrived): same verdict.
                // Only for the link it came on: after this side's own verdict took the link
                // down, a flag set now would outlive it and turn the next ordinary link loss
                // (after the split brain was resolved) into StandAlone for good.
                splitBrain = true
                if link == .connected || link == .handshaking { peerDisconnectedForSplitBrain = true }
            }
            if reason == .shutdown && peerRole == .primary && role == .secondary && disk == .upToDate {
                // The primary leaves on purpose and will write without us: our copy is now older
                // than the one that serves (DRBD's outdate on a graceful disconnect).
                disk = .outdated
                localFlags.insert(.outdated)
                actions.append(.stateChanged(status))
            }
            if reason == .rollback && role == .secondary {
                peerRollsBack(into: &actions)
            }
        case .pingAck, .hello, .resyncRequest, .verifyRequest, .verifyDigest:
            // Link management, resync and verify are handled by the node until they move here.
            break
        }
    }

    private mutating func recordInTransferLog(_ entry: TransferLogEntry, into actions: inout [Action]) {
        defer {
            // Half full: a flush of our own empties it before it overflows (an overflow marks
            // blocks out of sync that only the next connect resyncs).
            if transferLog.count >= max(1, transferLog.capacity / 2) { flushPeerToSettleWrites(into: &actions) }
        }
        if transferLog.isFull {
            // Make room: a flush of our own covers everything sent so far.
            ownFlushID += 1
            peerFlushCoverage[ownFlushID] = linkSequence + 1
            actions.append(.send(.flush(id: ownFlushID)))
            // Until it returns, the oldest entry is remembered in the bitmap instead.
            settle(transferLog.pop()!, outOfSync: true, into: &actions)
        }
        transferLog.push(entry)
    }

    /// A transfer-log entry leaves the log: durable on the peer (a flush covered it) or marked out
    /// of sync. Its write settles now, or when it completes if it is still in flight.
    private mutating func settle(_ entry: TransferLogEntry, outOfSync: Bool, into actions: inout [Action]) {
        if outOfSync { markOutOfSync(offset: entry.offset, length: UInt64(entry.length)) }
        if writes[entry.id]?.linkSequence == entry.linkSequence {
            writes[entry.id]!.awaitingPeerFlush = false
        } else {
            actions.append(.writeSettled(offset: entry.offset, length: entry.length))
        }
    }

    /// Asks the peer for a flush when acknowledged writes wait for one to settle and no flush in
    /// flight covers them all. The node calls this when a client write waits for room in the
    /// activity log: settled writes free extents, and the client may not flush for a while.
    public mutating func flushPeerToSettleWrites(into actions: inout [Action]) {
        guard replicating, transferLog.count > 0 else { return }
        let newest = transferLog[transferLog.count - 1].linkSequence
        guard !peerFlushCoverage.values.contains(where: { $0 > newest }) else { return }
        ownFlushID += 1
        peerFlushCoverage[ownFlushID] = linkSequence + 1
        actions.append(.send(.flush(id: ownFlushID)))
    }

    /// Asks the node to record the oldest barrier once every write that arrived before it is done.
    /// Only an UpToDate disk that failed no replicated write on this link holds the barrier's
    /// image then; otherwise the barrier is not kept here (its image would lack those writes,
    /// and a rollback to it would not be the point in time it names).
    private mutating func recordSnapshotsIfReady(into actions: inout [Action]) {
        guard let first = snapshots.first, !first.recording else { return }
        guard !peerWritesInFlight.values.contains(where: { $0 <= first.before }) else { return }
        snapshots[0].recording = true
        guard disk == .upToDate, !peerWriteFailedOnLink else { return barrierDone(into: &actions) }
        actions.append(.recordBarrier(first.info))
    }

    /// The node recorded the oldest barrier: the writes after it go to the disk now.
    public mutating func barrierRecorded(into actions: inout [Action]) {
        guard let first = snapshots.first, first.recording else { preconditionFailure("barrierRecorded without recordBarrier") }
        barrierDone(into: &actions)
    }

    private mutating func barrierDone(into actions: inout [Action]) {
        let first = snapshots.removeFirst()
        // The writes between this barrier and the next go now; later ones wait for the next.
        for io in first.held { apply(io, into: &actions) }
        recordSnapshotsIfReady(into: &actions)
    }

    /// Primary: a point-in-time barrier, placed in the replication stream after every write
    /// sent so far (so after every write already answered). False when the peer is not an
    /// UpToDate, connected secondary in sync that could keep it (blocks out of sync would be
    /// missing from its image; the secondary also declines one after a write failed there).
    public mutating func createBarrier(_ info: BarrierInfo, into actions: inout [Action]) -> Bool {
        guard role == .primary, link == .connected, sync == .established, peerDisk == .upToDate, bitmap.setBitCount == 0 else { return false }
        actions.append(.send(.snapshot(info)))
        return true
    }

    /// Starts peer flushes and acks barriers whose earlier writes are all done.
    private mutating func startWaitingPeerFlushes(into actions: inout [Action]) {
        let oldestInFlight = peerWritesInFlight.values.min() ?? UInt64.max
        while let first = peerFlushesWaiting.first, first.before < oldestInFlight {
            peerFlushesWaiting.removeFirst()
            peerFlushesOnDisk += 1
            actions.append(.submitLocal(LocalIO(tag: .peerFlush(first.id), operation: .flush, offset: 0, length: 0, buffer: nil)))
        }
        while let first = barriersWaiting.first, first.before < oldestInFlight {
            barriersWaiting.removeFirst()
            actions.append(.send(.barrierAck(epoch: first.epoch, writes: first.writes, result: 0)))
        }
    }

    private mutating func protocolError(_ why: String, into actions: inout [Action]) {
        actions.append(.dropLink(.protocolError(why)))
    }

    // MARK: Link

    /// The link is up and the peer's hello arrived: compare generations, then replicate, resync,
    /// or refuse (split brain, unrelated data, another size). `freshUUID` is a random value the
    /// node supplies in case this side must start a generation.
    public mutating func linkUp(peer hello: PeerHello, freshUUID: UInt64, into actions: inout [Action]) {
        // Whatever this side decides, the peer decides the same on the same two hellos.
        defer { releaseWritesHeldForHandshake(into: &actions) }
        // Acks owed on an earlier link are not owed on this one (its source starts afresh).
        dropResyncAcks()
        guard hello.deviceSizeBytes == configuration.deviceBytes else {
            link = .standalone
            actions.append(.dropLink(.sizeMismatch))
            actions.append(.stateChanged(status))
            return
        }
        peerLeftForRollback = false
        peerDisconnectedForSplitBrain = false
        resyncDoneUnconfirmed = false
        detachWhenResyncDoneConfirmed = false
        linkSequence = 0
        epoch = 1
        epochClosePending = false
        peerWriteFailedOnLink = false
        peerArrivalsBeforeLink = peerArrivals
        resyncIDBase = freshUUID & 0x3FFF_FFFF_FFFF_0000  // fits an Int: the node keys buffers by id
        peerDisk = hello.diskState
        peerRole = hello.role
        sync = .established
        pendingSync = nil
        sourceWhenTheLinkDropped = false
        awaitingSkippedSyncUUID = false
        peerCurrentUUID = hello.uuids.current
        // What failed on an earlier link is marked in the bitmap this connect exchanges.
        replicationFailedDuringResync = false
        if disk == .failed || hello.diskState == .failed || hello.diskState == .diskless {
            return connectWithDetachedDisk(peer: hello, into: &actions)
        }
        // Only what the hello carries counts on both sides: `wasPrimary` is the node's own
        // bookkeeping (turned into `crashedPrimary` at attach); deciding on it here would make
        // the two sides' decisions differ (both sync source).
        var result = GenerationUUIDs.decideWithRule(
            local: uuids, peer: Self.uuids(of: hello), localFlags: localFlags.subtracting(.wasPrimary), peerFlags: Self.flags(of: hello),
            localMarked: bitmap.setBitCount > 0, peerMarked: hello.outOfSyncBits > 0,
            localWinsTie: configuration.nodeID < hello.nodeID)
        if result.decision == .splitBrain, let resolved = resolveSplitBrain(rule: result.rule, peer: hello) {
            result.decision = resolved
        }
        if result.rule == .equalCurrents, result.decision == .becomeSource || result.decision == .becomeTarget, role != hello.role {
            // Same generation and one side crashed as primary: its hot extents are copied, but
            // a live primary (which holds every write it answered) stays the source; the other
            // side, secondary now, is the target. Both sides see the same two roles.
            result.decision = role == .primary ? .becomeSource : .becomeTarget
        }
        lastDecision = result
        splitBrain = result.decision == .splitBrain || result.decision == .unrelatedData
        let makesTarget = [.becomeTarget, .fullSyncAsTarget].contains(result.decision)
        if !splitBrain && ((role == .primary && hello.role == .primary) || (role == .primary && makesTarget)) {
            // Two primaries, or a primary whose data the peer would overwrite under its clients:
            // one of them must demote first (peer.md 4.1, roleConflict). The link is retried, so
            // it connects once one has demoted (a deposed primary does so by itself).
            roleConflict = hello.role == .primary ? .twoPrimaries : .peerHoldsNewerData
            link = .connecting
            peerDisk = nil
            peerRole = nil
            actions.append(.dropLink(.roleConflict))
            actions.append(.stateChanged(status))
            return
        }
        roleConflict = nil
        if makesTarget { discardMyData = false }
        switch result.decision {
        case .noSync:
            link = .connected
            // The generations match, but blocks may be marked out of sync on either side with no
            // generation to say so: writes of a primary that started disconnected, or the
            // transfer log of a primary that lost its link and then demoted without writing.
            // Copy the union as a verify's marks are copied: from the primary (a primary is
            // never a target), or between secondaries from the side that marked them (the lower
            // node id if both did). The other side sends its own bitmap (below, or when the
            // primary's comes).
            let mine = bitmap.setBitCount > 0, theirs = hello.outOfSyncBits > 0
            let source = role == .primary ? mine || theirs
                : hello.role != .primary && mine && (!theirs || configuration.nodeID < hello.nodeID)
            // The same rule from the peer's side, between secondaries: a side the peer's marks
            // make the target is one from now on, not when the peer's bitmap arrives. Until then
            // it would be connected, established and UpToDate without those blocks, and could
            // be promoted (a switchover after the primary demoted with its transfer log marked:
            // `--failover --primary-disk-errors --double-faults --switchover` 14514). A primary
            // peer's bitmap is still answered when it comes (it may mark blocks after its hello).
            let peerSource = role != .primary && hello.role != .primary && theirs && (!mine || hello.nodeID < configuration.nodeID)
                && [.upToDate, .consistent, .outdated].contains(hello.diskState)
            if !mine && !theirs {
                // Outdated only meant "the peer may have written since", Consistent "attached
                // without the peer": it did not, and the peer holds this generation too. (With
                // marks, not before the resync of them ends: the target may lack those blocks.)
                let localState = disk, peerState = hello.diskState
                disk = Self.caughtUp(localState, peer: peerState)
                peerDisk = Self.caughtUp(peerState, peer: localState)
                if disk == .upToDate { localFlags.remove(.outdated) }
            }
            if source && (disk == .upToDate || disk == .consistent || disk == .outdated) {
                link = .handshaking
                pendingSync = .syncSource
                sendBitmap(into: &actions)
            } else if peerSource {
                // As `becomeTarget`: this side's bitmap goes now, and it is not promoted until
                // the resync of the union ends.
                link = .handshaking
                pendingSync = .syncTarget
                sendBitmap(into: &actions)
            }
        case .skipInitialSync:
            link = .connected
            if configuration.nodeID < hello.nodeID {
                uuids = uuids.afterSkippedInitialSync(newCurrent: freshUUID)
                actions.append(.send(.stateChange(PeerStateChange(role: role, diskState: disk, uuids: Self.wire(uuids)))))
            } else {
                // Not connected until the generation both will share arrives.
                awaitingSkippedSyncUUID = true
                link = .handshaking
            }
            disk = .upToDate
            peerDisk = .upToDate
        case .becomeSource, .becomeTarget:
            // The newer data is the source's (a Consistent disk attached without its peer is
            // current once the peer's generation is found older).
            if result.decision == .becomeSource && disk == .consistent { disk = .upToDate }
            // Both sides send their bitmaps; the union is what the resync copies.
            link = .handshaking
            pendingSync = result.decision == .becomeSource ? .syncSource : .syncTarget
            sendBitmap(into: &actions)
        case .fullSyncAsSource, .fullSyncAsTarget:
            if result.decision == .fullSyncAsSource && disk == .consistent { disk = .upToDate }
            bitmap.setAll()
            link = .handshaking
            pendingSync = result.decision == .fullSyncAsSource ? .syncSource : .syncTarget
            actions.append(.send(.bitmapDone(totalBits: UInt64(bitmap.bitCount), setBits: bitmap.setBitCount)))
        case .splitBrain, .unrelatedData:
            link = .standalone
            peerDisk = nil
            peerRole = nil
            actions.append(.dropLink(result.decision == .splitBrain ? .splitBrain : .unrelatedData))
        }
        actions.append(.stateChanged(status))
    }

    /// A side's disk is detached: its data takes no part in a sync decision (a restart attaches it
    /// again, as a resync target). The link connects without a resync, as DRBD connects a
    /// Diskless node: a detached primary reads and writes through an UpToDate peer, a primary
    /// whose peer is detached marks what it writes out of sync. A detached primary connects only
    /// to the generation it served (DRBD: "Can only connect to data with current UUID"): other
    /// data would change under its clients.
    private mutating func connectWithDetachedDisk(peer hello: PeerHello, into actions: inout [Action]) {
        lastDecision = (.noSync, .detachedDisk)
        let otherData = disk == .failed && role == .primary
            && hello.uuids.current & GenerationUUIDs.comparedBits != uuids.current & GenerationUUIDs.comparedBits
        if (role == .primary && hello.role == .primary) || otherData {
            roleConflict = hello.role == .primary ? .twoPrimaries : .peerHoldsOtherData
            link = .connecting
            peerDisk = nil
            peerRole = nil
            actions.append(.dropLink(.roleConflict))
            actions.append(.stateChanged(status))
            return
        }
        roleConflict = nil
        link = .connected
        actions.append(.stateChanged(status))
    }

    /// A disk state after a connect that found the same generation on both sides and nothing to
    /// copy: Outdated or Consistent holds the current data if the peer's is usable too.
    static func caughtUp(_ state: PeerDiskState, peer: PeerDiskState) -> PeerDiskState {
        switch state {
        case .outdated, .consistent: [.upToDate, .outdated, .consistent].contains(peer) ? .upToDate : state
        case .upToDate, .inconsistent, .failed, .diskless: state
        }
    }

    /// Whether a split brain resolves by the operator's `--discard-my-data` (on exactly one side)
    /// or the automatic policy; the decision for this side, or nil to refuse. With equal bitmap
    /// UUIDs both bitmaps hold every change since the split and their union is resynced;
    /// otherwise the split is older than the bitmaps and the target gets a full sync.
    private func resolveSplitBrain(rule: GenerationUUIDs.SyncRule, peer hello: PeerHello) -> GenerationUUIDs.SyncDecision? {
        let peerDiscards = hello.flags & PeerFlags.Hello.discardMyData != 0
        var localLoses: Bool?
        if discardMyData != peerDiscards {
            localLoses = discardMyData
        } else if !discardMyData {
            let mine = UInt64(bitmap.setBitCount), theirs = hello.outOfSyncBits
            switch configuration.splitBrainPolicy {
            case .disconnect:
                break
            case .discardZeroChanges:
                if (mine == 0) != (theirs == 0) { localLoses = mine == 0 }
            case .discardLeastChanges:
                if mine != theirs { localLoses = mine < theirs }
            case .discardYoungerPrimary:
                if primarySinceMillis != 0 && hello.primarySinceMillis != 0 && primarySinceMillis != hello.primarySinceMillis {
                    localLoses = primarySinceMillis > hello.primarySinceMillis
                }
            }
        }
        guard let loses = localLoses else { return nil }
        switch (loses, rule == .equalBitmaps) {
        case (true, true): return .becomeTarget
        case (true, false): return .fullSyncAsTarget
        case (false, true): return .becomeSource
        case (false, false): return .fullSyncAsSource
        }
    }

    // MARK: Roles and administrative link control

    /// When this node last became primary (Unix milliseconds, from the node), for the
    /// `discard-younger-primary` policy; 0 unknown.
    public var primarySinceMillis: UInt64 = 0
    /// The peer ended the link over a split brain: this side stays StandAlone too.
    private var peerDisconnectedForSplitBrain = false
    /// The peer left to roll back to a barrier (`disconnect(rollback)`, its notice before it, or
    /// the witness's word) and has not connected since: why this node is Outdated, for the operator.
    public private(set) var peerLeftForRollback = false
    /// This node's rollback notice waits for the peer's answer (`noticeRollback`).
    private var rollbackNoticeID: UInt64?
    private var nextRollbackNoticeID: UInt64 = 1

    /// The peer rolls back to a barrier (it said so on the link, or the witness refused this
    /// node's promotion for it): its image is declared the newest and ours is about to be
    /// older. Outdated (persisted), this node neither asks the witness to take over nor is
    /// promoted without force while the peer restores; it resyncs from the peer when the link
    /// returns (Protocol/barriers.md "Rollback and the witness"). Only a secondary.
    public mutating func peerRollsBack(into actions: inout [Action]) {
        guard role == .secondary else { return }
        peerLeftForRollback = true
        if disk == .upToDate || disk == .consistent {
            disk = .outdated
            localFlags.insert(.outdated)
        }
        actions.append(.stateChanged(status))
    }

    /// A secondary about to roll back asks its peer over the link to outdate itself first
    /// (`stateChange` request with `rollingBack`): the answer is `rollbackNoticeAnswered`.
    /// Returns false, sending nothing, unless the link is connected and the peer is not primary.
    /// Then `disconnect(forRollback:)` as before.
    public mutating func noticeRollback(into actions: inout [Action]) -> Bool {
        precondition(role == .secondary, "only a secondary rolls back")
        guard link == .connected, peerRole != .primary, rollbackNoticeID == nil else { return false }
        let id = nextRollbackNoticeID
        nextRollbackNoticeID += 1
        rollbackNoticeID = id
        actions.append(.send(.stateChange(PeerStateChange(id: id, role: role, diskState: disk, flags: PeerFlags.State.rollingBack, uuids: Self.wire(uuids)))))
        return true
    }
    /// A fresh UUID for the first write without the peer (a new generation). The node keeps one
    /// here at all times (the core has no random numbers); the link loss and a promotion supply
    /// one too.
    public var spareUUID: UInt64?

    /// The witness fenced the peer: writes answered from now on (and those held) belong to a
    /// generation the peer does not have. False while this node's hello is out: the peer decides
    /// on the UUIDs that hello carried, so the generation cannot start yet (as for a write,
    /// `clientWrite`); the node keeps the answers held and asks the witness again later.
    public mutating func startGenerationWithoutPeer(into actions: inout [Action]) -> Bool {
        guard !helloOut else { return false }
        guard role == .primary, !replicating, disk != .failed, uuids.bitmap == 0 else { return true }
        startGenerationFromSpare(into: &actions)
        return true
    }

    /// Whether a client write now would start a generation: this node writes without its peer
    /// and nothing yet records what the peer lacks (with fencing, the witness's fence starts it).
    private var writeStartsGeneration: Bool {
        !replicating && !configuration.fencing && disk != .failed && uuids.bitmap == 0 && spareUUID != nil
    }

    /// Starts the generation the peer does not have, with the UUID kept since the promotion or
    /// the link loss (`spareUUID`); the state change persists it before any answer.
    private mutating func startGenerationFromSpare(into actions: inout [Action]) {
        guard let fresh = spareUUID else { return }
        spareUUID = nil
        uuids = uuids.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: fresh)
        actions.append(.stateChanged(status))
    }

    /// This node's device went back to a barrier's image (the changed chunks are marked out of
    /// sync): its data is a generation the peer does not have, and it is the sync source on the
    /// next connect.
    public mutating func startGenerationAfterRollback(freshUUID: UInt64, into actions: inout [Action]) {
        precondition(link == .standalone || link == .connecting, "roll back disconnected")
        uuids = uuids.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: freshUUID)
        disk = .upToDate
        localFlags.insert(.consistent)
        localFlags.remove(.outdated)
        actions.append(.stateChanged(status))
    }

    /// Makes this node primary (`tandem primary`). Refused while the peer is primary, while a
    /// resync writes into this node, or (without `force`) unless the local disk is UpToDate.
    /// Without the peer, this node's first write starts a new generation (`freshUUID` is kept
    /// for it), not the promotion: a node promoted alone that writes nothing (it crashes first,
    /// or demotes) still holds the peer's generation, and causes no split brain with a peer
    /// promoted and written later (DRBD 9 likewise sets `NEW_CUR_UUID` at promotion and starts
    /// the generation at the first write). With `force` an Outdated, Consistent or Inconsistent
    /// disk is declared UpToDate (the operator takes the risk) and, as in DRBD, the new
    /// generation starts at once: this data is declared the newest, whatever the peer holds.
    public mutating func promote(force: Bool, freshUUID: UInt64, nowMillis: UInt64, into actions: inout [Action]) -> RoleChangeRefusal? {
        guard role != .primary else { return nil }
        if link == .connected || link == .handshaking {
            if peerRole == .primary { return .peerIsPrimary }
            if sync == .syncTarget || pendingSync == .syncTarget { return .resyncTarget }
        }
        var forced = false
        switch disk {
        case .upToDate:
            break
        case .failed, .diskless:
            guard replicating && peerDisk == .upToDate else { return .noUsableData }
        case .inconsistent, .outdated, .consistent:
            guard force else { return .diskNotUpToDate(disk) }
            // A forced promotion starts a generation at once: the peer, deciding on the hello
            // already sent, would not see it (the same gap as a write's, `clientWrite`).
            guard !helloOut else { return .helloOut }
            forced = true
            disk = .upToDate
            localFlags.remove(.outdated)
            localFlags.remove(.resyncTarget)
            localFlags.insert(.consistent)
        }
        role = .primary
        primarySinceMillis = nowMillis
        if !replicating && uuids.bitmap == 0 && link != .handshaking {
            if forced {
                uuids = uuids.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: freshUUID)
            } else if spareUUID == nil {
                // The first write without the peer starts the generation (`clientWrite`; with
                // fencing, `startGenerationWithoutPeer` once the witness fenced the peer).
                spareUUID = freshUUID
            }
        }
        announceState(into: &actions)
        return nil
    }

    /// Makes this node secondary (`tandem secondary`). The node first stops client requests and
    /// flushes both sides; requests still in flight refuse the change.
    public mutating func demote(into actions: inout [Action]) -> RoleChangeRefusal? {
        guard role != .secondary else { return nil }
        guard writes.isEmpty && flushes.isEmpty else { return .requestsInFlight(writes.count + flushes.count) }
        if disk == .upToDate && link == .connected && sync == .established && peerDisk == .upToDate && bitmap.setBitCount > 0 {
            // The peer may lack these blocks (a transfer log that overflowed): promoted, it would
            // serve them stale. Copy them first; the demotion works once the resync ends. A
            // detached disk's marks are what it lacks itself (the peer has those blocks), and
            // it cannot be a resync source anyway.
            let bytes = bitmap.outOfSyncBytes
            resyncMarked(into: &actions)
            return .outOfSync(bytes)
        }
        role = .secondary
        primarySinceMillis = 0
        roleConflict = nil
        // The node flushed both sides first, which emptied the transfer log; what a failed or
        // skipped flush left is out of sync, and its activity-log extents are released.
        while let entry = transferLog.pop() {
            settle(entry, outOfSync: true, into: &actions)
        }

        announceState(into: &actions)
        return nil
    }

    /// Tells the peer (if connected) and the node about this node's role, disk and generation.
    private func announceState(into actions: inout [Action]) {
        if link == .connected || link == .handshaking {
            actions.append(.send(.stateChange(PeerStateChange(role: role, diskState: disk, uuids: Self.wire(uuids)))))
        }
        actions.append(.stateChanged(status))
    }

    /// Leaves standalone and tries to connect again (`tandem connect`); with `discardMyData`
    /// this node gives up its changes if the connect finds a split brain.
    public mutating func connect(discardMyData: Bool, into actions: inout [Action]) {
        self.discardMyData = discardMyData
        guard link == .standalone else { return }
        link = .connecting
        actions.append(.stateChanged(status))
    }

    /// Disconnects on purpose (`tandem disconnect`, or the node stopping): the peer is told, so a
    /// secondary left behind by a primary marks itself Outdated; then the link stays down. With
    /// `forRollback` (a secondary about to roll back, `tandem rollback`) the peer is told so and
    /// marks itself Outdated whatever its role was.
    public mutating func disconnect(freshUUID: UInt64, forRollback: Bool = false, into actions: inout [Action]) {
        precondition(!forRollback || role == .secondary, "only a secondary rolls back")
        guard link != .standalone else { return }
        let wasUp = link == .connected || link == .handshaking
        if wasUp {
            if forRollback {
                actions.append(.send(.disconnect(reason: .rollback, text: "rolling back to a barrier: outdate your data and resync from me")))
            } else {
                actions.append(.send(.disconnect(reason: .shutdown, text: role == .primary ? "primary disconnecting: outdate your data" : "disconnecting")))
            }
            if role == .primary && peerDisk == .upToDate { peerDisk = .outdated }
            actions.append(.dropLink(.administrative))
            linkDown(.administrative, freshUUID: freshUUID, into: &actions)
        } else {
            link = .standalone
            actions.append(.stateChanged(status))
            releaseWritesHeldForHandshake(into: &actions)
        }
    }

    /// The node sent its hello on a new link, built from this core's state. Until the peer's
    /// hello arrives (`linkUp`) or the link goes down, a write that would start a generation
    /// holds its answer instead (`clientWrite`). DRBD 8.4 likewise refuses a role change while
    /// its state and UUIDs are sent and not yet compared (`STATE_SENT`).
    public mutating func helloSent() {
        helloOut = true
    }

    /// This side decided on the hellos (or the link went down before): writes held since the
    /// hello went out start their generation now if they stay without the peer (standalone, a
    /// role conflict, a handshake: as any write then), and are answered.
    private mutating func releaseWritesHeldForHandshake(into actions: inout [Action]) {
        guard helloOut else { return }
        helloOut = false
        let held = writes.filter { $0.value.heldForHandshake }.keys.sorted()
        guard !held.isEmpty else { return }
        if writeStartsGeneration { startGenerationFromSpare(into: &actions) }
        for id in held {
            writes[id]!.heldForHandshake = false
            finishWriteIfDone(id, into: &actions)
        }
    }

    /// Sends every bitmap page that has a bit set, then `bitmapDone`.
    /// Sends the set bits as chunks that cover runs of non-zero words (zero words inside a run
    /// cost less than a chunk of their own, up to `bitmapRunGapWords`): a few scattered dirty
    /// blocks cost a few chunks, not whole pages, on the wire and in memory while queued.
    private mutating func sendBitmap(into actions: inout [Action]) {
        var bit = 0
        while let next = bitmap.nextSetBit(from: bit) {
            let page = bitmap.page(ofBit: next)
            let pageFirst = page * DirtyBitmap.bitsPerPage
            let pageBits = min(DirtyBitmap.bitsPerPage, bitmap.bitCount - pageFirst)
            let pageWords = (pageBits + 63) / 64
            bitmap.withPageBytes(page) { raw in
                func word(_ i: Int) -> UInt64 { raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self).littleEndian }
                var i = (next - pageFirst) / 64
                while i < pageWords {
                    guard word(i) != 0 else { i += 1; continue }
                    // A run: from this word to the last non-zero one before a longer gap.
                    var end = i + 1
                    var gap = 0
                    var scan = end
                    while scan < pageWords && gap <= Self.bitmapRunGapWords {
                        if word(scan) != 0 { end = scan + 1; gap = 0 } else { gap += 1 }
                        scan += 1
                    }
                    let firstBit = pageFirst + i * 64
                    let bits = min(end * 64, pageBits) - i * 64
                    let words = (i..<end).map { word($0) }
                    actions.append(.send(.bitmapChunk(PeerBitmapChunk(firstBit: UInt64(firstBit), bitCount: UInt32(bits), words: words))))
                    i = end
                }
            }
            bit = pageFirst + pageBits
            if bit >= bitmap.bitCount { break }
        }
        actions.append(.send(.bitmapDone(totalBits: UInt64(bitmap.bitCount), setBits: bitmap.setBitCount)))
    }

    /// Zero words a bitmap chunk carries rather than starting a new one (a chunk costs a 32-byte
    /// header and 12 bytes of prefix).
    static let bitmapRunGapWords = 5

    private mutating func receivedBitmapChunk(_ chunk: PeerBitmapChunk, into actions: inout [Action]) {
        if link == .connected && sync == .established && role == .secondary && pendingSync == nil {
            // The primary starts a resync of blocks it marked (online verify): this side is the
            // target; its own bitmap (if any) goes back so the union is copied.
            link = .handshaking
            pendingSync = .syncTarget
            sendBitmap(into: &actions)
        }
        // Not `firstBit + bitCount`: the codec refuses a sum that overflows, but the core takes
        // no such thing on trust.
        guard link == .handshaking, pendingSync != nil,
              chunk.firstBit <= UInt64(bitmap.bitCount), UInt64(chunk.bitCount) <= UInt64(bitmap.bitCount) - chunk.firstBit
        else { return protocolError("unexpected bitmap chunk", into: &actions) }
        for (i, word) in chunk.words.enumerated() where word != 0 {
            var w = word
            while w != 0 {
                let bit = Int(chunk.firstBit) + i * 64 + w.trailingZeroBitCount
                if bit < Int(chunk.firstBit) + Int(chunk.bitCount) { bitmap.setBit(bit) }
                w &= w - 1
            }
        }
    }

    private mutating func receivedBitmapDone(totalBits: UInt64, into actions: inout [Action]) {
        if link == .connected && sync == .established && role == .secondary && pendingSync == nil {
            link = .handshaking
            pendingSync = .syncTarget
            sendBitmap(into: &actions)
        }
        guard link == .handshaking, let next = pendingSync, totalBits == UInt64(bitmap.bitCount) else {
            return protocolError("unexpected bitmapDone", into: &actions)
        }
        pendingSync = nil
        link = .connected
        sync = next
        if next == .syncTarget {
            // Until the resync ends, this copy mixes old and new blocks: not a consistent image.
            disk = .inconsistent
            localFlags.insert(.resyncTarget)
            localFlags.remove(.consistent)
        } else {
            peerDisk = .inconsistent
            resyncCursor = 0
            resyncedBytes = 0
            resyncSourceFlushed = false
        }
        actions.append(.stateChanged(status))
        if next == .syncSource { pumpResync(into: &actions) }
    }

    /// Marks a range out of sync (online verify found it differs on the peer; every other mark
    /// comes through here too). A resync run of the range already sent keeps the mark when it is
    /// acknowledged: its ack may come after the mark (the target acknowledges once a flush covers
    /// the run, and by then a client write over it may have failed here).
    public mutating func markOutOfSync(offset: UInt64, length: UInt64) {
        bitmap.setRange(offset: offset, length: length)
        for i in resyncSlots.indices {
            guard let slot = resyncSlots[i], slot.sent, slot.offset < offset + length, offset < slot.offset + UInt64(slot.length) else { continue }
            resyncSlots[i]!.remarked = true
        }
    }

    /// A primary's disk detached (the node calls this once, at the state change that says so):
    /// a detached disk is never synced again (an eviction skips the sync), so it may lack any
    /// write inside the activity log's extents, outside which every write was synced before its
    /// extent was evicted. Once the node demotes or stops cleanly no crash recovery marks them,
    /// so the bitmap must, or the resync after the disk's next attach skips what a power loss
    /// took from its cache (simulator seed 103288).
    public mutating func markLogExtentsOfDetachedDisk(_ log: ActivityLog) {
        markLogExtents(log)
    }

    /// A demotion whose flush failed on the local disk, which stayed attached (no peer was a full
    /// copy to detach for: the link was down, or the peer lacked blocks; `finishFlushIfDone`).
    /// The node calls this once the demotion is done, before it persists the bitmap. A write
    /// inside the activity log's extents may be only in the disk's volatile cache, among them
    /// writes the peer acknowledged and a flush of its own made durable there (no local flush
    /// covers those, so no mark names them). The clean demotion drops the log that a crash would
    /// have resynced, so a power loss could take such a write from this disk alone: in sync, yet
    /// different (the gap of seed 103288, with no peer to detach for). Marked, the blocks are
    /// copied from this disk at the next connect of the same generation, so the two copies end
    /// equal: a write no successful flush of this disk covered may be lost (no client flush
    /// covered it: one would have synced this disk), never one that was flushed. A peer that
    /// wrote since (a newer generation) is the source instead, of these marks too.
    public mutating func markLogExtentsAfterFailedDemotionFlush(_ log: ActivityLog) {
        precondition(role == .secondary && disk != .failed, "a kept disk, after the demotion (a detached one marked its log at the detach)")
        markLogExtents(log)
    }

    private mutating func markLogExtents(_ log: ActivityLog) {
        log.forEachExtentInTable { extent in
            let range = log.byteRange(ofExtent: extent)
            markOutOfSync(offset: range.offset, length: range.length)
        }
    }

    /// An activity-log transaction evicts extents without a sync, the disk being detached, and
    /// `markLogExtentsOfDetachedDisk` has not run for the detach yet (the node calls this before it
    /// persists the transaction). The log forgot the extents when the transaction took their
    /// slots, so that call will not see them, and their writes may be only in the disk's volatile
    /// cache: they are marked here. The core detaches at once, but the node marks the log when it
    /// carries the `stateChanged` action, and a `writeSettled` earlier in the same batch can free
    /// room for a waiting write that evicts (simulator seed 101118196: a failed client flush
    /// answered by the peer's, whose ack settled the writes it covered). So can a sync before the
    /// eviction that fails and detaches the disk: the extents left the log before it did.
    public mutating func markExtentsEvictedFromDetachedDisk(_ log: ActivityLog, by transaction: ActivityLog.Transaction) {
        precondition(disk == .failed, "an eviction from a disk that is not detached syncs it instead")
        log.forEachEvicted(of: transaction) { extent in
            let range = log.byteRange(ofExtent: extent)
            markOutOfSync(offset: range.offset, length: range.length)
        }
    }

    /// The node stops cleanly (`ReplicatedNode.stop`: after the link went down, before it
    /// persists the bitmap). A write not done on the local disk (still on it, waiting behind an
    /// overlapping earlier one, or held behind a barrier) may never land here, though the peer
    /// applied and acknowledged it: overlapping writes reach the local disk in the order they
    /// reach the peer, so the peer may be ahead. A crash leaves such ranges to the activity log
    /// (the restart marks its hot extents); a clean stop does not, so the bitmap must carry them,
    /// or no resync covers them and the two copies differ there (`--failover --double-faults
    /// --overlapping-writes` 27782, 21570). Marking a write that does land costs only a resync.
    public mutating func markUnfinishedLocalWrites() {
        for write in writes.values where !write.localDone {
            markOutOfSync(offset: write.offset, length: UInt64(write.length))
        }
        for io in appliedInFlight { markOutOfSync(offset: io.offset, length: UInt64(io.length)) }
        for io in appliedWaiting + snapshots.flatMap(\.held) where io.length > 0 {
            markOutOfSync(offset: io.offset, length: UInt64(io.length))
        }
    }

    /// Starts a resync of the blocks marked out of sync while connected (after a verify): this
    /// side is the source; its bitmap goes to the peer, which becomes the target.
    public mutating func resyncMarked(into actions: inout [Action]) {
        guard link == .connected, sync == .established, role == .primary, disk == .upToDate, peerDisk == .upToDate, bitmap.setBitCount > 0 else { return }
        link = .handshaking
        pendingSync = .syncSource
        sendBitmap(into: &actions)
        actions.append(.stateChanged(status))
    }

    /// The node wrote every dirty bitmap page to the metadata file.
    public mutating func bitmapPersisted() {
        bitmap.markAllPagesPersisted()
    }

    // MARK: Resync

    /// Application I/O the core does not see otherwise (reads served from the local disk): the
    /// resync keeps to `resyncBytesPerSecondMin` until a tick passes without any.
    public mutating func applicationIO() { applicationIOSinceTick = true }

    /// Time passes: the resync budget grows at the full rate, or at the competing rate when
    /// application I/O came since the last tick; it holds at most one second's worth of the
    /// current rate, so neither a pause nor a change of pace turns into a burst.
    public mutating func tick(nowNanos: UInt64, into actions: inout [Action]) {
        defer { lastTickNanos = nowNanos; applicationIOSinceTick = false }
        guard sync == .syncSource, let last = lastTickNanos, nowNanos > last else { return }
        let rate = applicationIOSinceTick ? configuration.resyncBytesPerSecondMin : configuration.resyncBytesPerSecond
        let earned = Int64(min(UInt64(Int64.max) / max(rate, 1), nowNanos - last) * rate / 1_000_000_000)
        resyncBudget = min(resyncBudget + earned, Int64(rate))
        pumpResync(into: &actions)
    }

    /// Starts resync reads while slots, budget and out-of-sync ranges allow; ends the resync
    /// when nothing is left.
    private mutating func pumpResync(into actions: inout [Action]) {
        guard sync == .syncSource, link == .connected else { return }
        // The target keeps what it is sent, durably, and both sides clear their bits, which the
        // node persists at the next link loss or state change. A block this side holds only in
        // its cache (a replicated write no flush covered: the primary that would have marked
        // it crashed, or its marks are the ones this resync clears) is lost by a power loss
        // here, and the copies then differ with no bit set (`--switchover --overlapping-writes
        // --primary-disk-errors` 92120945: a secondary source, the resync cut by a reset). So
        // the source flushes before it reads; the flush before the end covers the rest.
        guard resyncSourceFlushed else { return flushResyncSource(into: &actions) }
        let runBits = max(1, configuration.resyncRunBytesMax / bitmap.granularityBytes)
        var wrapped = false
        // Budget may go negative by one run; it is paid back before the next read starts.
        while resyncBudget > 0 || (bitmap.setBitCount == 0 && resyncSlots.allSatisfy({ $0 == nil })) {
            guard let slot = resyncSlots.firstIndex(where: { $0 == nil }) else { return }
            guard let run = bitmap.firstRun(from: resyncCursor, maxBits: runBits) else {
                if !wrapped && resyncCursor > 0 {
                    wrapped = true
                    resyncCursor = 0
                    continue
                }
                if resyncSlots.allSatisfy({ $0 == nil }) && bitmap.setBitCount == 0 { flushResyncSource(into: &actions) }
                return
            }
            resyncCursor = run.upperBound
            let range = bitmap.byteRange(bits: run)
            let length = UInt32(range.upperBound - range.lowerBound)
            if clientWriteInFlight(offset: range.lowerBound, length: length) || resyncSlots.contains(where: { $0.map { $0.offset < range.upperBound && range.lowerBound < $0.offset + UInt64($0.length) } ?? false }) {
                // Copy it later: reading under a client write could send stale data.
                if wrapped { return }
                continue
            }
            resyncSlots[slot] = ResyncSlot(offset: range.lowerBound, length: length)
            resyncBudget -= Int64(length)
            actions.append(.submitLocal(LocalIO(tag: .resyncRead(slot), operation: .read, offset: range.lowerBound, length: length, buffer: .resync(slot))))
        }
    }

    /// Whether a client write over the range is not yet done on both sides (an online verify
    /// waits for it: the node holds new ones meanwhile).
    public func clientWriteInFlight(offset: UInt64, length: UInt32) -> Bool {
        writes.values.contains { $0.offset < offset + UInt64(length) && offset < $0.offset + UInt64($0.length) }
    }

    private mutating func markResyncStale(offset: UInt64, length: UInt32) {
        for i in resyncSlots.indices {
            guard let slot = resyncSlots[i], !slot.sent else { continue }
            if slot.offset < offset + UInt64(length) && offset < slot.offset + UInt64(slot.length) { resyncSlots[i]!.stale = true }
        }
    }

    private mutating func resyncReadCompleted(_ slot: Int, result: Int32, into actions: inout [Action]) {
        guard let entry = resyncSlots[slot] else { preconditionFailure("resync read completion for a free slot \(slot)") }
        if entry.stale || result < 0 || sync != .syncSource {
            // The bits stay set; the range is copied again later.
            resyncSlots[slot] = nil
            return pumpResync(into: &actions)
        }
        resyncSlots[slot]!.sent = true
        actions.append(.sendResync(PeerResyncData(id: resyncIDBase | (UInt64(slot) + 1), offset: entry.offset, length: entry.length), buffer: .resync(slot)))
    }

    private mutating func resyncAcked(id: UInt64, offset: UInt64, length: UInt32, code: UInt32, into actions: inout [Action]) {
        let slot = Int(id & Self.resyncSlotMask) - 1
        guard sync == .syncSource, id & ~Self.resyncSlotMask == resyncIDBase, slot >= 0, slot < resyncSlots.count, let entry = resyncSlots[slot], entry.sent,
              entry.offset == offset, entry.length == length
        else { return protocolError("ack of unknown resync data \(id)", into: &actions) }
        resyncSlots[slot] = nil
        if code == 0 && !entry.remarked {
            _ = bitmap.clearRange(offset: offset, length: UInt64(length))
            resyncedBytes += UInt64(length)
        }
        pumpResync(into: &actions)
    }

    /// Every block is copied, but the source read them from its volatile cache: until they are
    /// durable here too, a power loss would lose them on this side only (the target acknowledged
    /// each run only once a flush there covered it), and no bitmap would remember. A flush
    /// first, then the end. (The same flush, before the first read: see `pumpResync`.)
    private mutating func flushResyncSource(into actions: inout [Action]) {
        guard resyncFlushLink == nil else { return }
        resyncFlushLink = resyncIDBase
        actions.append(.submitLocal(LocalIO(tag: .resyncFlush, operation: .flush, offset: 0, length: 0, buffer: nil)))
    }

    private mutating func resyncFlushCompleted(result: Int32, into actions: inout [Action]) {
        guard let link = resyncFlushLink else { preconditionFailure("resync flush completed but none was submitted") }
        resyncFlushLink = nil
        // The kernel reports a writeback error to one fsync only, and this one took it: a write
        // completed earlier may not be on the disk. That is the disk's failure, not the
        // resync's, so it is handled as a sync no request waited for (a primary's next client
        // flush reports it, or the disk detaches), and the flush is tried again on the next
        // tick (a disk that fails every flush is not flushed in a loop). A writeback error an
        // earlier sync took stays for that client flush too: a retried flush would swallow it.
        if result < 0 { localSyncFailed(result: result, into: &actions) }
        guard sync == .syncSource, self.link == .connected, result == 0 else { return }
        if link == resyncIDBase { resyncSourceFlushed = true }
        if link == resyncIDBase && bitmap.setBitCount == 0 && resyncSlots.allSatisfy({ $0 == nil }) {
            finishResyncAsSource(into: &actions)
        } else {
            // Of an earlier link, or blocks went out of sync meanwhile: copy, flush again.
            pumpResync(into: &actions)
        }
    }

    private mutating func finishResyncAsSource(into actions: inout [Action]) {
        uuids = uuids.afterResyncAsSource()
        localFlags.remove(.crashedPrimary)
        if disk == .consistent || disk == .outdated {
            // The marks of a noSync connect are copied: the two copies are the same now.
            disk = .upToDate
            localFlags.remove(.outdated)
        }
        sync = .established
        peerDisk = .upToDate
        resyncDoneUnconfirmed = true
        // The generation the target adopts: this side's now (a write during the handshake may
        // have started one since the hello).
        actions.append(.send(.stateChange(PeerStateChange(role: role, diskState: disk, uuids: Self.wire(uuids)))))
        actions.append(.send(.resyncDone))
        actions.append(.stateChanged(status))
    }

    /// Resync data arrived (target). Returns the buffer the write takes its payload from: the node
    /// hands the payload over under that key only now, and keeps it until the write completes.
    /// Nil when nothing is written from a payload (a zero range, a failed read at the source) or
    /// the message breaks the protocol (a `dropLink` says why): the node releases what it holds,
    /// and a refused message never touches the buffer of a write in flight.
    @discardableResult
    public mutating func peerResyncData(_ data: PeerResyncData, into actions: inout [Action]) -> BufferRef? {
        guard sync == .syncTarget else {
            protocolError("resync data outside a resync", into: &actions)
            return nil
        }
        // The id keys the write's tag and the node's buffer, both `Int`: a source's ids are far
        // below (`resyncIDBase`), so a larger one is a broken peer, not a reason to trap.
        guard let id = Int(exactly: data.id) else {
            protocolError("resync data id \(data.id) out of range", into: &actions)
            return nil
        }
        guard Self.fits(offset: data.offset, length: data.length, deviceBytes: configuration.deviceBytes) else {
            protocolError("resync data \(data.id) at \(data.offset)+\(data.length) past the end of the device", into: &actions)
            return nil
        }
        guard data.result == 0 else { return nil }  // the source could not read it: stays out of sync
        // A write of an earlier link may still hold the id (its ack is owed on no link, but its
        // buffer is in use until it completes).
        guard resyncWritesOwed[id] == nil, !resyncWritesPending.contains(id), !resyncAcksHeld.contains(where: { $0.id == data.id }),
              !resyncAcksFlushing.contains(where: { $0.id == data.id }) else {
            protocolError("resync data \(data.id) again before its ack", into: &actions)
            return nil
        }
        // Every run is owed an ack until the source has it, and a source keeps at most this many
        // unacknowledged: more is its error, not a queue for this side to grow.
        guard resyncRunsUnacknowledged < Limits.resyncRunsUnacknowledgedMax else {
            protocolError("more than \(Limits.resyncRunsUnacknowledgedMax) resync runs unacknowledged", into: &actions)
            return nil
        }
        resyncWritesOwed[id] = 0
        resyncWritesPending.insert(id)
        let isZero = data.flags & PeerFlags.ResyncData.zero != 0
        let buffer: BufferRef? = isZero ? nil : .resync(id)
        // No FUA: the source clears its bits on the ack, so the ack waits for a flush that covers
        // the write (from a volatile cache, a power loss here would lose the block with neither
        // bitmap remembering it). One flush covers every write completed before it.
        applyAfterBarriers(LocalIO(tag: .resyncWrite(id), operation: .write(kind: isZero ? .zeroes(noHole: false) : .write, fua: false),
                                   offset: data.offset, length: data.length, buffer: buffer), into: &actions)
        return buffer
    }

    /// Runs of this link whose ack the source still waits for (writing, or held for a flush).
    private var resyncRunsUnacknowledged: Int {
        resyncWritesOwed.count + resyncAcksHeld.count + resyncAcksFlushing.count
    }

    /// A local write that did not come in the replication stream (a resync write, or a client
    /// write on a node promoted meanwhile) while a barrier is still to be recorded: it is after
    /// the barrier's cut, as replicated writes after it are, so it waits with them until the
    /// barrier exists and is saved under it, and never lands in its image.
    private mutating func applyAfterBarriers(_ io: LocalIO, into actions: inout [Action]) {
        if snapshots.isEmpty {
            apply(io, into: &actions)
        } else {
            snapshots[snapshots.count - 1].held.append(io)
        }
    }

    private mutating func resyncWriteCompleted(_ id: Int, result: Int32, into actions: inout [Action]) {
        guard let done = appliedInFlight.first(where: { $0.tag == .resyncWrite(id) }) else { preconditionFailure("unknown resync write \(id)") }
        resyncWritesPending.remove(id)
        defer { applied(.resyncWrite(id), into: &actions) }
        // Of an earlier link, or of a resync that ended: no ack on this one (the bits stay).
        guard let owed = resyncWritesOwed.removeValue(forKey: id) else { return }
        let code = result < 0 ? UInt32(bitPattern: -result) : owed
        guard code == 0 else {
            // Acknowledged with its error at once, not after the flush: an error claims nothing
            // durable, so no flush needs to cover it, and the source frees its slot sooner. The
            // source keeps its bits and copies the run again; so do ours.
            actions.append(.send(.resyncAck(id: UInt64(id), offset: done.offset, length: done.length, result: code)))
            return
        }
        resyncAcksHeld.append(HeldResyncAck(id: UInt64(id), offset: done.offset, length: done.length))
        startResyncTargetFlush(into: &actions)
    }

    /// Submits a flush for the held acks unless one is on the disk already (its completion
    /// submits the next): one flush covers every resync write completed before it was submitted,
    /// and resync writes go on while it runs (group commit).
    private mutating func startResyncTargetFlush(into actions: inout [Action]) {
        guard !resyncTargetFlushInFlight, !resyncAcksHeld.isEmpty else { return }
        precondition(resyncAcksFlushing.isEmpty, "acks of a completed resync target flush left over")
        swap(&resyncAcksHeld, &resyncAcksFlushing)
        resyncTargetFlushInFlight = true
        actions.append(.submitLocal(LocalIO(tag: .resyncTargetFlush, operation: .flush, offset: 0, length: 0, buffer: nil)))
    }

    private mutating func resyncTargetFlushCompleted(result: Int32, into actions: inout [Action]) {
        precondition(resyncTargetFlushInFlight, "resync target flush completed but none was submitted")
        resyncTargetFlushInFlight = false
        if result < 0 {
            // As a failed write of every run it covers, and of those written since (see
            // `failUnacknowledgedResyncRuns`); and as a failed replicated flush: it may have lost
            // replicated writes too, so the resync's end must not make this copy UpToDate.
            failUnacknowledgedResyncRuns(code: UInt32(bitPattern: -result), into: &actions)
            detachAfterReplicationError(into: &actions)
            return
        }
        // Durable now: the acks go (the source clears its bits), then this side's bits go too
        // (the node persists the bitmap only after an fdatasync, so a clear bit on disk always
        // stands for durable data).
        for ack in resyncAcksFlushing {
            actions.append(.send(.resyncAck(id: ack.id, offset: ack.offset, length: ack.length, result: 0)))
        }
        for ack in resyncAcksFlushing { _ = bitmap.clearRange(offset: ack.offset, length: UInt64(ack.length)) }
        resyncAcksFlushing.removeAll(keepingCapacity: true)
        startResyncTargetFlush(into: &actions)
    }

    /// A flush failed on this disk (the target's own, or a replicated one): every resync run of
    /// this link not yet acknowledged is acknowledged with its error, as a failed write would
    /// be: those written now, and those still writing when they complete. Not only the runs the
    /// flush covered: Linux reports a writeback error to one fsync on a file descriptor, so the
    /// next flush could succeed without a block whose writeback failed before this one returned.
    private mutating func failUnacknowledgedResyncRuns(code: UInt32, into actions: inout [Action]) {
        for ack in resyncAcksFlushing + resyncAcksHeld {
            actions.append(.send(.resyncAck(id: ack.id, offset: ack.offset, length: ack.length, result: code)))
        }
        resyncAcksFlushing.removeAll(keepingCapacity: true)
        resyncAcksHeld.removeAll(keepingCapacity: true)
        for id in resyncWritesOwed.keys where resyncWritesOwed[id] == 0 { resyncWritesOwed[id] = code }
    }

    /// A replicated write failed over resync runs already written (it arrived after them): the
    /// source marks the range when it hears, and a successful ack arriving after that would
    /// clear the mark. Their acks carry the error instead (runs still writing cannot overlap it:
    /// overlapping writes are applied one after the other, in arrival order).
    private mutating func failWrittenResyncRuns(overlapping offset: UInt64, _ length: UInt32, into actions: inout [Action]) {
        let end = offset + UInt64(length)
        let overlaps = { (ack: HeldResyncAck) in ack.offset < end && offset < ack.offset + UInt64(ack.length) }
        for ack in resyncAcksFlushing + resyncAcksHeld where overlaps(ack) {
            actions.append(.send(.resyncAck(id: ack.id, offset: ack.offset, length: ack.length, result: 5)))  // EIO
        }
        resyncAcksFlushing.removeAll(where: overlaps)
        resyncAcksHeld.removeAll(where: overlaps)
    }

    /// The link or the resync ends: acks still owed are dropped with it (the source keeps its
    /// bits and copies those runs again). A target flush still on the disk completes with
    /// nothing to send, so a late one never acknowledges on a newer link.
    private mutating func dropResyncAcks() {
        resyncWritesOwed.removeAll(keepingCapacity: true)
        resyncAcksHeld.removeAll(keepingCapacity: true)
        resyncAcksFlushing.removeAll(keepingCapacity: true)
    }

    private mutating func resyncDone(into actions: inout [Action]) {
        guard sync == .syncTarget else { return protocolError("resyncDone outside a resync", into: &actions) }
        // The source ends only once every run is acknowledged: none can be owed here.
        guard resyncRunsUnacknowledged == 0 else {
            return protocolError("resyncDone with \(resyncRunsUnacknowledged) resync runs unacknowledged", into: &actions)
        }
        uuids = uuids.adoptedAfterResyncAsTarget(sourceCurrent: peerCurrentUUID)
        localFlags.remove(.resyncTarget)
        localFlags.remove(.crashedPrimary)
        localFlags.remove(.outdated)
        localFlags.insert(.consistent)
        peerDisk = .upToDate
        sync = .established
        if replicationFailedDuringResync {
            // A replicated write or flush failed here during the resync, and the source ended it
            // before it heard: this copy lacks an acknowledged write (the source marked it, but a
            // failover would promote this side without it). Detached, as for a secondary's failed
            // write; the marks stay for the resync after the next attach.
            replicationFailedDuringResync = false
            disk = .inconsistent
            detachLocalDisk(into: &actions)
            return
        }
        bitmap.clearAll()
        disk = .upToDate
        // Persisted (the node writes the metadata on `stateChanged`) before the source hears of
        // it: the source detaches its own disk for this copy only from this announcement on.
        actions.append(.stateChanged(status))
        actions.append(.send(.stateChange(PeerStateChange(role: role, diskState: disk, uuids: Self.wire(uuids)))))
    }

    public static func uuids(of hello: PeerHello) -> GenerationUUIDs {
        GenerationUUIDs(
            current: hello.uuids.current, bitmap: hello.uuids.bitmap,
            history0: hello.uuids.history.first ?? 0, history1: hello.uuids.history.dropFirst().first ?? 0)
    }

    /// The peer's flags as the decision reads them (Protocol/peer.md §5).
    static func flags(of hello: PeerHello) -> Superblock.Flags {
        var flags: Superblock.Flags = []
        switch hello.diskState {
        case .upToDate, .outdated, .consistent: flags.insert(.consistent)
        case .inconsistent: flags.insert(.resyncTarget)
        case .diskless, .failed: break
        }
        if hello.flags & PeerFlags.Hello.crashedPrimary != 0 { flags.insert(.crashedPrimary) }
        if hello.flags & PeerFlags.Hello.newZeroed != 0 { flags.insert(.newZeroed) }
        return flags
    }

    /// UUIDs as the wire carries them (four history slots; the superblock keeps two).
    public static func wire(_ u: GenerationUUIDs) -> PeerGenerationUUIDs {
        PeerGenerationUUIDs(current: u.current, bitmap: u.bitmap, history: [u.history0, u.history1, 0, 0])
    }

    /// The link went down: whatever the peer may not have is marked out of sync, and writes that
    /// waited for the peer complete on the local disk alone.
    public mutating func linkDown(_ reason: LinkDownReason, freshUUID: UInt64, into actions: inout [Action]) {
        releaseWritesHeldForHandshake(into: &actions)
        guard link == .connected || link == .handshaking else { return }
        let unconfirmed = writes.values.contains { $0.peerPending }
        while let entry = transferLog.pop() {
            settle(entry, outOfSync: true, into: &actions)
        }
        for (id, var write) in writes where write.peerPending {
            write.peerPending = false
            write.peerResult = -5  // EIO: the peer never confirmed it
            writes[id] = write
            markOutOfSync(offset: write.offset, length: UInt64(write.length))
        }
        for (id, var flush) in flushes where flush.peerPending {
            flush.peerPending = false
            flush.peerResult = -5  // what a detached disk answers: the peer never confirmed it
            flushes[id] = flush
        }
        peerFlushCoverage.removeAll()
        peerFlushesWaiting.removeAll()
        barriersWaiting.removeAll()
        if rollbackNoticeID != nil {
            // The peer may or may not have outdated itself: not an acknowledgement.
            rollbackNoticeID = nil
            actions.append(.rollbackNoticeAnswered(accepted: false))
        }
        if role == .primary {
            // The first write without the peer starts a generation the peer does not have: now,
            // if writes the peer never confirmed are answered below; else at the next write.
            // A primary that loses its link and writes nothing (it lost quorum, or it crashes
            // next) still holds the peer's generation and causes no split brain.
            spareUUID = freshUUID
            if uuids.bitmap == 0 && unconfirmed && !configuration.fencing && disk != .failed {
                uuids = uuids.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: freshUUID)
                spareUUID = nil
            }
        }
        peerDisk = nil
        peerRole = nil
        sourceWhenTheLinkDropped = sync == .syncSource || pendingSync == .syncSource
        sync = .established
        pendingSync = nil
        awaitingSkippedSyncUUID = false
        for i in resyncSlots.indices where resyncSlots[i] != nil {
            // A read still on the disk frees its slot when it completes; data already sent will
            // never be acknowledged on this link: its slot is free now (the bits stay set).
            if resyncSlots[i]!.sent { resyncSlots[i] = nil } else { resyncSlots[i]!.stale = true }
        }
        dropResyncAcks()
        lastTickNanos = nil
        link = (reason == .splitBrain || reason == .unrelatedData || reason == .administrative || reason == .sizeMismatch
                || peerDisconnectedForSplitBrain) ? .standalone : .connecting
        peerDisconnectedForSplitBrain = false
        // In id order: the answers go out in the order the requests came (and a replay of the
        // simulator sees the same order in every process).
        for id in writes.keys.sorted() { finishWriteIfDone(id, into: &actions) }
        for id in flushes.keys.sorted() { finishFlushIfDone(id, into: &actions) }
        actions.append(.stateChanged(status))
    }
}

/// A node's state as `tandem status` shows it.
public struct ReplicaStatus: Sendable, Equatable {
    public var role: PeerRole
    public var disk: PeerDiskState
    public var peerDisk: PeerDiskState?
    public var peerRole: PeerRole?
    public var link: LinkState
    public var sync: SyncState
    /// The last connect found a split brain or unrelated data: an operator must choose.
    public var splitBrain: Bool
    /// The last connect found a role conflict (`ReplicaCore.roleConflict`).
    public var roleConflict: RoleConflict?
    public var outOfSyncBytes: UInt64
    public var writesInFlight: Int
    public var transferLogEntries: Int
}

/// Why a connect ended in `roleConflict` (peer.md 4.1): the link is retried, but it connects only
/// once an operator acts (or a deposed primary demotes by itself).
public enum RoleConflict: String, Sendable, Equatable {
    /// Both nodes are primary: one must demote.
    case twoPrimaries = "both nodes are primary"
    /// This primary's peer holds newer data: connecting would resync it into this node under its
    /// clients. Demote this node to resync from the peer, or discard the peer's newer writes
    /// (`tandem connect --discard-my-data` on the peer).
    case peerHoldsNewerData = "the peer holds newer data"
    /// This primary's disk is detached and the peer holds another generation than the one it
    /// served: reads through the peer would change data under its clients.
    case peerHoldsOtherData = "the peer holds other data than this detached primary served"
}

