import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO
import TandemNBD

/// A node of a replicated resource (`tandem up`): carries out `ReplicaCore`'s actions with the
/// I/O engine, the peer link (`PeerConnection`) and, on the primary, the NBD server's requests.
///
/// The link (the higher node id dials, the lower listens), protocol C writes behind the activity
/// log, flushes, resync, verify, reads through the peer when the local disk fails, and metadata
/// persisted at every state change. Not yet: role changes at run time.
final class ReplicatedNode: IOHandler, NBDReplicator, PeerConnectionDelegate {
    private static let tagAccept: UInt32 = 0x1000_0000
    private static let tagConnect: UInt32 = 0x1000_0001
    private static let tagTick: UInt32 = 0x1000_0002
    private static let tagRetry: UInt32 = 0x1000_0003
    private static let tagDiffStep: UInt32 = 0x1000_0004
    private static let tagDiffSync: UInt32 = 0x1000_0005
    private static let tagRollbackAnswer: UInt32 = 0x1000_0006
    private static let tagCheckpointSync: UInt32 = 0x1000_0007
    private static let tagSettleTimer: UInt32 = 0x1000_0008
    /// Verify reads: this base plus the request's window slot (primary) or the peer's request
    /// slot (secondary).
    private static let tagVerifyLocal: UInt32 = 0x2000_0000
    private static let tagVerifyPeer: UInt32 = 0x3000_0000
    /// Reads served to the peer (its disk is detached): this base plus the slot.
    private static let tagServeRead: UInt32 = 0x4000_0000
    private static let servedReadToken: UInt64 = 1 << 62
    private static let verifyWindow = 4
    private static let verifyChunkBytes = PeerProtocol.verifyBytesMax
    private static let opsMax = Limits.diskQueueDepthMax
    private static let tickNanos: UInt64 = 100_000_000
    /// Ticks between resync checkpoints (one second).
    private static let resyncCheckpointTicks = 10
    private var ticks = 0
    /// The resync checkpoint's sync of the device is on the engine (a slow one is not doubled).
    private var checkpointSyncInFlight = false
    /// When the peer was last heard from, and the ping sent since (0: none).
    private var lastHeardNanos: UInt64 = 0
    private var pingSentNanos: UInt64 = 0
    private var pingID: UInt64 = 0

    let loop: IOLoop
    let logger: Logger
    let config: ResourceConfig
    let me: ResourceConfig.Node
    let peer: ResourceConfig.Node
    let device: BackingDevice
    let metadataPath: String
    private(set) var core: ReplicaCore
    private var superblock: Superblock
    private let serverTLS: TLSContext
    private let clientTLS: TLSContext
    private(set) var id: UInt32 = 0
    private var link: PeerConnection?
    /// The peer's hello arrived on `link` (peer.md "Frame order").
    private var peerHelloReceived = false
    private var listenFD: Int32 = -1
    private var dialFD: Int32 = -1
    private let dialAddress: UnsafeMutablePointer<SocketAddress>
    private var stopping = false
    var onStopped: (() -> Void)?
    /// The NBD export: writable through replication while primary, read-only while secondary.
    /// Held strongly: the server holds this node weakly, and the `onStopped` closure `Up` gives
    /// it at shutdown (which holds the node) is dropped once it has run. A weak reference
    /// gives the server a side table, and then every `unowned` access of its connections to it
    /// takes the runtime's slow path (with the per-READ copy of the core that `readsFromPeer`
    /// made, reference counting was 7.6% of a primary's samples under 4 KiB random reads,
    /// 4.0-4.5% without both; IOPS within noise).
    private var nbdServer: NBDServer?
    private var readRequestsAtTick: UInt64 = 0
    private let handlers: HandlerRunner
    /// Where `tandem events` lines go (the control server's subscribers).
    var onEvent: ((String) -> Void)?
    /// The state last reported, to tell handlers what changed.
    private var reported: ReplicaStatus?
    /// A demotion in progress (NBD clients draining, then the flush on both sides).
    private var demoting = false
    /// Flushes the node asked for itself (a demotion's), by id: what to do when done.
    private var internalFlushes: [UInt64: (Int32) -> Void] = [:]

    // MARK: Barriers

    /// The undo store that keeps barriers restorable (the node's `undo` directory).
    private var undo: UndoStore?
    /// Barriers this node created as primary, for `barrier list` on the primary.
    private var createdBarriers: [BarrierInfo] = []
    /// What was written since each of `createdBarriers`, for the NBD export's
    /// `qemu:dirty-bitmap:` contexts. In memory: a restarted node offers none of the old ones.
    private var changes: ChangeTracker
    private var lastScheduledBarrier: UInt64 = 0
    /// Read-only NBD exports of barriers, by barrier id.
    private var barrierExports: [UInt64: NBDServer] = [:]
    /// Copy-on-write of what the barriers need, before a write reaches the device (nil without
    /// an undo store).
    private var copyOnWrite: CopyOnWrite?
    /// A rollback in progress: restored a tick at a time so status (and `tandem rollback`'s
    /// progress bar) can follow it.
    private var rollbackRun: (id: UInt64, plan: RollbackPlan, next: Int, started: UInt64)?
    private static let rollbackChunksPerTick = 256
    /// The last rollback failed part way (it finishes when the node starts again).
    private var rollbackFailed = false
    /// A rollback a crash interrupted, redone at attach: its marks and generation are persisted
    /// in `start`, and only then is it finished in the undo store.
    private var rollbackToFinish: UInt64?
    /// With a witness, a rollback waits for its record before it restores anything
    /// (Protocol/barriers.md "Rollback and the witness"): the witness's, or else the peer's
    /// acknowledgement over the link (`viaPeer`; its answer, once it came, in `peerAnswer`).
    private var rollbackAsking: (id: UInt64, reply: (String) -> Void, viaPeer: Bool, peerAnswer: Bool?)?
    /// With a witness: this node rolls back, or rolled back and its peer has not resynced from it
    /// yet. Every state it reports to the witness says so (`rollingBack`), its hello too, so the
    /// witness promotes the peer no more. In memory: after a restart, the generation the
    /// rollback started (its bitmap UUID is the peer's current) keeps the peer from promotion.
    private var rollbackRecord = false
    /// `tandem diff` on this node: the stream being written a step at a time between the loop's
    /// other work (replication goes on), and the last one's outcome, for status.
    private var diffRun: DiffMaker?
    private var diffSyncFD: Int32 = -1
    private var lastDiff: (from: UInt64, to: UInt64, output: String, doneBytes: UInt64, totalBytes: UInt64,
                           summary: BarrierStream.MadeSummary?, error: String?)?
    /// Work per diff step on the loop, and the pause after it.
    private static let diffStepNanos: UInt64 = 2_000_000
    private static let diffPauseNanos: UInt64 = 1_000_000

    // MARK: Witness and quorum

    private var witness: WitnessClient?
    /// The witness recorded that this primary writes without its peer (the peer is fenced).
    private var fenced = false
    /// A fencing request is on its way to the witness (retried on the tick while answers wait).
    private var fenceInFlight = false
    /// Client answers held until the peer is fenced (a primary with a witness never acknowledges
    /// a write its peer lacks before the witness knows the peer is outdated).
    private var heldCompletions: [(id: UInt64, result: Int32, flush: Bool)] = []
    private var promotionRequested = false
    private var nextPromotionTry: UInt64 = 0
    private var hadQuorum = true
    /// The last reason a link attempt failed before it connected (repeats are logged at debug).
    private var lastLinkFailure: String?

    /// With a witness: this node sees its peer or the witness (2 of 3 votes). Without: always.
    var hasQuorum: Bool {
        guard let witness else { return true }
        return core.link == .connected || core.link == .handshaking || witness.up
    }

    private var actions: [ReplicaCore.Action] = []
    private var ops: [(tag: LocalIO.Tag, syncAfter: Bool)?]
    private var freeOps: [Int]
    private var clients: [UInt64: (connection: NBDConnection, slot: Int, started: UInt64)] = [:]

    // MARK: Metrics

    /// Client requests by kind (write, trim, zeroes, flush) and their bytes.
    private var requestCounts: [UInt64] = [0, 0, 0, 0]
    private var requestBytes: [UInt64] = [0, 0, 0, 0]
    private var writeLatency = LatencyHistogram()
    private var flushLatency = LatencyHistogram()
    private var tlsFailures: UInt64 = 0
    private var resyncedTotal: UInt64 = 0
    private var lastResynced: UInt64 = 0
    private var nextClientID: UInt64 = 1
    private var peerBuffers: [UInt64: PoolBuffer] = [:]
    /// The buffer a large payload is being decrypted into (`sinkFor`), until it is received.
    private var sinkBuffer: PoolBuffer?
    private var resyncBuffers: [Int: PoolBuffer] = [:]

    // MARK: Activity log (primary)

    /// The write-intent log: a write to a cold extent waits until a transaction naming it is on
    /// disk, so after a crash as primary only the hot extents need a resync.
    private var activityLog: ActivityLog
    /// The disk detached while primary, and the log's extents were marked out of sync for it.
    private var logMarkedAtDetach = false
    /// Client writes waiting for room in the log, in arrival order.
    private var waitingForLog: [(connection: NBDConnection, slot: Int, request: NBDRequest)] = []
    private let transactionBuffer: UnsafeMutableRawPointer

    /// Starts writes that waited for room in the activity log, in order.
    private func admitWaitingWrites() {
        while let first = waitingForLog.first, !heldByVerify(first.request), admitToLog(first.request) {
            waitingForLog.removeFirst()
            startClientRequest(first.connection, slot: first.slot, first.request)
        }
        if let first = waitingForLog.first, !heldByVerify(first.request) { flushPeerForRoom() }
    }

    /// Extents of answered writes stay hot until the peer flushed them (`writeSettled`): a write
    /// waiting for room asks the core to flush the peer rather than wait for the client's flush.
    private func flushPeerForRoom() {
        beginActions()
        core.flushPeerToSettleWrites(into: &actions)
        perform()
    }

    /// Asked once per READ: from the core's stored fields, not its computed property, which
    /// would copy the whole core here (`ReplicaCore.readsFromPeer(disk:link:peerDisk:)`).
    var readsFromPeer: Bool { ReplicaCore.readsFromPeer(disk: core.disk, link: core.link, peerDisk: core.peerDisk) }

    func localReadFailed() -> Bool {
        beginActions()
        let served = core.localReadFailed(into: &actions)
        perform()
        logger.error("local disk failed a read: detached\(served ? "; reads and writes go to \(peer.name)" : " and the peer cannot serve")")
        return served
    }

    func clientRead(_ connection: NBDConnection, slot: Int, _ request: NBDRequest) {
        // The peer serves whole 4 KiB blocks; the client's range sits inside.
        let block = UInt64(PeerProtocol.digestBlockBytes)
        let start = request.offset / block * block
        let end = min((request.offset + UInt64(request.length) + block - 1) / block * block, device.size)
        guard let link, end - start <= UInt64(PeerProtocol.dataPayloadBytesMax) else {
            return connection.replicatedReadCompleted(slot: slot, result: -EIO)
        }
        let readID = nextClientID
        nextClientID += 1
        peerReads[readID] = (connection, slot, start, UInt32(end - start), Int(request.offset - start), Int(request.length))
        link.send(.resyncRequest(id: readID, offset: start, length: UInt32(end - start)))
    }

    /// Secondary: reads a block range for the primary and sends it back as resync data.
    private func serveRead(id requestID: UInt64, offset: UInt64, length: UInt32) {
        guard length > 0, offset + UInt64(length) <= device.size, let buffer = loop.pool.take(Int(length)),
              let slot = (0..<Limits.nbdRequestsInFlightMax).first(where: { servedReads[$0] == nil })
        else { return link?.close(reason: "cannot serve a read for the peer") ?? () }
        servedReads[slot] = (requestID, offset, length, buffer)
        loop.engine.read(fd: device.fd, buffer: buffer.pointer, length: Int(length), offset: offset, fixedIndex: buffer.fixedIndex,
                         userData: IOLoop.userData(id, Self.tagServeRead + UInt32(slot)))
    }

    private func servedReadCompleted(_ slot: Int, _ result: Int32) {
        guard let served = servedReads[slot] else { return }
        guard let link else {
            servedReads[slot] = nil
            return loop.pool.release(served.buffer)
        }
        let ok = result == Int32(served.length)
        link.sendBlock(type: .resyncData, flags: 0, sequence: served.id,
                       block: PeerBlock(offset: served.offset, length: served.length, result: ok ? 0 : UInt32(EIO)),
                       payload: ok ? UnsafeRawPointer(served.buffer.pointer) : nil, token: Self.servedReadToken | UInt64(slot))
        // The buffer (and the slot) come back through `releasedPayload` once the frame is encrypted.
    }

    // MARK: Online verify state

    private struct VerifyChunk {
        var offset: UInt64
        var length: UInt32
        var local: [UInt32]?
        var peer: [UInt32]?
        var buffer: PoolBuffer?
    }

    private struct Verify {
        var next: UInt64 = 0
        var chunks: [VerifyChunk?] = Array(repeating: nil, count: ReplicatedNode.verifyWindow)
        var checkedBytes: UInt64 = 0
        var mismatchedBytes: UInt64 = 0
        /// Bytes neither compared nor counted as differing: a read failed on one side.
        var unreadableBytes: UInt64 = 0
        /// The next chunk waits for client writes in flight over it to finish.
        var waitingForWrites = false
    }

    /// Local verify reads still on the disk when their pass ended (the link dropped): the buffer
    /// is the engine's until the read completes, and the slot is not reused until then.
    private var verifyOrphans: [Int: PoolBuffer] = [:]
    /// Slots of a pass that ended with the link up (a demotion) whose digests the peer still
    /// owes: dropped when they come, not taken for protocol errors; the slots wait for them.
    private var verifyDigestsOwed: Set<Int> = []

    /// Ends a running pass early, keeping what it found (marked blocks stay marked).
    private func stopVerify(by why: String, linkUp: Bool) {
        guard let v = verify else { return }
        for (slot, chunk) in v.chunks.enumerated() {
            guard let chunk else { continue }
            // A chunk that still holds its buffer has its local read in flight.
            if let buffer = chunk.buffer { verifyOrphans[slot] = buffer }
            if linkUp && chunk.peer == nil { verifyDigestsOwed.insert(slot) }
        }
        verify = nil
        lastVerify = (v.checkedBytes, v.mismatchedBytes, v.unreadableBytes)
        logger.warning("verify: stopped by \(why) after \(v.checkedBytes) bytes (\(v.mismatchedBytes) differ)")
        admitWaitingWrites()
    }

    private var verify: Verify?
    /// The last verify's result, for status.
    private var lastVerify: (checked: UInt64, mismatched: UInt64, unreadable: UInt64)?
    /// Verify requests from the primary being read here: slot -> (id, offset, length, buffer).
    private var peerVerify: [Int: (id: UInt64, offset: UInt64, length: UInt32, buffer: PoolBuffer)] = [:]

    // MARK: Reads through the peer

    /// Primary: client reads the peer serves (the local disk is detached), by request id: the
    /// range asked for (`offset`, `requested`), and the client's part of it (`skip`, `length`).
    private var peerReads: [UInt64: (connection: NBDConnection, slot: Int, offset: UInt64, requested: UInt32, skip: Int, length: Int)] = [:]
    /// Secondary: reads being served to the primary, by slot.
    private var servedReads: [Int: (id: UInt64, offset: UInt64, length: UInt32, buffer: PoolBuffer)] = [:]

    init(loop: IOLoop, logger: Logger, config: ResourceConfig, me: ResourceConfig.Node, device: BackingDevice, primary: Bool) throws(ServeError) {
        guard let peer = config.peer(of: me.name), let metadataPath = me.metadataPath else {
            throw ServeError("resource \(config.name) has no peer data node for \(me.name)")
        }
        self.loop = loop
        self.logger = logger
        self.config = config
        self.me = me
        self.peer = peer
        self.device = device
        self.metadataPath = metadataPath
        let loaded = try MetadataFile.load(path: metadataPath, deviceBytes: device.size)
        superblock = loaded.superblock
        guard superblock.resourceName == config.name, Int(superblock.nodeID) == me.id else {
            throw ServeError("\(metadataPath) belongs to resource \(superblock.resourceName) node \(superblock.nodeID), not \(config.name) node \(me.id)")
        }
        if fdatasync(device.fd) != 0 {
            // A killed process leaves its completed writes in the device's volatile cache, and
            // this node's data is what the connect compares (a crashed primary is the source of
            // its hot extents): they must be durable before, or a power loss after the restart
            // takes them and the resync copies the older blocks over the peer's.
            guard superblock.flags.contains(.resyncTarget) else {
                throw ServeError("cannot sync \(device.path) before attaching it: \(SystemError.text(errno))")
            }
            logger.warning("cannot sync \(device.path) (\(SystemError.text(errno))); it waits for a resync from \(peer.name) anyway")
        }
        var bitmap = loaded.bitmap
        if superblock.flags.contains(.wasPrimary) || superblock.flags.contains(.crashedPrimary) {
            // A crash as primary: writes may have reached this disk and not the peer (or the
            // reverse) in the extents the activity log had hot. Those are out of sync.
            if loaded.recovery.isComplete {
                for range in loaded.recovery.hotByteRanges(deviceBytes: device.size) {
                    bitmap.setRange(offset: range.lowerBound, length: range.upperBound - range.lowerBound)
                }
            } else {
                bitmap.setAll()
            }
            superblock.flags.insert(.crashedPrimary)
            logger.warning("\(me.name) crashed as primary: \(bitmap.outOfSyncBytes) bytes of hot extents marked out of sync")
        }
        activityLog = ActivityLog(superblock: superblock, nextSequence: loaded.recovery.nextSequence)
        changes = ChangeTracker(deviceBytes: device.size, granuleBytesMin: config.barriers.chunkBytes)
        transactionBuffer = allocateAligned(ActivityLog.transactionBytes)
        var disk: PeerDiskState = superblock.flags.contains(.resyncTarget) || !superblock.flags.contains(.consistent) ? .inconsistent : .upToDate
        if disk == .upToDate && superblock.flags.contains(.outdated) { disk = .outdated }
        var primary = primary
        if primary && superblock.flags.contains(.resyncTarget) {
            // A detached disk, or an unfinished resync target: the peer's data must be copied in
            // first, and a primary is never a resync target (the connect would be refused forever).
            logger.warning("\(me.name) needs a resync from \(peer.name) (its disk was detached, or a resync into it did not finish): starting as secondary; promote it once it is UpToDate")
            primary = false
        }
        if disk == .upToDate && !primary && config.witness != nil {
            // With fencing, a disk attached without its peer is Consistent, not UpToDate (DRBD
            // does the same): after a power loss its volatile cache may have lost writes the
            // primary acknowledged, so it may not take over (the witness asks for UpToDate)
            // until a connect to the primary finds it current.
            disk = .consistent
        }
        if primary && disk == .inconsistent && !superblock.flags.contains(.resyncTarget) {
            // A new node started as primary on data of its own: its data is the one the peer gets.
            logger.warning("\(me.name) starts as primary on data never synced: it becomes the source of the initial sync")
            superblock.flags.insert(.consistent)
            disk = .upToDate
        }
        core = ReplicaCore(
            configuration: .init(nodeID: UInt8(me.id), deviceBytes: device.size, granularityBytes: superblock.layout.granularityBytes,
                                 resyncBytesPerSecond: UInt64(config.tuning.resyncBytesPerSecondMax),
                                 resyncBytesPerSecondMin: UInt64(config.tuning.resyncBytesPerSecondMin),
                                 splitBrainPolicy: config.failover.afterSplitBrain, fencing: config.witness != nil),
            role: primary ? .primary : .secondary, disk: disk, uuids: superblock.uuids, bitmap: bitmap, flags: superblock.flags)
        core.spareUUID = Self.freshUUID()
        if let undoPath = me.undoPath {
            let b = config.barriers
            do {
                let store = try UndoStore(
                    directory: undoPath, deviceBytes: device.size, chunkBytes: b.chunkBytes,
                    retention: BarrierRetention(countMax: b.keep, ageSecondsMax: b.keepHours > 0 ? Int64(b.keepHours) * 3600 : nil,
                                                bytesMax: b.keepBytes > 0 ? UInt64(b.keepBytes) : nil))
                for line in store.recoveryLog { logger.warning("undo store: \(line)") }
                if let pending = store.pendingRollback {
                    // Restored again from the start, then as `stepRollback` ends: the restored
                    // chunks out of sync and a new generation, persisted (in `start`) before the
                    // store forgets the rollback, so the peer resyncs them from here. (Without
                    // the marks the pair would connect as equals and the replicas differ.)
                    logger.warning("undo store: finishing the rollback to barrier \(pending) a crash interrupted")
                    let plan = try store.beginRollback(to: pending)
                    var buffer = [UInt8](repeating: 0, count: store.geometry.chunkBytes)
                    for restore in plan.restores {
                        try buffer.withUnsafeMutableBytes { raw in
                            let data = UnsafeMutableRawBufferPointer(rebasing: raw[0..<restore.record.dataBytes])
                            try store.readRecord(restore.record, of: restore.barrierID, into: data)
                            try BlockFile.write(device, UnsafeRawBufferPointer(data), at: store.geometry.offset(ofChunk: restore.chunk))
                        }
                    }
                    try BlockFile.dataSync(device.fd, device.path)
                    var ignored: [ReplicaCore.Action] = []
                    for restore in plan.restores {
                        core.markOutOfSync(offset: store.geometry.offset(ofChunk: restore.chunk), length: UInt64(store.geometry.length(ofChunk: restore.chunk)))
                    }
                    core.startGenerationAfterRollback(freshUUID: Self.freshUUID(), into: &ignored)
                    rollbackToFinish = pending
                    rollbackRecord = config.witness != nil
                }
                undo = store
                logger.info("undo store \(undoPath): \(store.barriers.count) barriers")
                let cow = CopyOnWrite(loop: loop, device: device, undo: store, logger: logger)
                cow.dropped = { dropped in
                    for (old, reason) in dropped { logger.notice("barrier \(old.id) dropped (\(reason.rawValue))") }
                }
                cow.failed = { why in
                    logger.error("undo store: \(why); dropping every barrier so replication goes on")
                    try? store.dropAll()
                }
                copyOnWrite = cow
            } catch {
                throw ServeError("undo store \(undoPath): \(error)")
            }
        }
        do {
            serverTLS = try TLSContext(server: true, certificate: me.certPath, key: me.keyPath, ca: config.tls.caPath, requirePeerCertificate: true, tls13Only: true)
            clientTLS = try TLSContext(server: false, certificate: me.certPath, key: me.keyPath, ca: config.tls.caPath, requirePeerCertificate: true, tls13Only: true)
        } catch {
            throw ServeError("TLS: \(error.message)")
        }
        handlers = HandlerRunner(config: config, node: me.name, peer: peer.name, logger: logger)
        if let w = config.witness {
            witness = try WitnessClient(loop: loop, logger: logger, config: config, me: me, witness: w, context: clientTLS)
        }
        ops = Array(repeating: nil, count: Self.opsMax)
        freeOps = Array((0..<Self.opsMax).reversed())
        dialAddress = .allocate(capacity: 1)
        do {
            dialAddress.initialize(to: try SocketAddress(host: peer.address.hostText, port: peer.address.port))
        } catch {
            throw ServeError("peer address \(peer.address): \(error)")
        }
        actions.reserveCapacity(256)
    }

    deinit {
        freeAligned(transactionBuffer, ActivityLog.transactionBytes)
        dialAddress.deallocate()
        if listenFD >= 0 { closeDescriptor(listenFD) }
    }

    var status: ReplicaStatus { core.status }

    func start() throws(ServeError) {
        id = loop.register(self)
        copyOnWrite?.release = { [unowned self] io in submitNow(io) }
        if let id = rollbackToFinish, let undo {
            persistMetadata()
            do { try undo.finishRollback(to: id) } catch { throw ServeError("undo store: finishing the rollback to barrier \(id): \(error)") }
            rollbackToFinish = nil
            logger.notice("rolled back to barrier \(id); \(peer.name) resyncs the restored chunks from here")
        }
        if core.role == .primary {
            superblock.flags.insert(.wasPrimary)
            persistMetadata()
        } else if superblock.flags.contains(.wasPrimary) || superblock.flags.contains(.crashedPrimary) {
            // Secondary after a crash as primary: the attach turned `wasPrimary` into
            // `crashedPrimary` (with the hot extents marked), which the core keeps, and persists,
            // until a resync copies them. `wasPrimary` goes now: kept, it would outlive that
            // resync, and a later crash as secondary (the peer primary since) would make this
            // node a crashed primary again, the source of its stale blocks over the peer's writes.
            superblock.flags.remove(.wasPrimary)
            persistMetadata()
        }
        if me.id < peer.id {
            do {
                let (fd, bound) = try Sockets.listen(host: me.address.hostText, port: me.address.port)
                listenFD = fd
                loop.engine.adoptSocket(fd)
                logger.info("replication: listening for \(peer.name) on \(bound)")
            } catch {
                throw ServeError("replication address \(me.address): \(error.errno == EADDRINUSE ? error.operation : error.description)")
            }
            loop.engine.accept(fd: listenFD, userData: IOLoop.userData(id, Self.tagAccept))
        } else {
            dial()
        }
        loop.addTimer(id: id, tag: Self.tagTick, afterNanos: Self.tickNanos)
        if let witness {
            witness.currentState = { [unowned self] in self.witnessState() }
            witness.onUp = { [unowned self] in self.announceToWitness() }
            witness.onDown = { [unowned self] in self.quorumMayHaveChanged() }
            witness.onDeposed = { [unowned self] why in
                guard self.core.role == .primary else { return }
                self.logger.error("witness: \(why): demoting")
                self.demote { answer in self.logger.notice("demoted after being deposed: \(answer)") }
            }
            witness.start()
        }
    }

    // MARK: Barriers

    /// Secondary: the primary's barrier reached this point of the stream.
    private func recordBarrier(_ info: BarrierInfo) {
        guard let undo else {
            return logger.warning("barrier \(info.id) '\(info.label)' arrived but this node has no undo directory: not kept")
        }
        do {
            // The writes before the barrier are on the device, maybe only in its volatile cache:
            // durable first, or a power loss could take them and a resync would later save the
            // older content as the barrier's image (Protocol/barriers.md, write ordering 1).
            try BlockFile.dataSync(device.fd, device.path)
            let dropped = try undo.createBarrier(info, nowUnixSeconds: Self.unixSeconds())
            logger.info("barrier \(info.id) '\(info.label)' recorded")
            emit("barrier-recorded", "\"id\":\(info.id),\"label\":\(jsonString(info.label))")
            for (old, reason) in dropped { logger.notice("barrier \(old.id) dropped (\(reason.rawValue))") }
        } catch {
            logger.error("barrier \(info.id): cannot record it: \(error); replication goes on without it")
        }
    }

    static func unixSeconds() -> Int64 { Int64(time(nil)) }

    /// Primary: `tandem barrier create`.
    private func createBarrier(label: String) -> String {
        guard core.role == .primary else { return Self.error("barriers are created on the primary") }
        do { try BarrierInfo.checkLabel(label) } catch { return Self.error("label: \(error)") }
        let newest = max(createdBarriers.last?.id ?? 0, undo?.index.newestID ?? 0)
        let info = BarrierInfo(id: max(newest + 1, Self.wallClockMillis()), createdUnixSeconds: Self.unixSeconds(), label: label)
        beginActions()
        let sent = core.createBarrier(info, into: &actions)
        perform()
        guard sent else { return Self.error("the secondary is not connected, UpToDate and in sync: it could not keep the barrier") }
        createdBarriers.append(info)
        if changes.barrierIDs.isEmpty {
            logger.info("changed-block tracking: \(changes.granuleCount) granules of \(changes.granuleBytes) bytes, \(changes.granuleCount * 2) bytes of memory")
        }
        changes.barrierCreated(info.id)
        if createdBarriers.count > Limits.barriersRetainedMax { changes.forget(createdBarriers.removeFirst().id) }
        publishDirtyBitmaps()
        logger.info("barrier \(info.id) '\(label)' created")
        emit("barrier-created", "\"id\":\(info.id),\"label\":\(jsonString(label))")
        return "{\"ok\":true,\"id\":\(info.id),\"time\":\(info.createdUnixSeconds)}"
    }

    private func listBarriers() -> String {
        if let undo, !undo.barriers.isEmpty || core.role == .secondary {
            let items = undo.barriers.map { row in
                "{\"id\":\(row.info.id),\"time\":\(row.info.createdUnixSeconds),\"label\":\(jsonString(row.info.label)),\"bytes_held\":\(row.bytesHeld),\"exported\":\(barrierExports[row.info.id].map { "\"\($0.boundAddress)\"" } ?? "null")}"
            }
            return "{\"node\":\"\(me.name)\",\"kept_here\":true,\"chunk_bytes\":\(undo.geometry.chunkBytes),\"barriers\":[\(items.joined(separator: ","))]}"
        }
        let items = createdBarriers.map {
            "{\"id\":\($0.id),\"time\":\($0.createdUnixSeconds),\"label\":\(jsonString($0.label)),\"bytes_held\":null,"
                + "\"dirty_bitmap\":\(changes.tracks($0.id) ? jsonString(NBD.dirtyBitmapPrefix + "\($0.id)") : "null")}"
        }
        return "{\"node\":\"\(me.name)\",\"kept_here\":false,\"kept_on\":\"\(peer.name)\",\"barriers\":[\(items.joined(separator: ","))]}"
    }

    /// `tandem barrier export ID --listen ADDRESS`: a read-only NBD export of the image at the
    /// barrier, while replication goes on.
    private func exportBarrier(_ id: UInt64, listen: String) -> String {
        guard let undo, undo.index.contains(id) else { return Self.error("no barrier \(id) is kept on \(me.name)") }
        guard barrierExports[id] == nil else { return Self.error("barrier \(id) is already exported on \(barrierExports[id]!.boundAddress)") }
        guard barrierExports.count < 8 else { return Self.error("8 barrier exports already; unexport one first") }
        guard let address = ResourceConfig.Address(listen: listen) else { return Self.error("--listen \(listen) is not HOST:PORT") }
        let export = NBDExport(
            name: "\(config.name)@\(id)", size: device.size, readOnly: true, blockSizeMin: 512,
            blockSizePreferred: UInt32(Limits.blockSize), blockSizeMax: UInt32(Limits.nbdRequestBytesMax),
            canTrim: false, canZero: false, canFastZero: false)
        let server: NBDServer
        do {
            server = try NBDServer(loop: loop, device: device,
                                   configuration: NBDServerConfiguration(host: address.hostText, port: address.port, export: export, tlsMode: .none, connectionsMax: 16,
                                                                         sendBufferBytes: config.tuning.nbdSendBufferBytes),
                                   tlsContext: nil, logger: logger)
        } catch {
            return Self.error("cannot listen on \(listen): \(error)")
        }
        let device = self.device
        server.imageReader = { [weak self] offset, buffer in
            guard let self, let undo = self.undo, undo.index.contains(id) else { return -ENOENT }
            do {
                try undo.readImage(at: id, offset: offset, into: buffer) { at, target in
                    try BlockFile.read(device, into: target, at: at)
                }
                return 0
            } catch {
                self.logger.error("barrier export \(id): \(error)")
                return -EIO
            }
        }
        server.start()
        barrierExports[id] = server
        logger.info("barrier \(id) exported read-only as \"\(export.name)\" on \(server.boundAddress)")
        return "{\"ok\":true,\"id\":\(id),\"export\":\"\(export.name)\",\"address\":\"\(server.boundAddress)\"}"
    }

    private func unexportBarrier(_ id: UInt64) -> String {
        guard let server = barrierExports.removeValue(forKey: id) else { return Self.error("barrier \(id) is not exported") }
        server.beginShutdown()
        return "{\"ok\":true}"
    }

    /// Why `tandem rollback ID` cannot start now, or nil.
    private func rollbackRefusal(_ id: UInt64) -> String? {
        guard let undo, undo.index.contains(id) else { return Self.error("no barrier \(id) is kept on \(me.name)") }
        guard rollbackRun == nil, rollbackAsking == nil else { return Self.error("a rollback is already running") }
        guard core.role == .secondary else { return Self.error("roll back on the secondary that keeps the barrier; \(me.name) is primary") }
        guard !demoting else { return Self.error("a demotion is in progress") }
        guard barrierExports.isEmpty else { return Self.error("unexport the barrier exports first") }
        guard copyOnWrite?.isIdle ?? true else { return Self.error("writes are still being saved for the barriers; try again in a moment") }
        guard diffRun == nil else { return Self.error("a diff is running (tandem status shows its progress); roll back after it") }
        guard core.peerRole != .primary else { return Self.error("\(peer.name) is primary: demote it first (tandem secondary), so nothing writes during the rollback") }
        return nil
    }

    /// `tandem rollback ID [force]`: on the secondary (the primary demoted first). The device
    /// goes back to the barrier's image; the chunks that changed since are marked out of sync and
    /// this node starts a new generation, so on reconnect the peer resyncs exactly those from
    /// here. With a witness, nothing is restored before the rollback is recorded: by the witness
    /// (it promotes the peer no more), or else by the peer over the link (it outdated itself);
    /// neither reachable, the rollback is refused unless `force`.
    private func rollback(to id: UInt64, force: Bool, reply: @escaping (String) -> Void) {
        if let refusal = rollbackRefusal(id) { return reply(refusal) }
        guard let witness, !force else {
            if witness != nil {
                logger.warning("rollback to barrier \(id) with --force: nothing records it first; if \(peer.name) misses the notice the witness may promote it meanwhile, a split brain with the rollback (found at the reconnect)")
            }
            return reply(startRollback(to: id))
        }
        rollbackAsking = (id, reply, false, nil)
        // From now on every state this node reports to the witness says it rolls back: a state
        // without it, overtaking the request, would end the record.
        rollbackRecord = true
        guard witness.up else { return askPeerForRollback(why: "the witness is unreachable") }
        witness.request(witnessState()) { [weak self] answer in
            guard let self, let asking = self.rollbackAsking, asking.id == id, !asking.viaPeer else { return }
            switch answer {
            case .recorded:
                self.logger.notice("the witness recorded the rollback to barrier \(id): it promotes \(self.peer.name) no more until \(self.peer.name) resynced from \(self.me.name)")
                self.rollbackRecorded()
            case .refused:
                self.rollbackNotRecorded(
                    "cannot roll back: the witness refused to record the rollback (see its log: \(self.peer.name) is primary, or the witness has not heard from \(self.peer.name) since it started); demote \(self.peer.name), or wait until the witness hears from it")
            case .unreachable:
                self.askPeerForRollback(why: "the witness link went down before the witness answered")
            }
        }
    }

    /// The witness cannot record the rollback: the peer may, over the link (it outdates itself,
    /// persisted, then replies).
    private func askPeerForRollback(why: String) {
        guard let asking = rollbackAsking else { return }
        beginActions()
        let sent = core.role == .secondary && core.noticeRollback(into: &actions)
        perform()
        guard sent else {
            return rollbackNotRecorded(
                "cannot roll back: \(why) and \(peer.name) is not connected, so nothing can record that \(peer.name)'s data is about to be outdated: the witness could promote \(peer.name) during the rollback (a split brain with it). Reconnect the witness or \(peer.name), or add --force to roll back anyway")
        }
        rollbackAsking!.viaPeer = true
        logger.notice("rollback to barrier \(asking.id): \(why); asking \(peer.name) over the link to outdate itself first")
    }

    /// The peer's answer to the rollback notice (`rollbackNoticeAnswered`), after the batch of
    /// actions it came in.
    private func rollbackNoticeAnswered() {
        guard let asking = rollbackAsking, asking.viaPeer, let accepted = asking.peerAnswer else { return }
        if accepted {
            logger.notice("\(peer.name) outdated itself for the rollback to barrier \(asking.id)")
            return rollbackRecorded()
        }
        rollbackNotRecorded(
            "cannot roll back: the witness is unreachable and \(peer.name) did not acknowledge the rollback (it is primary, or the link went down first): nothing records that \(peer.name)'s data is about to be outdated. Reconnect the witness or \(peer.name), or add --force to roll back anyway")
    }

    private func rollbackRecorded() {
        guard let asking = rollbackAsking else { return }
        rollbackAsking = nil
        if let refusal = rollbackRefusal(asking.id) {
            // Something changed while it was asked (a promotion, a write to save): not now.
            rollbackRecord = false
            announceToWitness()
            return asking.reply(refusal)
        }
        asking.reply(startRollback(to: asking.id))
    }

    private func rollbackNotRecorded(_ why: String) {
        guard let asking = rollbackAsking else { return }
        rollbackAsking = nil
        rollbackRecord = false
        // A record the witness may hold (its answer lost with the link) ends with this state.
        announceToWitness()
        logger.error("rollback to barrier \(asking.id) refused: \(why)")
        asking.reply(Self.error(why))
    }

    /// The rollback starts: the peer is told why the link goes down (`disconnect(rollback)`: it
    /// marks itself Outdated, so neither the witness nor an operator without --force promotes it
    /// while this device goes back), the marker is written, then the restores run on the tick.
    private func startRollback(to id: UInt64) -> String {
        guard let undo else { return Self.error("no undo store") }
        rollbackRecord = witness != nil
        beginActions()
        core.disconnect(freshUUID: Self.freshUUID(), forRollback: true, into: &actions)
        perform()
        let plan: RollbackPlan
        do {
            plan = try undo.beginRollback(to: id)
        } catch {
            rollbackRecord = false
            announceToWitness()
            logger.error("rollback to barrier \(id) failed: \(error)")
            return Self.error("rollback failed: \(error); the node stays disconnected")
        }
        rollbackRun = (id, plan, 0, monotonicNanos())
        rollbackFailed = false
        logger.notice("rolling back to barrier \(id): \(plan.restores.count) chunks to restore")
        emit("rollback-start", "\"id\":\(id),\"chunks\":\(plan.restores.count)")
        return "{\"ok\":true,\"started\":true,\"id\":\(id),\"chunks\":\(plan.restores.count)}"
    }

    /// Restores the next chunks of a rollback (on the tick); at the end, syncs the device, ends
    /// the rollback in the undo store, marks the restored chunks out of sync, starts a new
    /// generation and connects, so the peer resyncs exactly those chunks from here.
    private func stepRollback() {
        guard var run = rollbackRun, let undo else { return }
        let geometry = undo.geometry
        let device = self.device
        do {
            var buffer = [UInt8](repeating: 0, count: geometry.chunkBytes)
            let end = min(run.next + Self.rollbackChunksPerTick, run.plan.restores.count)
            for restore in run.plan.restores[run.next..<end] {
                try buffer.withUnsafeMutableBytes { raw in
                    let data = UnsafeMutableRawBufferPointer(rebasing: raw[0..<restore.record.dataBytes])
                    try undo.readRecord(restore.record, of: restore.barrierID, into: data)
                    try BlockFile.write(device, UnsafeRawBufferPointer(data), at: geometry.offset(ofChunk: restore.chunk))
                }
                changes.written(offset: geometry.offset(ofChunk: restore.chunk), length: UInt64(geometry.length(ofChunk: restore.chunk)))
            }
            run.next = end
            rollbackRun = run
            if end < run.plan.restores.count {
                if ticks % 10 == 0 { emit("rollback-progress", "\"id\":\(run.id),\"done_chunks\":\(end),\"total_chunks\":\(run.plan.restores.count)") }
                return
            }
            guard fdatasync(device.fd) == 0 else { throw UndoStoreError("cannot sync \(device.path): \(SystemError.text(errno))") }
            // The restored chunks out of sync and a new generation, durable before the store
            // forgets the rollback: a crash in between redoes the rollback at the next start
            // (which marks them again), never leaves a device the peer takes for its equal.
            beginActions()
            for restore in run.plan.restores {
                core.markOutOfSync(offset: geometry.offset(ofChunk: restore.chunk), length: UInt64(geometry.length(ofChunk: restore.chunk)))
            }
            core.startGenerationAfterRollback(freshUUID: Self.freshUUID(), into: &actions)
            perform()
            persistMetadata()
            try undo.finishRollback(to: run.id)
        } catch {
            rollbackRun = nil
            rollbackFailed = true
            logger.error("rollback to barrier \(run.id) failed: \(error); it finishes when the node starts again")
            emit("rollback-failed", "\"id\":\(run.id)")
            return
        }
        rollbackRun = nil
        beginActions()
        core.connect(discardMyData: false, into: &actions)
        perform()
        persistMetadata()
        if me.id > peer.id { dial() }
        let micros = (monotonicNanos() - run.started) / 1000
        logger.notice("rolled back to barrier \(run.id) in \(micros) µs: \(run.plan.restores.count) chunks restored, \(run.plan.newer.count) newer barriers dropped; \(peer.name) resyncs them from here")
        emit("rollback-done", "\"id\":\(run.id),\"chunks_restored\":\(run.plan.restores.count),\"barriers_dropped\":\(run.plan.newer.count)")
    }

    /// `tandem diff FROM TO --output PATH` on a running node: the stream is written by the node
    /// (it owns the undo store), a step of at most `diffStepNanos` at a time, then synced on the
    /// engine and renamed. Replication goes on meanwhile: a chunk's image at a barrier read on the
    /// loop is always whole (copy-on-write); a barrier dropped meanwhile stops the diff.
    private func startDiff(from: UInt64?, to: UInt64, output: String) -> String {
        guard let undo else { return Self.error("\(me.name) keeps no barriers (no undo directory)") }
        guard diffRun == nil else { return Self.error("a diff is already running (to \(diffRun!.output))") }
        guard rollbackRun == nil, rollbackAsking == nil else { return Self.error("a rollback is running") }
        guard output.hasPrefix("/") else { return Self.error("the output path must be absolute") }
        let device = self.device
        let maker: DiffMaker
        do {
            maker = try DiffMaker(store: undo, deviceBytes: device.size, from: from, to: to, output: output, nowUnixSeconds: Self.unixSeconds()) { offset, buffer in
                try BlockFile.read(device, into: buffer, at: offset)
            }
        } catch {
            return Self.error("\(error)")
        }
        diffRun = maker
        lastDiff = (from ?? 0, to, output, 0, maker.totalBytes, nil, nil)
        loop.addTimer(id: id, tag: Self.tagDiffStep, afterNanos: 0)
        logger.notice("diff \(from ?? 0) → \(to) to \(output): \(maker.totalBytes) bytes of changed chunks to compare")
        emit("diff-start", "\"from\":\(from ?? 0),\"to\":\(to),\"output\":\(jsonString(output)),\"total_bytes\":\(maker.totalBytes)")
        return "{\"ok\":true,\"started\":true,\"from\":\(from ?? 0),\"to\":\(to),\"total_bytes\":\(maker.totalBytes)}"
    }

    /// The next chunks of a diff; at the end, the trailer and a sync on the engine.
    private func stepDiff() {
        guard let maker = diffRun, diffSyncFD < 0 else { return }
        let deadline = monotonicNanos() + Self.diffStepNanos
        do {
            var done = false
            repeat { done = try maker.step(chunksMax: 8) } while !done && monotonicNanos() < deadline
            lastDiff?.doneBytes = maker.doneBytes
            if !done { return loop.addTimer(id: id, tag: Self.tagDiffStep, afterNanos: Self.diffPauseNanos) }
            try maker.writeTrailer()
            diffSyncFD = dup(maker.descriptor)
            guard diffSyncFD >= 0 else { throw UndoStoreError("cannot sync \(maker.partial): \(SystemError.text(errno))") }
            loop.engine.fsync(fd: diffSyncFD, datasync: true, userData: IOLoop.userData(id, Self.tagDiffSync))
        } catch {
            finishDiff(.failure(UndoStoreError("\(error)")))
        }
    }

    private func diffSynced(_ result: Int32) {
        if result == -EINTR || result == -EAGAIN {
            return loop.engine.fsync(fd: diffSyncFD, datasync: true, userData: IOLoop.userData(id, Self.tagDiffSync))
        }
        closeDescriptor(diffSyncFD)
        diffSyncFD = -1
        guard let maker = diffRun else { return }
        if result < 0 { return finishDiff(.failure(UndoStoreError("cannot sync \(maker.partial): \(SystemError.text(-result))"))) }
        do {
            finishDiff(.success(try maker.commit(synced: true)))
        } catch {
            finishDiff(.failure(UndoStoreError("\(error)")))
        }
    }

    private func finishDiff(_ outcome: Result<BarrierStream.MadeSummary, UndoStoreError>) {
        guard let maker = diffRun else { return }
        diffRun = nil
        switch outcome {
        case .success(let summary):
            lastDiff?.summary = summary
            logger.notice("diff to \(maker.output): \(summary.chunks) chunks, \(summary.dataBytes) bytes of data, \(summary.streamBytes) bytes")
            emit("diff-done", "\"output\":\(jsonString(maker.output)),\"chunks\":\(summary.chunks),\"stream_bytes\":\(summary.streamBytes)")
        case .failure(let error):
            maker.abandon()
            lastDiff?.error = error.message
            logger.error("diff to \(maker.output) failed: \(error.message)")
            emit("diff-failed", "\"output\":\(jsonString(maker.output)),\"error\":\(jsonString(error.message))")
        }
    }

    private var diffStatusJSON: String {
        guard let d = lastDiff else {
            return "{\"running\":false,\"from\":null,\"to\":null,\"output\":null,\"done_bytes\":0,\"total_bytes\":0,\"chunks\":null,\"stream_bytes\":null,\"error\":null}"
        }
        return "{\"running\":\(diffRun != nil),\"from\":\(d.from),\"to\":\(d.to),\"output\":\(jsonString(d.output)),\"done_bytes\":\(d.doneBytes),"
            + "\"total_bytes\":\(d.totalBytes),\"chunks\":\(d.summary.map { "\($0.chunks)" } ?? "null"),"
            + "\"stream_bytes\":\(d.summary.map { "\($0.streamBytes)" } ?? "null"),\"error\":\(d.error.map(jsonString) ?? "null")}"
    }

    // MARK: Metrics

    /// The Prometheus text exposition of this node (`metrics` address in the resource file).
    func metricsText() -> String {
        let s = core.status
        let l = "resource=\"\(config.name)\",node=\"\(me.name)\""
        if core.resyncedBytes < lastResynced { lastResynced = 0 }
        resyncedTotal &+= core.resyncedBytes - lastResynced
        lastResynced = core.resyncedBytes
        var out = ""
        func gauge(_ name: String, _ help: String, _ value: String, _ extra: String = "", type: String = "gauge") {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n\(name){\(l)\(extra)} \(value)\n"
        }
        gauge("tandem_primary", "1 if this node is primary", s.role == .primary ? "1" : "0")
        gauge("tandem_connected", "1 while the replication link is connected", s.link == .connected ? "1" : "0")
        gauge("tandem_split_brain", "1 after a connect found a split brain", s.splitBrain ? "1" : "0")
        gauge("tandem_quorum", "1 while the node has quorum (always 1 without a witness)", hasQuorum ? "1" : "0")
        out += "# HELP tandem_disk_state The local disk state (1 for the current one)\n# TYPE tandem_disk_state gauge\n"
        for state in ["diskless", "failed", "inconsistent", "outdated", "consistent", "upToDate"] {
            out += "tandem_disk_state{\(l),state=\"\(Self.title(state))\"} \("\(s.disk)" == state ? 1 : 0)\n"
        }
        out += "# HELP tandem_peer_disk_state The peer's disk state (1 for the current one; none while disconnected)\n# TYPE tandem_peer_disk_state gauge\n"
        for state in ["diskless", "failed", "inconsistent", "outdated", "consistent", "upToDate"] {
            out += "tandem_peer_disk_state{\(l),state=\"\(Self.title(state))\"} \(s.peerDisk.map { "\($0)" == state ? 1 : 0 } ?? 0)\n"
        }
        gauge("tandem_out_of_sync_bytes", "Bytes marked out of sync with the peer", "\(s.outOfSyncBytes)")
        gauge("tandem_writes_in_flight", "Client writes waiting for the local disk or the peer", "\(s.writesInFlight)")
        gauge("tandem_transfer_log_entries", "Writes the peer acknowledged and no flush covers yet", "\(s.transferLogEntries)")
        gauge("tandem_resync_bytes_total", "Bytes copied by resyncs (as source)", "\(resyncedTotal)", type: "counter")
        gauge("tandem_resync_running", "1 while a resync runs", s.sync == .established ? "0" : "1")
        out += "# HELP tandem_requests_total Client requests by kind\n# TYPE tandem_requests_total counter\n"
        out += "# HELP tandem_request_bytes_total Client request bytes by kind\n# TYPE tandem_request_bytes_total counter\n"
        for (i, kind) in ["write", "trim", "zeroes", "flush"].enumerated() {
            out += "tandem_requests_total{\(l),kind=\"\(kind)\"} \(requestCounts[i])\n"
            if i < 3 { out += "tandem_request_bytes_total{\(l),kind=\"\(kind)\"} \(requestBytes[i])\n" }
        }
        out += "tandem_requests_total{\(l),kind=\"read\"} \(nbdServer?.readRequests ?? 0)\n"
        out += "tandem_request_bytes_total{\(l),kind=\"read\"} \(nbdServer?.readBytes ?? 0)\n"
        out += "# HELP tandem_write_latency_seconds Client writes (protocol C: both disks) from arrival to answer\n# TYPE tandem_write_latency_seconds histogram\n"
        writeLatency.render("tandem_write_latency_seconds", labels: l, into: &out)
        out += "# HELP tandem_flush_latency_seconds Client flushes from arrival to answer\n# TYPE tandem_flush_latency_seconds histogram\n"
        flushLatency.render("tandem_flush_latency_seconds", labels: l, into: &out)
        gauge("tandem_barriers", "Barriers kept in this node's undo store", "\(undo?.barriers.count ?? 0)")
        gauge("tandem_barrier_bytes", "Bytes the kept barriers hold", "\(undo?.barriers.reduce(UInt64(0)) { $0 + $1.bytesHeld } ?? 0)")
        gauge("tandem_replication_buffers", "Pool buffers held for replicated writes, resync data and reads served to the peer",
              "\(peerBuffers.count + resyncBuffers.count + servedReads.count + (sinkBuffer == nil ? 0 : 1))")
        let poll = loop.engine.pollStats
        gauge("tandem_poll_hits_total", "Waits that polled and found a completion without sleeping", "\(poll.hits)", type: "counter")
        gauge("tandem_poll_misses_total", "Waits that polled for the whole budget, then slept", "\(poll.misses)", type: "counter")
        gauge("tandem_poll_preempted_total", "Polls during which another thread took the CPU (each backs off polling)", "\(poll.preempted)", type: "counter")
        gauge("tandem_poll_seconds_total", "CPU time spent polling before sleeping", "\(Double(poll.pollNanos) / 1e9)", type: "counter")
        gauge("tandem_tls_handshake_failures_total", "Peer links that failed in TLS (wrong CA, name, plaintext)", "\(tlsFailures)", type: "counter")
        return out
    }

    // MARK: Witness

    private func witnessState() -> PeerStateChange {
        var flags: UInt16 = 0
        if core.role == .primary && !core.replicating { flags |= PeerFlags.State.peerOutdated }
        if rollbackRecord && core.role == .secondary { flags |= PeerFlags.State.rollingBack }
        return PeerStateChange(role: core.role, diskState: core.disk, flags: flags, uuids: ReplicaCore.wire(core.uuids))
    }

    /// Tells the witness the current state; a primary writing without its peer waits for the
    /// witness to record that before it answers clients (fencing).
    private func announceToWitness() {
        guard let witness, witness.up else { return quorumMayHaveChanged() }
        let state = witnessState()
        let fencing = state.flags & PeerFlags.State.peerOutdated != 0
        if fencing { fenceInFlight = true }
        witness.request(state) { [weak self] answer in
            guard let self else { return }
            let recorded = answer == .recorded
            if fencing { self.fenceInFlight = false }
            if fencing && recorded && self.core.role == .primary && !self.core.replicating {
                // The writes about to be answered are data the peer lacks: a new generation,
                // on disk before any answer. Not while this node's hello is out (the core says
                // so): the answers stay held, and a later tick asks the witness again.
                self.beginActions()
                let started = self.core.startGenerationWithoutPeer(into: &self.actions)
                self.perform()
                if started {
                    self.fenced = true
                    self.logger.notice("witness recorded \(self.peer.name) as outdated: answering writes without it")
                    self.releaseHeld(error: nil)
                }
            }
            self.quorumMayHaveChanged()
        }
    }

    private func releaseHeld(error: Int32?) {
        let held = heldCompletions
        heldCompletions.removeAll()
        for h in held {
            guard let client = clients.removeValue(forKey: h.id) else { continue }
            client.connection.replicatedCompleted(slot: client.slot, result: error ?? h.result)
        }
    }

    /// Quorum lost: a primary fails what it held and every write from now on; regained: the
    /// node goes on.
    private func quorumMayHaveChanged() {
        let quorum = hasQuorum
        defer { hadQuorum = quorum }
        if !quorum && core.role == .primary {
            if hadQuorum {
                logger.error("quorum lost: neither \(peer.name) nor the witness is reachable; writes fail until one is back")
                emit("quorum-lost", "")
                handlers.fire(.quorumLost, [peer.name], nowNanos: monotonicNanos())
            }
            releaseHeld(error: -EIO)
        } else if quorum && !hadQuorum {
            logger.notice("quorum regained")
            emit("quorum-regained", "")
        }
    }

    /// A secondary that lost its primary asks the witness whether it may take over.
    private func considerAutomaticFailover(now: UInt64) {
        guard let witness, witness.up, config.failover.autoPromote, core.role == .secondary, core.disk == .upToDate,
              core.link == .connecting, !promotionRequested, !demoting, now >= nextPromotionTry, !stopping,
              rollbackAsking == nil, rollbackRun == nil
        else { return }
        promotionRequested = true
        var state = witnessState()
        state.role = .primary
        witness.request(state) { [weak self] answer in
            guard let self else { return }
            self.promotionRequested = false
            if case .refused(peerRollsBack: true) = answer { self.peerRollsBackSaysTheWitness() }
            guard answer == .recorded, self.core.role == .secondary, self.core.link == .connecting else {
                self.nextPromotionTry = monotonicNanos() + 500_000_000
                return
            }
            self.logger.warning("automatic failover: \(self.peer.name) is gone and the witness agrees: promoting")
            _ = self.promoteLocally(force: false)
        }
    }

    /// The witness refused this node's promotion because it holds the peer's rollback: this
    /// node's data is about to be older than the peer's. Outdated (persisted) until it resyncs
    /// from the peer, as if the peer's notice had arrived.
    private func peerRollsBackSaysTheWitness() {
        guard core.role == .secondary, core.link != .connected, core.link != .handshaking else { return }
        if !core.peerLeftForRollback {
            logger.warning("the witness says \(peer.name) rolls back to a barrier: \(me.name) is Outdated until it resyncs from \(peer.name)")
        }
        beginActions()
        core.peerRollsBack(into: &actions)
        perform()
    }

    // MARK: Link establishment

    private func dial() {
        guard !stopping, link == nil, dialFD < 0, core.link != .standalone else { return }
        do {
            dialFD = try Sockets.stream(family: dialAddress.pointee.family)
        } catch {
            logger.warning("replication: cannot create a socket: \(error)")
            return retryLater()
        }
        loop.engine.adoptSocket(dialFD)
        loop.engine.connect(fd: dialFD, address: SocketAddress.sockaddrPointer(dialAddress), length: dialAddress.pointee.length, userData: IOLoop.userData(id, Self.tagConnect))
    }

    private func retryLater() {
        guard !stopping else { return }
        loop.addTimer(id: id, tag: Self.tagRetry, afterNanos: UInt64(config.tuning.connectRetryMillis) * 1_000_000)
    }

    private func attach(_ fd: Int32, server: Bool) {
        Sockets.setNoDelay(fd)
        Sockets.setSendBuffer(fd, bytes: config.tuning.linkSendBufferBytes)
        let connection = PeerConnection(loop: loop, fd: fd, context: server ? serverTLS : clientTLS, expectedPeerName: peer.name, delegate: self)
        link = connection
        connection.start()
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        switch tag {
        case Self.tagAccept:
            if result >= 0 {
                if link == nil && !stopping && core.link != .standalone {
                    attach(result, server: true)
                } else {
                    closeDescriptor(result)
                }
            }
            if !stopping && result != -EINVAL { loop.engine.accept(fd: listenFD, userData: IOLoop.userData(id, Self.tagAccept)) }
        case Self.tagConnect:
            let fd = dialFD
            dialFD = -1
            if result == 0 && !stopping {
                attach(fd, server: false)
            } else {
                closeDescriptor(fd)
                retryLater()
            }
        case Self.tagRetry:
            dial()
        case Self.tagDiffStep:
            stepDiff()
        case Self.tagDiffSync:
            diffSynced(result)
        case Self.tagRollbackAnswer:
            rollbackNoticeAnswered()
        case Self.tagCheckpointSync:
            checkpointSynced(result)
        case Self.tagSettleTimer:
            logger.warning("the flush before stopping took over \(Limits.stopSettleSeconds) s: stopping anyway")
            settled()
        case Self.tagTick:
            beginActions()
            // Reads served from the local disk compete with a resync too (writes the core sees).
            if let reads = nbdServer?.readRequests, reads != readRequestsAtTick {
                readRequestsAtTick = reads
                core.applicationIO()
            }
            core.tick(nowNanos: monotonicNanos(), into: &actions)
            perform()
            ticks &+= 1
            checkPeerAlive()
            link?.flushLazy()
            if ticks % 10 == 0 { handlers.reap(nowNanos: monotonicNanos()) }
            if rollbackRun != nil { stepRollback() }
            if ticks % 100 == 0, let undo {
                do {
                    for (old, reason) in try undo.applyRetention(nowUnixSeconds: Self.unixSeconds()) { logger.notice("barrier \(old.id) dropped (\(reason.rawValue))") }
                } catch {
                    logger.error("undo store retention: \(error)")
                }
            }
            if config.barriers.intervalMinutes > 0, core.role == .primary, core.replicating {
                let now = monotonicNanos()
                if lastScheduledBarrier == 0 { lastScheduledBarrier = now }
                if now - lastScheduledBarrier >= UInt64(config.barriers.intervalMinutes) * 60_000_000_000 {
                    lastScheduledBarrier = now
                    _ = createBarrier(label: "scheduled")
                }
            }
            if let witness {
                let now = monotonicNanos()
                witness.tick(now: now)
                considerAutomaticFailover(now: now)
                // A refused fencing request (the witness had not heard from the peer since it
                // started) is asked again while answers wait for it.
                if mustHold && !heldCompletions.isEmpty && !fenceInFlight && ticks % 5 == 0 { announceToWitness() }
            }
            if core.sync != .established && ticks % Self.resyncCheckpointTicks == 0 {
                emit("resync-progress", "\"done_bytes\":\(core.resyncedBytes),\"out_of_sync_bytes\":\(core.bitmap.outOfSyncBytes)")
                checkpointResync()
            }
            if !stopping { loop.addTimer(id: id, tag: Self.tagTick, afterNanos: Self.tickNanos) }
        default:
            if tag >= Self.tagServeRead {
                servedReadCompleted(Int(tag - Self.tagServeRead), result)
            } else if tag >= Self.tagVerifyPeer {
                peerVerifyRead(Int(tag - Self.tagVerifyPeer), result)
            } else if tag >= Self.tagVerifyLocal {
                verifyLocalRead(Int(tag - Self.tagVerifyLocal), result)
            } else {
                localCompleted(Int(tag), result)
            }
        }
    }

    /// Resync progress survives a crash: the device is synced, then the bitmap persisted
    /// (Protocol/peer.md, resync). The sync goes through the engine, off the loop, and its result
    /// is the core's to handle: on Linux a writeback error is reported to one fsync per open file
    /// description, and the device's descriptor is the one every replicated and resync flush
    /// uses, so an error swallowed here would let the next of them succeed without the lost
    /// block. A detached disk is never synced again (the peer's copy is the one that counts).
    private func checkpointResync() {
        guard !checkpointSyncInFlight else { return }
        guard core.disk != .failed else { return persistMetadata() }
        checkpointSyncInFlight = true
        loop.engine.fsync(fd: device.fd, datasync: true, userData: IOLoop.userData(id, Self.tagCheckpointSync))
    }

    private func checkpointSynced(_ result: Int32) {
        checkpointSyncInFlight = false
        if result < 0 { localSyncFailed(result, during: "the resync checkpoint") }
        // Bits clear only once a flush covered the data they stand for (the target's own, or
        // the target's before its ack), so the bitmap may be persisted after a failed sync too:
        // with the detached disk's flags.
        if !stopping { persistMetadata() }
    }

    /// A sync of the data device that no request waits for failed: a disk failure, handled by
    /// the core as the failed flush it may have hidden (`ReplicaCore.localSyncFailed`).
    private func localSyncFailed(_ result: Int32, during what: String) {
        beginActions()
        core.localSyncFailed(result: result, into: &actions)
        perform()
        logger.error("local disk: \(what) failed to sync \(device.path): \(SystemError.text(-result)); a completed write may not be on the disk: \(syncFailureOutcome)")
    }

    /// What `ReplicaCore.localSyncFailed` did, for the log line.
    private var syncFailureOutcome: String {
        core.disk == .failed ? "detached"
            : core.role == .secondary && core.disk == .inconsistent ? "detached when the resync ends"
            : core.role == .secondary ? "kept (it holds writes \(peer.name) lacks: detached, no copy would hold them)"
            : "the next flush reports the error (\(peer.name) is no full copy to detach to)"
    }

    // MARK: PeerConnectionDelegate

    /// Pings a quiet peer, and drops the link when it stays silent past the timeout (a cut
    /// cable sends no reset: without this the link would look up forever).
    private func checkPeerAlive() {
        guard let link, lastHeardNanos != 0 else { return }
        let now = monotonicNanos()
        let quiet = now - lastHeardNanos
        if quiet > UInt64(config.tuning.peerTimeoutMillis) * 1_000_000 {
            link.close(reason: "peer timed out: silent for \(quiet / 1_000_000) ms")
        } else if quiet > UInt64(config.tuning.pingIntervalMillis) * 1_000_000 && pingSentNanos < lastHeardNanos {
            pingID &+= 1
            pingSentNanos = now
            link.send(.ping(id: pingID))
        }
    }

    func peerConnectionUp(_ connection: PeerConnection) {
        peerHelloReceived = false
        lastHeardNanos = monotonicNanos()
        pingSentNanos = 0
        logger.info("replication: TLS link to \(peer.name) up (\(connection.tlsDescription))")
        var flags: UInt16 = 0
        if core.localFlags.contains(.newZeroed) { flags |= PeerFlags.Hello.newZeroed }
        if core.localFlags.contains(.crashedPrimary) { flags |= PeerFlags.Hello.crashedPrimary }
        if core.discardMyData { flags |= PeerFlags.Hello.discardMyData }
        connection.send(.hello(PeerHello(
            versionMin: 1, versionMax: 1, nodeID: UInt8(me.id), role: core.role, diskState: core.disk, flags: flags,
            resourceName: config.name, deviceSizeBytes: device.size, bitmapGranularityBytes: UInt32(superblock.layout.granularityBytes),
            uuids: ReplicaCore.wire(core.uuids), outOfSyncBits: UInt64(core.bitmap.setBitCount), primarySinceMillis: core.primarySinceMillis)))
        core.helloSent()
    }

    func peerConnection(_ connection: PeerConnection, received header: PeerHeader, payload: UnsafeRawBufferPointer) {
        // peer.md "Frame order": the hello comes first and once per link; anything before it
        // would act on a peer whose generation, size and role nobody compared yet.
        if header.type == .hello {
            guard !peerHelloReceived else { return connection.close(reason: "protocol error: a second hello on the same link") }
            peerHelloReceived = true
        } else if !peerHelloReceived {
            return connection.close(reason: "protocol error: \(header.type) before hello")
        }
        lastHeardNanos = monotonicNanos()
        beginActions()
        switch header.type {
        case .data:
            let block = header.block!
            let buffer: PoolBuffer
            if let sunk = takeSink(payload) {
                buffer = sunk  // decrypted in place: no copy
            } else {
                guard let taken = loop.pool.take(max(payload.count, 1)) else { return connection.close(reason: "out of buffers for replicated writes") }
                taken.pointer.copyMemory(from: payload.baseAddress!, byteCount: payload.count)
                buffer = taken
            }
            // The payload is handed over only once the core accepted the write: a refused one (a
            // duplicate id above all) must not replace the buffer of a write still in flight.
            let write = PeerWrite(id: header.sequence, offset: block.offset, length: block.length, epoch: block.epoch, flags: header.flags)
            if core.peerWrite(write, kind: .write, into: &actions) {
                let replaced = peerBuffers.updateValue(buffer, forKey: header.sequence)
                precondition(replaced == nil, "the core accepted write \(header.sequence) while its buffer is in use")
            } else {
                loop.pool.release(buffer)
            }
        case .resyncData where core.role == .primary:
            // A primary is never a resync target: this answers one of its reads, and must be the
            // range asked for (the client gets these bytes as its own).
            guard let read = peerReads[header.sequence], header.block!.offset == read.offset, header.block!.length == read.requested else {
                return connection.close(reason: "protocol error: unexpected resyncData \(header.sequence)")
            }
            peerReads[header.sequence] = nil
            let ok = header.block!.result == 0 && payload.count >= read.skip + read.length
            if ok, let p = read.connection.payload(slot: read.slot) {
                p.copyMemory(from: payload.baseAddress! + read.skip, byteCount: read.length)
            }
            read.connection.replicatedReadCompleted(slot: read.slot, result: ok ? 0 : -EIO)
        case .resyncData:
            let block = header.block!
            var buffer: PoolBuffer?
            if let sunk = takeSink(payload) {
                buffer = sunk
            } else if payload.count > 0 {
                guard let taken = loop.pool.take(payload.count) else { return connection.close(reason: "out of buffers for resync") }
                taken.pointer.copyMemory(from: payload.baseAddress!, byteCount: payload.count)
                buffer = taken
            }
            // Handed over only under the key the core accepted the data with (a refused or
            // duplicate id never touches the buffer of a resync write in flight).
            let data = PeerResyncData(id: header.sequence, offset: block.offset, length: block.length, result: block.result, flags: header.flags)
            if case .resync(let key)? = core.peerResyncData(data, into: &actions), let buffer {
                let replaced = resyncBuffers.updateValue(buffer, forKey: key)
                precondition(replaced == nil, "the core accepted resync data \(key) while its buffer is in use")
            } else if let buffer {
                loop.pool.release(buffer)
            }
        default:
            switch PeerMessage.decode(header: header, payload: payload) {
            case .invalid(let why):
                return connection.close(reason: "protocol error: \(why)")
            case .message(.hello(let hello)):
                guard hello.resourceName == config.name else { return connection.close(reason: "peer serves resource \(hello.resourceName), not \(config.name)") }
                core.linkUp(peer: hello, freshUUID: Self.freshUUID(), into: &actions)
                let refusedBefore = lastLinkFailure != nil
                if core.link == .connected || core.link == .handshaking { lastLinkFailure = nil }
                if let decision = core.lastDecision {
                    if core.splitBrain {
                        logger.error("replication: SPLIT BRAIN with \(peer.name): \(decision.decision) (\(decision.rule)); both sides changed the data since they last agreed. Not connecting. Resolve: 'tandem connect --discard-my-data' on the node whose changes are to be thrown away, 'tandem connect' on the other")
                    } else if core.link == .connecting {
                        if !refusedBefore {
                            logger.error("replication: refusing \(peer.name) (\(peer.name) is \(hello.role), this node \(core.role)): one must be secondary before they connect; retrying until one demotes")
                        }
                    } else {
                        logger.info("replication: connected to \(peer.name): \(decision.decision) (\(decision.rule))")
                    }
                }
            case .message(.resyncRequest(let requestID, let offset, let length)) where core.role == .secondary:
                serveRead(id: requestID, offset: offset, length: length)
            case .message(.verifyRequest(let requestID, let offset, let length, _)):
                startPeerVerify(id: requestID, offset: offset, length: length)
            case .message(.verifyDigest(let digest)):
                verifyDigestArrived(digest)
            case .message(let message):
                core.peerMessage(message, into: &actions)
            }
        }
        perform()
        if !core.acceptsPeerRequests && !connection.receivingPaused {
            // Back-pressure, not an error: a legitimate primary can hold this many requests here
            // (Limits.peerRequestsPendingMax). Its next frames wait until completions free room.
            logger.debug("replication: \(core.peerRequestsPending) peer requests pending; not reading the link until some finish")
            connection.pauseReceiving()
        }
    }

    /// Large replicated writes and resync data are decrypted straight into a pool buffer.
    func peerConnection(_ connection: PeerConnection, sinkFor header: PeerHeader) -> UnsafeMutableRawPointer? {
        guard sinkBuffer == nil, header.type == .data || (header.type == .resyncData && core.role == .secondary),
              let buffer = loop.pool.take(header.payloadLength) else { return nil }
        sinkBuffer = buffer
        return buffer.pointer
    }

    /// The sink buffer, if `payload` was decrypted into it.
    private func takeSink(_ payload: UnsafeRawBufferPointer) -> PoolBuffer? {
        guard let buffer = sinkBuffer, payload.count > 0, payload.baseAddress == UnsafeRawPointer(buffer.pointer) else { return nil }
        sinkBuffer = nil
        return buffer
    }

    func peerConnection(_ connection: PeerConnection, releasedPayload token: UInt64) {
        if token & Self.servedReadToken != 0, let served = servedReads.removeValue(forKey: Int(token & ~Self.servedReadToken)) {
            loop.pool.release(served.buffer)
            return
        }
        // Client payloads belong to their NBD slots; resync read buffers go back once sent.
        if token & (1 << 63) != 0, let buffer = resyncBuffers.removeValue(forKey: -Int(token & ~(1 << 63)) - 1) {
            loop.pool.release(buffer)
        }
    }

    func peerConnectionDown(_ connection: PeerConnection, reason: String) {
        if let buffer = sinkBuffer {
            // A payload that never finished arriving.
            sinkBuffer = nil
            loop.pool.release(buffer)
        }
        guard link === connection else { return }
        if reason.hasPrefix("TLS") { tlsFailures &+= 1 }
        link = nil
        lastHeardNanos = 0
        // The pass cannot finish without the peer: keep what it found so far.
        stopVerify(by: "the link loss", linkUp: false)
        verifyDigestsOwed.removeAll()
        if lastLinkFailure == reason && core.link != .connected && core.link != .handshaking {
            // The same failure again (a peer refusing us while StandAlone): once is enough.
            logger.debug("replication: link to \(peer.name) down: \(reason)")
        } else {
            logger.warning("replication: link to \(peer.name) down: \(reason)")
        }
        lastLinkFailure = core.link == .connected || core.link == .handshaking ? nil : reason
        beginActions()
        core.linkDown(.peerClosed, freshUUID: Self.freshUUID(), into: &actions)
        perform()
        persistMetadata()
        if me.id > peer.id { retryLater() }
    }

    // MARK: NBDReplicator

    func clientRequest(_ connection: NBDConnection, slot: Int, _ request: NBDRequest) {
        guard hasQuorum else {
            // Without quorum the other side may be promoted: nothing may be acknowledged here.
            return connection.replicatedCompleted(slot: slot, result: -EIO)
        }
        if request.command != .flush {
            guard waitingForLog.isEmpty, !heldByVerify(request), admitToLog(request) else {
                waitingForLog.append((connection, slot, request))
                if !heldByVerify(request) { flushPeerForRoom() }
                return
            }
        }
        startClientRequest(connection, slot: slot, request)
    }

    /// A client write over the range an online verify is comparing (its chunks in flight and the
    /// next one) waits until the chunk's two digests are in: the data must not change between
    /// the two sides' reads, or the verify reports blocks that do not differ (peer.md 10).
    private func heldByVerify(_ request: NBDRequest) -> Bool {
        guard let v = verify, request.length > 0 else { return false }
        let start = v.chunks.lazy.compactMap { $0?.offset }.min() ?? v.next
        let end = min(v.next + UInt64(Self.verifyChunkBytes), device.size)
        return request.offset < end && start < request.offset + UInt64(request.length)
    }

    /// Makes the extents of a write hot on disk first; false when the log has no room now.
    private func admitToLog(_ request: NBDRequest) -> Bool {
        while true {
            switch activityLog.beginWrite(offset: request.offset, length: UInt64(request.length)) {
            case .proceed:
                return true
            case .wait:
                return false
            case .waitForTransaction:
                // Transactions are written synchronously below, so none is ever in flight here.
                preconditionFailure("activity log transaction left in flight")
            case .needTransaction(let first):
                var transaction: ActivityLog.Transaction? = first
                while let tx = transaction {
                    persistTransaction(tx)
                    transaction = activityLog.transactionPersisted(tx)
                }
                return true
            }
        }
    }

    /// Writes one AL transaction: bitmap pages of the extents it evicts first, then the
    /// transaction, each synced (Protocol/metadata.md, write ordering).
    private func persistTransaction(_ tx: ActivityLog.Transaction) {
        if tx.evictedCount > 0 {
            // Once evicted, a crash no longer resyncs the extent: its completed writes must not
            // sit in a volatile cache any more (DRBD gets this from the preflush of its AL write).
            // A failed sync means they may not be on the disk: it is detached (the peer has
            // them), and the error is not left for a later flush that will not see it.
            let logMarked = logMarkedAtDetach
            if core.disk != .failed && fdatasync(device.fd) != 0 {
                localSyncFailed(-errno, during: "an activity-log eviction")
            }
            // A detached disk is not synced: its writes are marked instead, the log's extents
            // when the detach's state change is carried. These extents left the log already, and
            // that change may still be ahead in this batch (or it came just now, for the failed
            // sync): marked here, before the transaction forgets them.
            if core.disk == .failed && !logMarked { core.markExtentsEvictedFromDetachedDisk(activityLog, by: tx) }
            persistMetadata()
        }
        activityLog.encode(tx, into: UnsafeMutableRawBufferPointer(start: transactionBuffer, count: ActivityLog.transactionBytes))
        let fd = open(metadataPath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { fatalError("cannot open metadata \(metadataPath) for the activity log: \(SystemError.text(errno))") }
        defer { close(fd) }
        let offset = superblock.layout.activityLogSlotOffset(tx.slot)
        guard pwrite(fd, transactionBuffer, ActivityLog.transactionBytes, off_t(offset)) == ActivityLog.transactionBytes, fdatasync(fd) == 0 else {
            // Without the log, writes cannot be protected: stop rather than risk a silent loss.
            fatalError("cannot write the activity log to \(metadataPath): \(SystemError.text(errno))")
        }
    }

    private func startClientRequest(_ connection: NBDConnection, slot: Int, _ request: NBDRequest) {
        let clientID = nextClientID
        nextClientID += 1
        clients[clientID] = (connection, slot, monotonicNanos())
        let kind = switch request.command! {
        case .write: 0
        case .trim: 1
        case .writeZeroes: 2
        default: 3
        }
        requestCounts[kind] &+= 1
        requestBytes[kind] &+= kind == 3 ? 0 : UInt64(request.length)
        beginActions()
        let fua = request.has(NBD.CommandFlag.fua)
        if request.command != .flush {
            // Counted here too: a detached disk gets no local write, yet the data changes.
            changes.written(offset: request.offset, length: UInt64(request.length))
        }
        switch request.command! {
        case .write:
            core.clientWrite(id: clientID, offset: request.offset, length: request.length, kind: .write, fua: fua, into: &actions)
        case .trim:
            core.clientWrite(id: clientID, offset: request.offset, length: request.length, kind: .trim, fua: fua, into: &actions)
        case .writeZeroes:
            core.clientWrite(id: clientID, offset: request.offset, length: request.length, kind: .zeroes(noHole: request.has(NBD.CommandFlag.noHole)), fua: fua, into: &actions)
        case .flush:
            core.clientFlush(id: clientID, into: &actions)
        case .read, .cache, .blockStatus, .disconnect:
            preconditionFailure("\(request.command!) is not replicated")
        }
        perform()
    }

    // MARK: Carrying out actions

    /// Starts collecting actions for a core call, unless `perform` is already running (a core
    /// call made while actions are carried out appends to the batch in progress).
    private func beginActions() {
        if !performing { actions.removeAll(keepingCapacity: true) }
    }

    private var performing = false
    /// The role conflict last logged (`.dropLink(.roleConflict)` repeats on every retry).
    private var loggedRoleConflict: RoleConflict?

    /// What an operator does about a role conflict (status and log).
    static func remedy(_ conflict: RoleConflict) -> String {
        switch conflict {
        case .twoPrimaries:
            "demote one node (tandem secondary)"
        case .peerHoldsNewerData:
            "demote this node (tandem secondary) to resync the newer data from the peer, or discard the peer's newer writes (tandem connect --discard-my-data on the peer)"
        case .peerHoldsOtherData:
            "demote this node (tandem secondary) and attach its disk again (restart it) to resync from the peer"
        }
    }
    /// A barrier ack waits in the link's queue for the next write ack (see `perform`).
    private var lazyAckQueued = false

    /// Carries out the collected actions in order. Re-entrant calls (an action whose effect calls
    /// back into the core) only append; the outer call carries everything out.
    private func perform() {
        guard !performing else { return }
        performing = true
        defer { performing = false }
        var i = 0
        while i < actions.count {
            let action = actions[i]
            i += 1
            switch action {
            case .submitLocal(let io):
                submit(io)
            case .send(let message):
                if case .barrierAck = message {
                    // Nobody waits for it (the primary's durability comes from flushes): while a
                    // peer write is on its way to the disk, its write ack carries this along.
                    // Whether one is, is known once the whole batch of frames is read.
                    link?.send(message, lazy: true)
                    if !lazyAckQueued {
                        lazyAckQueued = true
                        loop.callAtBatchEnd(id)
                    }
                } else {
                    link?.send(message)
                }
            case .sendWrite(let write, let kind, let buffer):
                let type: PeerMessageType
                switch kind {
                case .write: type = .data
                case .trim: type = .trim
                case .zeroes: type = .zeroes
                }
                link?.sendBlock(type: type, flags: write.flags, sequence: write.id, block: PeerBlock(offset: write.offset, epoch: write.epoch, length: write.length),
                                payload: buffer.map { UnsafeRawPointer(pointer(for: $0)) }, token: write.id)
            case .sendResync(let data, let buffer):
                guard case .resync(let slot) = buffer, let read = resyncBuffers[-slot - 1] else { preconditionFailure("resync data from \(buffer)") }
                guard let link else {
                    resyncBuffers[-slot - 1] = nil
                    loop.pool.release(read)
                    break
                }
                link.sendBlock(type: .resyncData, flags: data.flags, sequence: data.id, block: PeerBlock(offset: data.offset, length: data.length),
                               payload: UnsafeRawPointer(read.pointer), token: (1 << 63) | UInt64(slot))
            case .recordBarrier(let info):
                guard let copyOnWrite, !copyOnWrite.isIdle else {
                    recordBarrier(info)
                    core.barrierRecorded(into: &actions)
                    break
                }
                // Records still being saved belong to the barrier before: the new one starts
                // once they are durable and their writes on the device.
                copyOnWrite.whenIdle { [unowned self] in
                    recordBarrier(info)
                    beginActions()
                    core.barrierRecorded(into: &actions)
                    perform()
                }
            case .completeClientFlush(let flushID, let result) where internalFlushes[flushID] != nil:
                internalFlushes.removeValue(forKey: flushID)!(result)
            case .completeClient(let clientID, let result) where mustHold,
                 .completeClientFlush(let clientID, let result) where mustHold:
                if hasQuorum {
                    heldCompletions.append((clientID, result, false))
                } else {
                    heldCompletions.append((clientID, -EIO, false))
                    releaseHeld(error: -EIO)
                }
            case .completeClient(let clientID, let result), .completeClientFlush(let clientID, let result):
                guard let client = clients.removeValue(forKey: clientID) else { preconditionFailure("completion for unknown client request \(clientID)") }
                if case .completeClient = action {
                    writeLatency.record(nanos: monotonicNanos() - client.started)
                } else {
                    flushLatency.record(nanos: monotonicNanos() - client.started)
                }
                client.connection.replicatedCompleted(slot: client.slot, result: result)
            case .writeSettled(let offset, let length):
                if activityLog.endWrite(offset: offset, length: UInt64(length)) { admitWaitingWrites() }
            case .rollbackNoticeAnswered(let accepted):
                // Acted on after this batch: starting the rollback drives the core again.
                if rollbackAsking?.viaPeer == true {
                    rollbackAsking!.peerAnswer = accepted
                    loop.addTimer(id: id, tag: Self.tagRollbackAnswer, afterNanos: 0)
                }
            case .dropLink(let reason):
                if reason == .roleConflict, let conflict = core.roleConflict {
                    // Retried until an operator acts: said once, with what to do.
                    if conflict != loggedRoleConflict {
                        logger.error("replication: role conflict: \(conflict.rawValue); \(Self.remedy(conflict))")
                    }
                    loggedRoleConflict = conflict
                } else {
                    logger.warning("replication: dropping the link: \(reason)")
                }
                switch reason {
                case .administrative:
                    // The peer must read the disconnect message before the link closes.
                    link?.closeAfterSending(reason: "disconnected by the operator")
                case .splitBrain, .unrelatedData, .roleConflict, .sizeMismatch:
                    // Our hello and the verdict reach the peer before the link closes, so it
                    // reaches the same verdict and stays down too.
                    link?.send(.disconnect(reason: reason.wire!, text: "\(reason)"))
                    link?.closeAfterSending(reason: "\(reason)")
                case .peerClosed, .timeout, .protocolError:
                    link?.close(reason: "\(reason)")
                }
            case .stateChanged(let status):
                logger.info("replication: role \(status.role), disk \(status.disk), peer disk \(status.peerDisk.map { "\($0)" } ?? "unknown"), link \(status.link), \(status.sync), \(status.outOfSyncBytes) bytes out of sync")
                if status.disk == .failed && status.role == .primary && !logMarkedAtDetach {
                    logMarkedAtDetach = true
                    core.markLogExtentsOfDetachedDisk(activityLog)
                }
                // Every state change is rare and worth keeping across a crash (a resync target's
                // Inconsistent mark above all).
                persistMetadata()
                report(status)
                if status.roleConflict == nil { loggedRoleConflict = nil }
                if core.spareUUID == nil { core.spareUUID = Self.freshUUID() }
                if core.replicating || core.role != .primary { fenced = false }
                if rollbackRecord && rollbackRun == nil && rollbackAsking == nil
                    && (core.role == .primary || (core.link == .connected && core.sync == .established && core.peerDisk == .upToDate && core.bitmap.setBitCount == 0)) {
                    // The peer resynced from the rolled-back node (or it was promoted): the
                    // witness's record ends with the announcement below.
                    rollbackRecord = false
                }
                if !heldCompletions.isEmpty && core.role == .primary && peerHoldsHeldWrites {
                    // The witness never recorded the peer as outdated, but the peer is back: the
                    // resync that copies the held writes has started (the peer is Inconsistent
                    // until it ends, so it cannot be promoted without them), or they are copied.
                    releaseHeld(error: nil)
                }
                if witness != nil { announceToWitness() }
            }
        }
        actions.removeAll(keepingCapacity: true)
        if verify?.waitingForWrites == true { pumpVerify() }
    }

    /// Runs the handlers and sends the events for what changed since the last state reported.
    private func report(_ status: ReplicaStatus) {
        let before = reported
        reported = status
        let now = monotonicNanos()
        emit("state", stateFields(status))
        if let before, before.role != status.role {
            handlers.fire(.roleChange, ["\(status.role)"], nowNanos: now)
            emit("role", "\"role\":\"\(Self.title("\(status.role)"))\"")
        }
        if status.splitBrain && before?.splitBrain != true {
            handlers.fire(.splitBrain, [peer.name], nowNanos: now)
            emit("split-brain", "\"peer\":\"\(peer.name)\"")
        }
        if let before, before.link == .connected || before.link == .handshaking, status.link != .connected && status.link != .handshaking {
            handlers.fire(.peerLost, [peer.name], nowNanos: now)
            emit("peer-lost", "\"peer\":\"\(peer.name)\"")
        }
        if let before, before.sync == .established, status.sync != .established {
            emit("resync-start", "\"as\":\"\(status.sync == .syncSource ? "source" : "target")\",\"out_of_sync_bytes\":\(status.outOfSyncBytes)")
        }
        if let before, before.sync != .established, status.sync == .established, status.link == .connected {
            handlers.fire(.resyncDone, [before.sync == .syncSource ? "source" : "target"], nowNanos: now)
            emit("resync-done", "\"as\":\"\(before.sync == .syncSource ? "source" : "target")\",\"bytes\":\(core.resyncedBytes)")
        }
    }

    private func stateFields(_ s: ReplicaStatus) -> String {
        "\"role\":\"\(Self.title("\(s.role)"))\",\"disk\":\"\(Self.title("\(s.disk)"))\",\"connection\":\"\(Self.title(s.link.rawValue))\","
            + "\"peer_role\":\(s.peerRole.map { "\"\(Self.title("\($0)"))\"" } ?? "null"),\"peer_disk\":\(s.peerDisk.map { "\"\(Self.title("\($0)"))\"" } ?? "null"),"
            + "\"replication\":\"\(s.link == .connected ? Self.title(s.sync.rawValue) : "Off")\",\"out_of_sync_bytes\":\(s.outOfSyncBytes),\"split_brain\":\(s.splitBrain)"
    }

    /// One `tandem events` line: `{"time":MS,"resource":..,"node":..,"type":TYPE,FIELDS}`.
    func emit(_ type: String, _ fields: String) {
        guard let onEvent else { return }
        onEvent("{\"time\":\(Self.wallClockMillis()),\"resource\":\"\(config.name)\",\"node\":\"\(me.name)\",\"type\":\"\(type)\"\(fields.isEmpty ? "" : ",")\(fields)}")
    }

    /// The first line a new `tandem events` subscriber reads: the state now.
    func eventSnapshot() -> String {
        "{\"time\":\(Self.wallClockMillis()),\"resource\":\"\(config.name)\",\"node\":\"\(me.name)\",\"type\":\"exists\",\(stateFields(core.status))}"
    }

    /// A primary with a witness holds client answers while it writes without its peer and the
    /// witness has not yet recorded the peer as outdated.
    private var mustHold: Bool {
        witness != nil && core.role == .primary && !core.replicating && !fenced
    }

    /// The io_uring registered-buffer index of a buffer, or -1 (the kernel pins its pages).
    private func fixedIndex(for buffer: BufferRef) -> Int32 {
        switch buffer {
        case .client(let clientID):
            guard let client = clients[clientID] else { return -1 }
            return client.connection.payloadBuffer(slot: client.slot)?.fixedIndex ?? -1
        case .peer(let writeID):
            return peerBuffers[writeID]?.fixedIndex ?? -1
        case .resync(let key):
            return resyncBuffers[key]?.fixedIndex ?? -1
        }
    }

    /// The peer is connected and gets (or has) what was written without it.
    private var peerHoldsHeldWrites: Bool {
        core.link == .connected && core.peerDisk != .failed
            && (core.sync == .syncSource || (core.sync == .established && core.bitmap.setBitCount == 0))
    }

    private func pointer(for buffer: BufferRef) -> UnsafeMutableRawPointer {
        switch buffer {
        case .client(let clientID):
            guard let client = clients[clientID], let p = client.connection.payload(slot: client.slot) else { preconditionFailure("no payload for client request \(clientID)") }
            return p
        case .peer(let writeID):
            return peerBuffers[writeID]!.pointer
        case .resync(let key):
            return resyncBuffers[key]!.pointer
        }
    }

    private func submit(_ io: LocalIO) {
        // Every write to this device counts for changed-block tracking, whatever its source
        // (client, replicated, resync): the device's content is what a backup reads.
        if case .write = io.operation {
            changes.written(offset: io.offset, length: UInt64(io.length))
            // Copy-on-write: the chunks the barriers need are saved and durable before the write
            // reaches the device (Protocol/barriers.md); `submitNow` once they are.
            if let copyOnWrite { return copyOnWrite.write(io) }
        }
        submitNow(io)
    }

    func ioBatchEnded() {
        if let link, link.receivingPaused, core.acceptsPeerRequests { link.resumeReceiving() }
        if lazyAckQueued {
            lazyAckQueued = false
            if core.peerWritesApplying == 0 { link?.flushLazy() }
        }
    }

    private func submitNow(_ io: LocalIO) {
        let index = freeOps.popLast()!
        var syncAfter = false
        let userData = IOLoop.userData(id, UInt32(index))
        switch io.operation {
        case .read:
            // A resync read: its buffer comes from the pool now (keyed by the negative slot so it
            // cannot clash with a target's incoming resync ids).
            guard case .resync(let slot) = io.buffer!, let buffer = loop.pool.take(Int(io.length)) else { preconditionFailure("resync read without a buffer") }
            resyncBuffers[-slot - 1] = buffer
            loop.engine.read(fd: device.fd, buffer: buffer.pointer, length: Int(io.length), offset: io.offset, fixedIndex: buffer.fixedIndex, userData: userData)
        case .flush:
            loop.engine.fsync(fd: device.fd, datasync: true, userData: userData)
        case .write(let kind, let fua):
            switch kind {
            case .write:
                let p: UnsafeMutableRawPointer
                if case .resync(let key)? = io.buffer { p = resyncBuffers[key]!.pointer } else { p = pointer(for: io.buffer!) }
                if device.cache == .page && !fua && NBDConnection.writesInline(offset: io.offset, length: io.length) {
                    // As a single node does (`NBDConnection.writesInline`): a client's or the
                    // peer's small write is copied into the page cache here and completes now.
                    ops[index] = (io.tag, false)
                    let n = loop.engine.writeNow(fd: device.fd, buffer: p, length: Int(io.length), offset: io.offset)
                    return localCompleted(index, n == Int32(io.length) || n < 0 ? n : -EIO)
                }
                loop.engine.write(fd: device.fd, buffer: p, length: Int(io.length), offset: io.offset, fixedIndex: fixedIndex(for: io.buffer!), fua: fua,
                                  offload: device.cache == .page && io.length >= 65536, userData: userData)
            case .trim, .zeroes:
                var mode = ctandem_FALLOC_FL_PUNCH_HOLE | ctandem_FALLOC_FL_KEEP_SIZE
                if case .zeroes(noHole: true) = kind { mode = ctandem_FALLOC_FL_ZERO_RANGE | ctandem_FALLOC_FL_KEEP_SIZE }
                syncAfter = fua
                loop.engine.fallocate(fd: device.fd, mode: mode, offset: io.offset, length: UInt64(io.length), userData: userData)
            }
        }
        ops[index] = (io.tag, syncAfter)
    }

    private func localCompleted(_ index: Int, _ result: Int32) {
        guard let op = ops[index] else { preconditionFailure("completion of free local op \(index)") }
        if op.syncAfter && result >= 0 {
            ops[index] = (op.tag, false)
            return loop.engine.fsync(fd: device.fd, datasync: true, userData: IOLoop.userData(id, UInt32(index)))
        }
        ops[index] = nil
        freeOps.append(index)
        // A link paused for back-pressure reads again once this batch's completions freed room.
        if link?.receivingPaused == true { loop.callAtBatchEnd(id) }
        // Buffers the operation used go back to the pool (client payloads belong to their slots).
        switch op.tag {
        case .peerWrite(let writeID):
            if let buffer = peerBuffers.removeValue(forKey: writeID) { loop.pool.release(buffer) }
        case .resyncWrite(let key):
            if let buffer = resyncBuffers.removeValue(forKey: key) { loop.pool.release(buffer) }
        case .resyncRead(let slot):
            if result < 0, let buffer = resyncBuffers.removeValue(forKey: -slot - 1) { loop.pool.release(buffer) }
        case .client, .clientFlush, .peerFlush, .resyncFlush, .resyncTargetFlush:
            break
        }
        beginActions()
        core.localCompleted(op.tag, result: result >= 0 ? 0 : result, into: &actions)
        if case .resyncFlush = op.tag, result < 0 {
            // The core handled it as a failed sync no request waited for (`localSyncFailed`).
            logger.error("local disk: the resync source's flush failed to sync \(device.path): \(SystemError.text(-result)); a completed write may not be on the disk: \(syncFailureOutcome)")
        }
        if case .resyncRead(let slot) = op.tag, result >= 0,
           !actions.contains(where: { if case .sendResync(_, .resync(slot)) = $0 { true } else { false } }),
           let buffer = resyncBuffers.removeValue(forKey: -slot - 1) {
            // The core dropped a stale read: its buffer is not needed.
            loop.pool.release(buffer)
        }
        perform()
    }

    // MARK: Metadata

    /// Writes the generation UUIDs, flags and dirty bitmap pages, then syncs (rare events only:
    /// link loss, the end of a resync, shutdown; synchronous on purpose).
    private func persistMetadata() {
        superblock.uuids = core.uuids
        let keep: Superblock.Flags = superblock.flags.intersection([.wasPrimary])
        superblock.flags = core.localFlags.union(keep)
        superblock.flags.remove(.newZeroed)
        if core.disk == .upToDate { superblock.flags.insert(.consistent) }
        superblock.advanceSequence()
        let fd = open(metadataPath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return logger.error("cannot open metadata \(metadataPath): \(SystemError.text(errno))") }
        defer { close(fd) }
        var block = [UInt8](repeating: 0, count: Superblock.encodedBytes)
        block.withUnsafeMutableBytes { superblock.encode(into: $0) }
        var failed = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(superblock.offset)) } != block.count
        let bitmap = core.bitmap
        var page = 0
        while let next = bitmap.nextDirtyPage(from: page) {
            let offset = superblock.layout.bitmapPageOffset(next)
            failed = failed || bitmap.withPageBytes(next) { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) } != MetadataLayout.blockBytes
            page = next + 1
            if page >= bitmap.pageCount { break }
        }
        if fdatasync(fd) != 0 || failed {
            logger.error("cannot write metadata \(metadataPath): \(SystemError.text(errno))")
        } else {
            core.bitmapPersisted()
        }
    }

    // MARK: Online verify

    /// Starts comparing every block with the peer (`tandem verify`). The primary reads its own
    /// copy, the secondary its own, each computes a CRC-32C per 4 KiB; blocks that differ are
    /// marked out of sync and resynced when the pass ends.
    func startVerify() -> String {
        guard core.role == .primary else { return "{\"error\":\"verify runs on the primary\"}" }
        guard core.status.link == .connected, core.status.sync == .established, let link else {
            return "{\"error\":\"verify needs the peer connected and in sync\"}"
        }
        guard core.disk == .upToDate, core.peerDisk == .upToDate else {
            return "{\"error\":\"verify needs both disks UpToDate (a detached disk is resynced when it is attached again)\"}"
        }
        guard verify == nil else { return "{\"error\":\"a verify is already running\"}" }
        verify = Verify()
        logger.info("verify: started (\(device.size) bytes)")
        _ = link
        pumpVerify()
        return "{\"ok\":true,\"started\":true}"
    }

    private func pumpVerify() {
        guard var v = verify, let link else { return }
        for slot in 0..<Self.verifyWindow where v.chunks[slot] == nil && verifyOrphans[slot] == nil && !verifyDigestsOwed.contains(slot) && v.next < device.size {
            let length = UInt32(min(UInt64(Self.verifyChunkBytes), device.size - v.next))
            // Writes already in flight there finish first (new ones are held meanwhile).
            v.waitingForWrites = core.clientWriteInFlight(offset: v.next, length: length)
            if v.waitingForWrites { break }
            guard let buffer = loop.pool.take(Int(length)) else { break }
            v.chunks[slot] = VerifyChunk(offset: v.next, length: length, buffer: buffer)
            link.send(.verifyRequest(id: UInt64(slot) + 1, offset: v.next, length: length, algorithm: .crc32c))
            loop.engine.read(fd: device.fd, buffer: buffer.pointer, length: Int(length), offset: v.next, fixedIndex: buffer.fixedIndex,
                             userData: IOLoop.userData(id, Self.tagVerifyLocal + UInt32(slot)))
            v.next += UInt64(length)
        }
        verify = v
    }

    private static func digests(_ p: UnsafeRawPointer, _ length: Int) -> [UInt32] {
        stride(from: 0, to: length, by: PeerProtocol.digestBlockBytes).map {
            CRC32C.checksum(UnsafeRawBufferPointer(start: p + $0, count: min(PeerProtocol.digestBlockBytes, length - $0)))
        }
    }

    private func verifyLocalRead(_ slot: Int, _ result: Int32) {
        if let orphan = verifyOrphans.removeValue(forKey: slot) { return loop.pool.release(orphan) }
        guard var v = verify, var chunk = v.chunks[slot] else { return }
        let buffer = chunk.buffer!
        chunk.local = result == Int32(chunk.length) ? Self.digests(buffer.pointer, Int(chunk.length)) : []
        loop.pool.release(buffer)
        chunk.buffer = nil
        v.chunks[slot] = chunk
        verify = v
        finishVerifyChunk(slot)
    }

    private func verifyDigestArrived(_ digest: PeerVerifyDigest) {
        // The id is the peer's echo of ours (slot + 1): anything else, however large, is an error.
        if digest.id >= 1, digest.id <= UInt64(Self.verifyWindow), verifyDigestsOwed.remove(Int(digest.id) - 1) != nil { return }
        guard var v = verify, digest.id >= 1, digest.id <= UInt64(Self.verifyWindow), var chunk = v.chunks[Int(digest.id) - 1],
              chunk.offset == digest.offset, chunk.length == digest.length else {
            return link?.close(reason: "protocol error: unexpected verifyDigest \(digest.id)") ?? ()
        }
        let slot = Int(digest.id) - 1
        chunk.peer = digest.result == 0 ? stride(from: 0, to: digest.digests.count, by: 4).map { i in
            digest.digests[i..<i + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        } : []
        v.chunks[slot] = chunk
        verify = v
        finishVerifyChunk(slot)
    }

    private func finishVerifyChunk(_ slot: Int) {
        guard var v = verify, let chunk = v.chunks[slot], let local = chunk.local, let peerDigests = chunk.peer else { return }
        v.chunks[slot] = nil
        let blocks = (Int(chunk.length) + PeerProtocol.digestBlockBytes - 1) / PeerProtocol.digestBlockBytes
        if local.count != blocks || peerDigests.count != blocks {
            // A read failed on one side: reported, not taken for a difference (peer.md 10).
            v.unreadableBytes += UInt64(chunk.length)
            logger.warning("verify: \(local.count != blocks ? "the local" : "the peer's") read of \(chunk.length) bytes at \(chunk.offset) failed; not compared")
        } else {
            for block in 0..<blocks where local[block] != peerDigests[block] {
                let offset = chunk.offset + UInt64(block * PeerProtocol.digestBlockBytes)
                let length = min(UInt64(PeerProtocol.digestBlockBytes), chunk.offset + UInt64(chunk.length) - offset)
                core.markOutOfSync(offset: offset, length: length)
                v.mismatchedBytes += length
            }
            v.checkedBytes += UInt64(chunk.length)
        }
        verify = v
        if v.next >= device.size && v.chunks.allSatisfy({ $0 == nil }) {
            verify = nil
            lastVerify = (v.checkedBytes, v.mismatchedBytes, v.unreadableBytes)
            logger.info("verify: finished: \(v.checkedBytes) bytes checked, \(v.mismatchedBytes) bytes differ\(v.mismatchedBytes > 0 ? ", resyncing them" : "")\(v.unreadableBytes > 0 ? ", \(v.unreadableBytes) bytes unreadable" : "")")
            persistMetadata()
            beginActions()
            core.resyncMarked(into: &actions)
            perform()
        } else {
            pumpVerify()
        }
        // Writes held by this chunk (and not by the next one) go on.
        admitWaitingWrites()
    }

    /// Secondary: read what the primary asks to verify and answer with digests.
    private func startPeerVerify(id requestID: UInt64, offset: UInt64, length: UInt32) {
        guard length > 0, offset + UInt64(length) <= device.size, let buffer = loop.pool.take(Int(length)),
              let slot = (0..<64).first(where: { peerVerify[$0] == nil })
        else { return link?.close(reason: "cannot serve the verify request") ?? () }
        peerVerify[slot] = (requestID, offset, length, buffer)
        loop.engine.read(fd: device.fd, buffer: buffer.pointer, length: Int(length), offset: offset, fixedIndex: buffer.fixedIndex,
                         userData: IOLoop.userData(id, Self.tagVerifyPeer + UInt32(slot)))
    }

    private func peerVerifyRead(_ slot: Int, _ result: Int32) {
        guard let request = peerVerify.removeValue(forKey: slot) else { return }
        var digests: [UInt8] = []
        if result == Int32(request.length) {
            for crc in Self.digests(request.buffer.pointer, Int(request.length)) { digests.appendBE(crc) }
        }
        loop.pool.release(request.buffer)
        link?.send(.verifyDigest(PeerVerifyDigest(
            id: request.id, offset: request.offset, length: request.length, result: result == Int32(request.length) ? 0 : UInt32(EIO),
            algorithm: .crc32c, digests: digests)))
    }

    // MARK: Status

    /// DRBD-style names: `UpToDate`, `Primary`, `SyncSource`.
    private static func title(_ value: String) -> String {
        value.prefix(1).uppercased() + value.dropFirst()
    }

    /// Answers a control request (`reply` may be called later: a demotion waits for its clients).
    func control(_ request: String, reply: @escaping (String) -> Void) {
        let words = request.split(separator: " ").map(String.init)
        let options = Set(words.dropFirst())
        switch words.first {
        case "ping":
            reply("{\"ok\":true}")
        case "status" where words.dropFirst().first == "text":
            reply(statusText())
        case "status":
            reply(statusJSON())
        case "verify":
            reply(startVerify())
        case "primary":
            promote(force: options.contains("force"), reply: reply)
        case "secondary":
            demote(reply: reply)
        case "connect":
            reply(connect(discardMyData: options.contains("discard-my-data")))
        case "disconnect":
            reply(disconnect())
        case "barrier" where words.count >= 2 && words[1] == "create":
            reply(createBarrier(label: words.dropFirst(2).joined(separator: " ")))
        case "barrier" where words.count == 2 && words[1] == "list":
            reply(listBarriers())
        case "barrier" where words.count == 4 && words[1] == "export":
            guard let id = UInt64(words[2]) else { return reply(Self.error("barrier id \(words[2])")) }
            reply(exportBarrier(id, listen: words[3]))
        case "barrier" where words.count == 3 && words[1] == "unexport":
            guard let id = UInt64(words[2]) else { return reply(Self.error("barrier id \(words[2])")) }
            reply(unexportBarrier(id))
        case "diff" where words.count >= 4:
            // `diff FROM TO PATH`: the path is the rest of the line (it may hold spaces).
            let parts = request.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false)
            guard parts.count == 4, let from = UInt64(parts[1]), let to = UInt64(parts[2]), to > 0 else {
                return reply(Self.error("diff FROM TO PATH: FROM a barrier id or 0, TO a barrier id"))
            }
            reply(startDiff(from: from == 0 ? nil : from, to: to, output: String(parts[3])))
        case "rollback" where words.count == 2 || (words.count == 3 && words[2] == "force"):
            guard let id = UInt64(words[1]) else { return reply(Self.error("barrier id \(words[1])")) }
            rollback(to: id, force: words.count == 3, reply: reply)
        default:
            reply(Self.error("unknown request '\(request.prefix(64))'; known: status, status text, verify, primary [force], secondary, connect [discard-my-data], disconnect, ping"))
        }
    }

    static func error(_ message: String) -> String {
        "{\"error\":\(jsonString(message))}"
    }

    // MARK: Roles

    /// The NBD export this node serves; its mode follows the role.
    func attach(server: NBDServer) {
        nbdServer = server
        server.changedRuns = { [unowned self] key, offset, length, runsMax, runs in
            changes.changedRuns(since: key, offset: offset, length: length, runsMax: runsMax, into: &runs)
        }
        exportFollowsRole()
        publishDirtyBitmaps()
    }

    /// The `qemu:dirty-bitmap:` contexts new NBD clients may select: every tracked barrier by its
    /// id, and by its label (naming the newest barrier with it) unless the label is a number.
    private func publishDirtyBitmaps() {
        var bitmaps: [NBDDirtyBitmap] = []
        var byLabel: [(label: String, id: UInt64)] = []
        for info in createdBarriers where changes.tracks(info.id) {
            bitmaps.append(NBDDirtyBitmap(name: "\(info.id)", key: info.id))
            guard !info.label.isEmpty, UInt64(info.label) == nil else { continue }
            byLabel.removeAll { $0.label == info.label }
            byLabel.append((info.label, info.id))
        }
        bitmaps += byLabel.map { NBDDirtyBitmap(name: $0.label, key: $0.id) }
        nbdServer?.setDirtyBitmaps(bitmaps)
    }

    private func exportFollowsRole() {
        guard let server = nbdServer else { return }
        server.setReadOnly(core.role != .primary)
        server.replicator = core.role == .primary ? self : nil
    }

    /// `tandem primary [--force]`. With a witness and no peer, the witness must agree first
    /// (`--force` skips it: the operator answers for what the other node does).
    private func promote(force: Bool, reply: @escaping (String) -> Void) {
        // Not while a rollback asks for its record: the witness would grant it and then find
        // the node secondary.
        guard rollbackRun == nil, rollbackAsking == nil else { return reply(Self.error("a rollback is running")) }
        // A disk that is not UpToDate is refused here, with the reason, before the witness is asked
        // (it would refuse too, with the reason in its log only).
        guard let witness, !force, core.role == .secondary, core.link != .connected, core.link != .handshaking, core.disk == .upToDate else {
            return reply(promoteLocally(force: force))
        }
        guard witness.up else {
            return reply(Self.error("cannot promote: no quorum (neither \(peer.name) nor the witness is reachable); --force promotes anyway and risks two primaries"))
        }
        var state = witnessState()
        state.role = .primary
        witness.request(state) { [weak self] answer in
            guard let self else { return }
            switch answer {
            case .recorded:
                reply(self.promoteLocally(force: false))
            case .refused(peerRollsBack: true):
                self.peerRollsBackSaysTheWitness()
                reply(Self.error("cannot promote: \(self.peer.name) is rolling back to a barrier (the witness recorded it) and its image will be the newest; \(self.me.name) is Outdated until it resyncs from \(self.peer.name) (--force promotes anyway and makes a split brain with the rollback)"))
            case .refused:
                reply(Self.error("cannot promote: the witness refused (see its log: the peer may be primary and alive, or this node outdated)"))
            case .unreachable:
                reply(Self.error("cannot promote: the witness link went down before it answered"))
            }
        }
    }

    private func promoteLocally(force: Bool) -> String {
        guard !demoting else { return Self.error("a demotion is in progress") }
        guard rollbackRun == nil, rollbackAsking == nil else { return Self.error("a rollback is running") }
        if core.role == .primary { return "{\"ok\":true,\"role\":\"Primary\",\"changed\":false}" }
        let started = monotonicNanos()
        // The flag goes to disk with the state change, before any client can write.
        superblock.flags.insert(.wasPrimary)
        beginActions()
        let refusal = core.promote(force: force, freshUUID: Self.freshUUID(), nowMillis: Self.wallClockMillis(), into: &actions)
        if let refusal {
            superblock.flags.remove(.wasPrimary)
            logger.warning("promotion refused: \(refusal)")
            if case .diskNotUpToDate(.outdated) = refusal, core.peerLeftForRollback {
                return Self.error("cannot promote: \(peer.name) is rolling back to a barrier and its image will be the newest; \(me.name) is Outdated until it resyncs from \(peer.name) (--force promotes anyway and makes a split brain with the rollback)")
            }
            return Self.error("cannot promote: \(refusal)")
        }
        if force { logger.warning("promoted with --force: this node's data is declared UpToDate; if the peer holds newer writes they will be lost or split") }
        perform()
        exportFollowsRole()
        let micros = (monotonicNanos() - started) / 1000
        logger.notice("promoted to primary in \(micros) µs")
        return "{\"ok\":true,\"role\":\"Primary\",\"changed\":true,\"micros\":\(micros)}"
    }

    /// `tandem secondary`: new NBD requests get ESHUTDOWN, requests in flight finish, clients are
    /// closed, both sides flush, then the role changes and the export becomes read-only.
    private func demote(reply: @escaping (String) -> Void) {
        guard core.role == .primary else { return reply("{\"ok\":true,\"role\":\"Secondary\",\"changed\":false}") }
        guard !demoting else { return reply(Self.error("a demotion is already in progress")) }
        demoting = true
        let started = monotonicNanos()
        let flushAndDemote = { [self] in
            // Writes waiting for the activity log belong to clients that are gone.
            waitingForLog.removeAll()
            let flushID = nextClientID
            nextClientID += 1
            internalFlushes[flushID] = { [self] result in
                beginActions()
                let refusal = core.demote(into: &actions)
                demoting = false
                if let refusal {
                    perform()
                    logger.error("demotion failed: \(refusal)")
                    return reply(Self.error("cannot demote: \(refusal)"))
                }
                if result < 0 && core.disk != .failed {
                    // The flush failed on the kept disk: the log's writes may be only in its
                    // cache, and the clean demotion drops the log (persisted with the state change).
                    core.markLogExtentsAfterFailedDemotionFlush(activityLog)
                }
                superblock.flags.remove(.wasPrimary)
                perform()
                // A verify runs on the primary: the peer may be promoted and write now.
                stopVerify(by: "the demotion", linkUp: link != nil)
                exportFollowsRole()
                let micros = (monotonicNanos() - started) / 1000
                if result != 0 { logger.warning("demotion: the final flush failed (\(SystemError.text(-result)))") }
                logger.notice("demoted to secondary in \(micros) µs")
                if me.id > peer.id && link == nil { dial() }
                reply("{\"ok\":true,\"role\":\"Secondary\",\"changed\":true,\"micros\":\(micros),\"flush_result\":\(result)}")
            }
            beginActions()
            core.clientFlush(id: flushID, into: &actions)
            perform()
        }
        if let server = nbdServer {
            server.disconnectClients(done: flushAndDemote)
        } else {
            flushAndDemote()
        }
    }

    /// `tandem connect [--discard-my-data]`: leave StandAlone (after a split brain, a refused
    /// peer or `tandem disconnect`) and connect again.
    private func connect(discardMyData: Bool) -> String {
        guard !stopping else { return Self.error("the node is stopping") }
        guard rollbackRun == nil else { return Self.error("a rollback is running; the node connects when it ends") }
        if discardMyData && core.role == .primary {
            return Self.error("a primary cannot discard its data: demote it first ('tandem secondary')")
        }
        beginActions()
        core.connect(discardMyData: discardMyData, into: &actions)
        perform()
        if discardMyData { logger.warning("connect: this node's changes since the split will be overwritten by \(peer.name)'s") }
        if me.id > peer.id { dial() }
        return "{\"ok\":true,\"connection\":\"\(Self.title(core.link.rawValue))\"}"
    }

    /// `tandem disconnect`: the link goes down on purpose and stays down until `tandem connect`.
    private func disconnect() -> String {
        beginActions()
        core.disconnect(freshUUID: Self.freshUUID(), into: &actions)
        perform()
        return "{\"ok\":true,\"connection\":\"StandAlone\"}"
    }

    static func wallClockMillis() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1000 + UInt64(now.tv_nsec) / 1_000_000
    }

    func statusJSON() -> String {
        let s = core.status
        let connected = s.link == .connected
        return """
            {"resource":"\(config.name)","node":"\(me.name)","role":"\(Self.title("\(s.role)"))","disk":"\(Self.title("\(s.disk)"))",\
            "split_brain":\(s.splitBrain),\
            "role_conflict":\(s.roleConflict.map { "{\"reason\":\"\($0.rawValue)\",\"remedy\":\"\(Self.remedy($0))\"}" } ?? "null"),"quorum":\(witness == nil ? "null" : "\(hasQuorum)"),\
            "peer":{"node":"\(peer.name)","connection":"\(Self.title(s.link.rawValue))","role":\(s.peerRole.map { "\"\(Self.title("\($0)"))\"" } ?? "null"),\
            "disk":\(s.peerDisk.map { "\"\(Self.title("\($0)"))\"" } ?? "null"),\
            "replication":"\(connected ? Self.title(s.sync.rawValue) : "Off")","out_of_sync_bytes":\(s.outOfSyncBytes),\
            "resync_done_bytes":\(core.resyncedBytes)},"writes_in_flight":\(s.writesInFlight),"transfer_log_entries":\(s.transferLogEntries),\
            "verify":{"running":\(verify != nil),"checked_bytes":\(verify?.checkedBytes ?? lastVerify?.checked ?? 0),\
            "mismatched_bytes":\(verify?.mismatchedBytes ?? lastVerify?.mismatched ?? 0),\
            "unreadable_bytes":\(verify?.unreadableBytes ?? lastVerify?.unreadable ?? 0),"total_bytes":\(device.size)},\
            "rollback":{"running":\(rollbackRun != nil),"barrier":\(rollbackRun.map { "\($0.id)" } ?? "null"),\
            "done_chunks":\(rollbackRun?.next ?? 0),"total_chunks":\(rollbackRun?.plan.restores.count ?? 0),"failed":\(rollbackFailed)},\
            "diff":\(diffStatusJSON)}
            """
    }

    func statusText() -> String {
        let s = core.status
        var lines = ["\(config.name) role:\(Self.title("\(s.role)"))", "  disk:\(Self.title("\(s.disk)"))"]
        lines.append("  \(peer.name) connection:\(Self.title(s.link.rawValue))\(s.peerRole.map { " role:\(Self.title("\($0)"))" } ?? "")\(s.splitBrain ? " SPLIT-BRAIN (resolve with tandem connect --discard-my-data on the losing node)" : "")\(s.roleConflict.map { " ROLE-CONFLICT: \($0.rawValue) (\(Self.remedy($0)))" } ?? "")")
        if s.link == .connected {
            var peerLine = "    peer-disk:\(s.peerDisk.map { Self.title("\($0)") } ?? "DUnknown") replication:\(Self.title(s.sync.rawValue))"
            if s.outOfSyncBytes > 0 { peerLine += " out-of-sync:\(s.outOfSyncBytes / 1024)k" }
            lines.append(peerLine)
        } else if s.outOfSyncBytes > 0 {
            lines.append("    out-of-sync:\(s.outOfSyncBytes / 1024)k")
        }
        return lines.joined(separator: "\n")
    }

    // MARK: Stopping

    /// Before a clean stop of a connected primary (its clients gone): one flush on both sides,
    /// so the peer acknowledges every write's epoch and the link's end marks nothing out of sync.
    /// Without it the writes since the last flush stayed in the transfer log, the stop marked
    /// them, and the restart made the peer a resync target for them (Inconsistent meanwhile, so
    /// a disk failure then had no good copy to serve from). Bounded: after
    /// `Limits.stopSettleSeconds` the stop goes on (and marks what is still unacknowledged).
    func settle(then done: @escaping () -> Void) {
        guard !stopping, core.role == .primary, core.link == .connected, link != nil else { return done() }
        settleDone = done
        loop.addTimer(id: id, tag: Self.tagSettleTimer, afterNanos: UInt64(Limits.stopSettleSeconds) * 1_000_000_000)
        let flushID = nextClientID
        nextClientID += 1
        internalFlushes[flushID] = { [self] result in
            loop.cancelTimers(id: id, tag: Self.tagSettleTimer)
            if result != 0 { logger.warning("the flush before stopping failed (\(SystemError.text(-result)))") }
            settled()
        }
        beginActions()
        core.clientFlush(id: flushID, into: &actions)
        perform()
    }

    /// What to run once the settle's flush completes or its time is up, whichever comes first.
    private var settleDone: (() -> Void)?

    private func settled() {
        guard let done = settleDone else { return }
        settleDone = nil
        done()
    }

    func stop() {
        guard !stopping else { return }
        stopping = true
        if listenFD >= 0 { shutdown(listenFD, Int32(SHUT_RDWR)) }
        link?.close(reason: "node stopping")
        witness?.stop()
        for server in barrierExports.values { server.beginShutdown() }
        barrierExports.removeAll()
        if let maker = diffRun {
            maker.abandon()
            diffRun = nil
            logger.warning("diff to \(maker.output) abandoned: the node is stopping")
        }
        // Writes still on the disk or queued behind an overlapping one when the loop ends may
        // be on the peer and not here; the restart after a clean stop replays no activity log.
        core.markUnfinishedLocalWrites()
        persistMetadata()
        guard core.role == .primary else { return }
        // A write the peer acknowledged (its transfer log settled, nothing marked) may be only
        // in this disk's volatile cache: the restart as a clean primary resyncs nothing for it,
        // so the flag goes only once the disk synced. A failed sync keeps it: the restart is a
        // crashed primary's, the source of its activity log's extents (as a demotion whose
        // flush failed marks them). A detached disk marked the log's extents when it detached.
        if core.disk != .failed && fdatasync(device.fd) != 0 {
            logger.error("cannot sync \(device.path) on stopping (\(SystemError.text(errno))): it stays marked as a crashed primary's, and the restart resyncs its activity log's extents")
            return
        }
        superblock.flags.remove(.wasPrimary)
        persistMetadata()
    }

    static func freshUUID() -> UInt64 {
        var value: UInt64 = 0
        while value == 0 || value & ~1 == GenerationUUIDs.initialCurrent & ~1 {
            value = UInt64.random(in: 1...UInt64.max)
        }
        return value & ~1
    }
}
