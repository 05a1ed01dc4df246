import Testing
@testable import TandemCore

/// Two cores wired by hand: the test plays disk and network, one step at a time, so every
/// interleaving in a test is explicit. (The seeded simulator grows from this.)
struct Pair {
    var primary: ReplicaCore
    var secondary: ReplicaCore
    /// Local operations each side has been asked to do and not yet completed.
    var primaryDisk: [LocalIO] = []
    var secondaryDisk: [LocalIO] = []
    /// Messages in flight, in order.
    var toSecondary: [ReplicaCore.Action] = []
    var toPrimary: [PeerMessage] = []
    var completed: [UInt64: Int32] = [:]
    var flushed: [UInt64: Int32] = [:]
    var dropped: [LinkDownReason] = []
    /// Offsets of the primary's writes that settled (their activity-log extents released).
    var settled: [UInt64] = []
    static let size: UInt64 = 64 << 20

    init(transferLog: Int = 64) {
        let config = { (id: UInt8) in ReplicaCore.Configuration(nodeID: id, deviceBytes: Pair.size, transferLogEntriesMax: transferLog) }
        let uuids = GenerationUUIDs(current: 0x1000, bitmap: 0, history0: 0, history1: 0)
        primary = ReplicaCore(configuration: config(0), role: .primary, disk: .upToDate, uuids: uuids, bitmap: DirtyBitmap(deviceBytes: Pair.size))
        secondary = ReplicaCore(configuration: config(1), role: .secondary, disk: .upToDate, uuids: uuids, bitmap: DirtyBitmap(deviceBytes: Pair.size))
        var actions: [ReplicaCore.Action] = []
        primary.linkUp(peer: Pair.hello(1, .secondary), freshUUID: 0x5000, into: &actions)
        secondary.linkUp(peer: Pair.hello(0, .primary), freshUUID: 0x6000, into: &actions)
    }

    static func hello(_ id: UInt8, _ role: PeerRole) -> PeerHello {
        PeerHello(versionMin: 1, versionMax: 1, nodeID: id, role: role, diskState: .upToDate, flags: 0, resourceName: "r0",
                  deviceSizeBytes: size, bitmapGranularityBytes: 4096, uuids: PeerGenerationUUIDs(current: 0x1000, bitmap: 0, history: [0, 0, 0, 0]))
    }

    /// The hello a core would send now.
    static func hello(of core: ReplicaCore, flags: UInt16 = 0) -> PeerHello {
        PeerHello(versionMin: 1, versionMax: 1, nodeID: core.configuration.nodeID, role: core.role, diskState: core.disk, flags: flags,
                  resourceName: "r0", deviceSizeBytes: size, bitmapGranularityBytes: 4096, uuids: ReplicaCore.wire(core.uuids))
    }

    /// Reconnects: both hellos, then every message exchanged until both sides are quiet. The
    /// fresh UUIDs seed the link's resync ids too (from bit 16 up: the default keeps the ids of
    /// the first link).
    mutating func reconnect(freshUUIDs: (primary: UInt64, secondary: UInt64) = (0x7000, 0x8000)) {
        let helloP = Pair.hello(of: primary), helloS = Pair.hello(of: secondary)
        var actions: [ReplicaCore.Action] = []
        primary.linkUp(peer: helloS, freshUUID: freshUUIDs.primary, into: &actions)
        applyPrimary(actions)
        actions.removeAll()
        secondary.linkUp(peer: helloP, freshUUID: freshUUIDs.secondary, into: &actions)
        applySecondary(actions)
        for _ in 0..<4 {
            deliverToSecondary()
            deliverToPrimary()
        }
    }

    mutating func applyPrimary(_ actions: [ReplicaCore.Action]) {
        for action in actions {
            switch action {
            case .submitLocal(let io): primaryDisk.append(io)
            case .send, .sendWrite, .sendResync: toSecondary.append(action)
            case .completeClient(let id, let result): completed[id] = result
            case .completeClientFlush(let id, let result): flushed[id] = result
            case .dropLink(let reason): dropped.append(reason)
            case .writeSettled(let offset, _): settled.append(offset)
            case .stateChanged, .recordBarrier, .rollbackNoticeAnswered: break
            }
        }
    }

    mutating func applySecondary(_ actions: [ReplicaCore.Action]) {
        for action in actions {
            switch action {
            case .submitLocal(let io): secondaryDisk.append(io)
            case .send(let message): toPrimary.append(message)
            case .sendWrite, .sendResync: Issue.record("secondary sent a write")
            case .completeClient, .completeClientFlush: Issue.record("secondary answered a client")
            case .dropLink(let reason): dropped.append(reason)
            case .writeSettled: Issue.record("secondary settled a client write")
            case .stateChanged, .recordBarrier, .rollbackNoticeAnswered: break
            }
        }
    }

    mutating func write(_ id: UInt64, at offset: UInt64, _ length: UInt32 = 4096, fua: Bool = false) {
        var actions: [ReplicaCore.Action] = []
        primary.clientWrite(id: id, offset: offset, length: length, kind: .write, fua: fua, into: &actions)
        applyPrimary(actions)
    }

    /// A write through both disks and answered: what a flush then covers.
    mutating func writeDoneOnBoth(_ id: UInt64, at offset: UInt64) {
        write(id, at: offset)
        deliverToSecondary()
        completeSecondary(.peerWrite(id))
        deliverToPrimary()
        completePrimary(.client(id))
    }

    /// A client flush that reaches the peer first, each side answering as given.
    mutating func flushThroughBoth(_ id: UInt64, peer: Int32 = 0, local: Int32 = 0) {
        flush(id)
        deliverToSecondary()
        completeSecondary(.peerFlush(id), peer)
        deliverToPrimary()
        completePrimary(.clientFlush(id), local)
    }

    mutating func flush(_ id: UInt64) {
        var actions: [ReplicaCore.Action] = []
        primary.clientFlush(id: id, into: &actions)
        applyPrimary(actions)
    }

    /// Delivers every message queued for the secondary.
    mutating func deliverToSecondary() {
        let queued = toSecondary
        toSecondary.removeAll()
        for action in queued {
            var actions: [ReplicaCore.Action] = []
            switch action {
            case .sendWrite(let write, let kind, _): secondary.peerWrite(write, kind: kind, into: &actions)
            case .sendResync(let data, _): secondary.peerMessage(.resyncData(data, payload: []), into: &actions)
            case .send(let message): secondary.peerMessage(message, into: &actions)
            default: Issue.record("unexpected \(action)")
            }
            applySecondary(actions)
        }
    }

    mutating func deliverToPrimary() {
        let queued = toPrimary
        toPrimary.removeAll()
        for message in queued {
            var actions: [ReplicaCore.Action] = []
            primary.peerMessage(message, into: &actions)
            applyPrimary(actions)
        }
    }

    /// Completes the first pending local operation on a side matching `tag`.
    mutating func completePrimary(_ tag: LocalIO.Tag, _ result: Int32 = 0) {
        guard let i = primaryDisk.firstIndex(where: { $0.tag == tag }) else { Issue.record("no primary op \(tag)"); return }
        primaryDisk.remove(at: i)
        var actions: [ReplicaCore.Action] = []
        primary.localCompleted(tag, result: result, into: &actions)
        applyPrimary(actions)
    }

    mutating func completeSecondary(_ tag: LocalIO.Tag, _ result: Int32 = 0) {
        guard let i = secondaryDisk.firstIndex(where: { $0.tag == tag }) else { Issue.record("no secondary op \(tag)"); return }
        secondaryDisk.remove(at: i)
        var actions: [ReplicaCore.Action] = []
        secondary.localCompleted(tag, result: result, into: &actions)
        applySecondary(actions)
    }

    /// The primary writes `bytes` at 0 while the link is down, then the link comes back: it is
    /// the resync source of those blocks, and its flush before the first read is done (no
    /// budget yet: the resync starts on ticks).
    mutating func resyncAfterWriteAlone(_ bytes: UInt32) {
        dropLink()
        write(1, at: 0, bytes)
        completePrimary(.client(1))
        reconnect()
        completePrimary(.resyncFlush)
    }

    /// The source's flush before its first read completes (if it has not), then 100 ms of
    /// resync budget: the source reads its first runs, and the reads complete (their data goes
    /// to the peer).
    mutating func readResyncRuns() {
        if primaryDisk.contains(where: { $0.tag == .resyncFlush }) { completePrimary(.resyncFlush) }
        var actions: [ReplicaCore.Action] = []
        primary.tick(nowNanos: 1_000_000_000, into: &actions)
        primary.tick(nowNanos: 1_100_000_000, into: &actions)
        applyPrimary(actions)
        for io in primaryDisk { if case .resyncRead = io.tag { completePrimary(io.tag) } }
    }

    /// The target completes its resync writes, then the flushes their acks wait for.
    mutating func completeResyncWritesAndFlush() {
        for io in secondaryDisk { if case .resyncWrite = io.tag { completeSecondary(io.tag) } }
        while secondaryDisk.contains(where: { $0.tag == .resyncTargetFlush }) { completeSecondary(.resyncTargetFlush) }
    }

    mutating func dropLink(freshUUIDs: (primary: UInt64, secondary: UInt64) = (0x2000, 0x3000)) {
        var actions: [ReplicaCore.Action] = []
        primary.linkDown(.peerClosed, freshUUID: freshUUIDs.primary, into: &actions)
        applyPrimary(actions)
        actions.removeAll()
        secondary.linkDown(.peerClosed, freshUUID: freshUUIDs.secondary, into: &actions)
        applySecondary(actions)
        toSecondary.removeAll()
        toPrimary.removeAll()
    }
}

@Suite struct ReplicaCoreTests {
    @Test func protocolCAnswersOnlyWhenBothSidesWrote() {
        var pair = Pair()
        pair.write(1, at: 8192)
        #expect(pair.primaryDisk.count == 1 && pair.toSecondary.count == 1)
        pair.completePrimary(.client(1))
        #expect(pair.completed[1] == nil, "local alone is not enough under protocol C")
        pair.deliverToSecondary()
        #expect(pair.secondaryDisk.first?.buffer == .peer(1))
        pair.completeSecondary(.peerWrite(1))
        pair.deliverToPrimary()
        #expect(pair.completed[1] == 0)
        // The other order: peer ack first, then the local disk.
        pair.write(2, at: 0)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(2))
        pair.deliverToPrimary()
        #expect(pair.completed[2] == nil)
        pair.completePrimary(.client(2))
        #expect(pair.completed[2] == 0)
        #expect(pair.primary.bitmap.setBitCount == 0)
    }

    @Test func aNewEpochStartsAfterACompletedWrite() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.write(2, at: 4096)
        let epochs = pair.toSecondary.compactMap { action -> UInt64? in
            if case .sendWrite(let w, _, _) = action { return w.epoch }
            return nil
        }
        #expect(epochs == [1, 1], "concurrent writes share an epoch")
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1))
        pair.completeSecondary(.peerWrite(2))
        pair.deliverToPrimary()
        pair.completePrimary(.client(1))
        pair.completePrimary(.client(2))
        pair.write(3, at: 8192)
        guard case .send(.barrier(let closed)) = pair.toSecondary.first, case .sendWrite(let w, _, _) = pair.toSecondary.last else {
            Issue.record("no barrier before the next epoch: \(pair.toSecondary)")
            return
        }
        #expect(closed == 1 && w.epoch == 2)
        pair.deliverToSecondary()
        #expect(pair.toPrimary.contains(.barrierAck(epoch: 1, writes: 2, result: 0)), "all writes of epoch 1 were done")
    }

    @Test func peerFlushWaitsForEarlierWritesAndCoversTheTransferLog() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.deliverToSecondary()
        pair.flush(100)
        pair.deliverToSecondary()
        #expect(!pair.secondaryDisk.contains { $0.tag == .peerFlush(100) }, "flush must wait for write 1 on the secondary")
        pair.completeSecondary(.peerWrite(1))
        #expect(pair.secondaryDisk.contains { $0.tag == .peerFlush(100) })
        pair.deliverToPrimary()
        pair.completePrimary(.client(1))
        #expect(pair.primary.status.transferLogEntries == 1, "acked but not yet flushed")
        pair.completePrimary(.clientFlush(100))
        #expect(pair.flushed[100] == nil, "the peer's flush is still out")
        pair.completeSecondary(.peerFlush(100))
        pair.deliverToPrimary()
        #expect(pair.flushed[100] == 0)
        #expect(pair.primary.status.transferLogEntries == 0)
    }

    /// Found by the simulator (`--double-faults`, seed 133): extents were released at the answer,
    /// so a primary crash right after the secondary lost its cache resynced neither.
    @Test func aWriteSettlesOnlyOnceAPeerFlushCoversIt() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.write(2, at: 1 << 20)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1))
        pair.completeSecondary(.peerWrite(2))
        pair.deliverToPrimary()
        pair.completePrimary(.client(1))
        #expect(pair.completed[1] == 0 && pair.settled.isEmpty, "answered, but the peer may still lose it")
        // A write waiting for room in the activity log: the node asks for a flush.
        var actions: [ReplicaCore.Action] = []
        pair.primary.flushPeerToSettleWrites(into: &actions)
        pair.applyPrimary(actions)
        actions.removeAll()
        pair.primary.flushPeerToSettleWrites(into: &actions)
        #expect(actions.isEmpty, "one flush in flight covers them all")
        pair.deliverToSecondary()
        guard let own = pair.secondaryDisk.first(where: { if case .peerFlush = $0.tag { true } else { false } }) else {
            Issue.record("no peer flush")
            return
        }
        pair.completeSecondary(own.tag)
        pair.deliverToPrimary()
        #expect(pair.settled == [0], "write 1 settles with the flush ack")
        pair.completePrimary(.client(2))
        #expect(pair.settled == [0, 1 << 20], "write 2, covered before its local completion, settles when it completes")
    }

    @Test func aFailedPeerFlushLeavesWhatItCoveredOutOfSync() {
        var pair = Pair()
        pair.writeDoneOnBoth(1, at: 0)
        pair.flushThroughBoth(100, peer: -5)
        #expect(pair.primary.bitmap.isDirty(offset: 0, length: 4096))
        #expect(pair.settled == [0] && pair.primary.status.transferLogEntries == 0)
    }

    @Test func linkLossMarksWhatThePeerMayLackAndFinishesLocally() {
        var pair = Pair()
        // Write 1: acked by the peer, not flushed. Write 2: never reached the peer.
        pair.writeDoneOnBoth(1, at: 0)
        pair.write(2, at: 1 << 20, 65536)
        pair.completePrimary(.client(2))
        #expect(pair.completed[2] == nil)
        pair.dropLink()
        #expect(pair.completed[2] == 0, "the client is answered once the peer is gone")
        #expect(pair.primary.bitmap.isDirty(offset: 0, length: 4096), "acked but unflushed: may be lost on the peer")
        #expect(pair.primary.bitmap.isDirty(offset: 1 << 20, length: 65536))
        #expect(pair.primary.bitmap.outOfSyncBytes == 4096 + 65536)
        #expect(pair.primary.uuids.bitmap == 0x1000 && pair.primary.uuids.current == 0x2000, "new generation for data the peer lacks")
        #expect(pair.secondary.uuids.current == 0x1000, "a secondary keeps its generation")
        // Writes while disconnected go to the bitmap only.
        pair.write(3, at: 8 << 20)
        #expect(pair.toSecondary.isEmpty)
        pair.completePrimary(.client(3))
        #expect(pair.completed[3] == 0)
        #expect(pair.primary.bitmap.isDirty(offset: 8 << 20, length: 4096))
        #expect(pair.primary.link == .connecting)
    }

    @Test func aFullTransferLogFlushesThePeerAndRemembersTheOldest() {
        var pair = Pair(transferLog: 4)
        for id in UInt64(1)...5 {
            pair.write(id, at: id * 4096)
            pair.deliverToSecondary()
            pair.completeSecondary(.peerWrite(id))
            pair.deliverToPrimary()
            pair.completePrimary(.client(id))
        }
        #expect(pair.primary.status.transferLogEntries == 4)
        #expect(pair.toSecondary.contains { if case .send(.flush) = $0 { true } else { false } }, "the core flushed the peer itself, half full")
        #expect(pair.primary.bitmap.isDirty(offset: 4096, length: 4096), "the evicted oldest entry is remembered in the bitmap")
        pair.deliverToSecondary()
        let own = pair.secondaryDisk.filter { if case .peerFlush = $0.tag { true } else { false } }
        #expect(!own.isEmpty)
        for io in own { pair.completeSecondary(io.tag) }
        pair.deliverToPrimary()
        #expect(pair.primary.status.transferLogEntries == 0)
    }

    @Test func aLocalDiskErrorIsServedByThePeer() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1))
        pair.deliverToPrimary()
        pair.completePrimary(.client(1), -5)
        #expect(pair.completed[1] == 0, "the peer has the data: the client sees no error")
        #expect(pair.primary.disk == .failed)
    }

    /// Found by the simulator (`--primary-disk-errors`, seeds 30, 105, 109): a detached disk kept
    /// `consistent` and came back UpToDate on stale data after a restart.
    @Test func aDetachedPrimaryDiskIsPersistedAsAResyncTargetAndMarksWhatItMisses() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1))
        pair.deliverToPrimary()
        pair.completePrimary(.client(1), -5)
        #expect(pair.primary.disk == .failed)
        #expect(pair.primary.localFlags.contains(.resyncTarget) && !pair.primary.localFlags.contains(.consistent))
        #expect(pair.primary.bitmap.isDirty(offset: 0, length: 4096), "the failed write is not on the local disk")
        pair.deliverToSecondary()
        #expect(pair.secondary.peerDisk == .failed, "the peer is told")
        // Writes go to the peer alone; the local disk misses them.
        pair.write(2, at: 8192)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(2))
        pair.deliverToPrimary()
        #expect(pair.completed[2] == 0 && pair.primary.bitmap.isDirty(offset: 8192, length: 4096))
        // A detached disk connects without a resync (it reads and writes through the peer).
        pair.dropLink()
        #expect(pair.primary.uuids.current == 0x1000, "a detached disk starts no generation")
        pair.reconnect()
        #expect(pair.primary.link == .connected && pair.primary.sync == .established && pair.primary.readsFromPeer)
        // No verify resync from a detached disk.
        var actions: [ReplicaCore.Action] = []
        pair.primary.resyncMarked(into: &actions)
        #expect(actions.isEmpty)
    }

    /// Found by the simulator (`--witness --switchover --primary-disk-errors`, seed 1100): a write
    /// in flight when the disk detached succeeded on it afterwards and was not marked; the
    /// detached disk is never flushed again, so a power loss took it and no resync repaired it.
    @Test func aWriteDoneOnADetachedDiskIsMarkedOutOfSync() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.write(2, at: 8192)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1))
        pair.completeSecondary(.peerWrite(2))
        pair.deliverToPrimary()
        pair.completePrimary(.client(1), -5)
        #expect(pair.primary.disk == .failed)
        pair.completePrimary(.client(2))
        #expect(pair.completed[2] == 0)
        #expect(pair.primary.bitmap.isDirty(offset: 8192, length: 4096), "landed on a detached disk: resynced into it later")
    }

    /// Found by the simulator (`--barriers --primary-disk-errors --switchover
    /// --overlapping-writes`, seed 101118196): a client flush failed on the primary's disk and the
    /// peer's flush answered it. The peer's ack settled the writes the flush covered and detached
    /// the disk in one batch, the settlement first: the room it freed in the activity log let a
    /// waiting write evict a settled write's extent, unsynced (the disk was detached), before the
    /// node carried the state change that marks the log's extents. The write, only in the
    /// detached disk's cache, was lost at a power loss and never resynced; the node was promoted
    /// later without it. Now the eviction marks the extents it takes from a detached disk.
    @Test func anExtentEvictedBeforeTheDetachIsCarriedIsMarked() {
        let extent = 64 << 10
        var log = ActivityLog(deviceBytes: Pair.size, extentBytes: extent, capacity: 2, ringSlots: ActivityLog.ringSlotsMin(capacity: 2),
                              nextSequence: 1, writeBytesMax: 4096)
        // The node: write 1 passes the log, and another write holds the log's second extent.
        for offset in [0, UInt64(2 * extent)] {
            guard case .needTransaction(let tx) = log.beginWrite(offset: offset, length: 4096) else { Issue.record("a cold extent"); return }
            #expect(log.transactionPersisted(tx) == nil)
        }
        var pair = Pair()
        pair.writeDoneOnBoth(1, at: 0)
        #expect(pair.settled.isEmpty, "no peer flush covers it yet")
        #expect(log.beginWrite(offset: 1 << 20, length: 4096) == .wait, "a write waits for room in the log")
        pair.flush(2)
        pair.completePrimary(.clientFlush(2), -5)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerFlush(2))
        #expect(pair.toPrimary.count == 1)
        var actions: [ReplicaCore.Action] = []
        pair.primary.peerMessage(pair.toPrimary.removeFirst(), into: &actions)
        let settledAt = actions.firstIndex { if case .writeSettled(0, _) = $0 { true } else { false } }
        let detachedAt = actions.firstIndex { if case .stateChanged(let status) = $0 { status.disk == .failed } else { false } }
        guard let settledAt, let detachedAt else { Issue.record("the ack settles write 1 and detaches the disk: \(actions)"); return }
        #expect(settledAt < detachedAt, "the node carries the settlement first")
        // Carried in that order: the freed extent goes to the waiting write, and the detached
        // disk is not synced before it leaves the log.
        let freed = log.endWrite(offset: 0, length: 4096)
        #expect(freed)
        guard case .needTransaction(let tx) = log.beginWrite(offset: 1 << 20, length: 4096) else { Issue.record("an eviction"); return }
        var evicted: [Int] = []
        log.forEachEvicted(of: tx) { evicted.append($0) }
        #expect(evicted == [0])
        var unmarked = pair.primary
        unmarked.markLogExtentsOfDetachedDisk(log)
        #expect(!unmarked.bitmap.isDirty(offset: 0, length: 4096), "the log's extents alone no longer name it")
        pair.primary.markExtentsEvictedFromDetachedDisk(log, by: tx)
        #expect(log.transactionPersisted(tx) == nil)
        // Then the state change: the log's extents, extent 0 no longer among them.
        pair.primary.markLogExtentsOfDetachedDisk(log)
        #expect(pair.primary.bitmap.isDirty(offset: 0, length: 4096), "write 1 is resynced into the disk at its next attach")
    }

    /// Found by the simulator (`--witness --switchover --primary-disk-errors`, seeds 241, 530,
    /// 1593): the core kept the `wasPrimary` it was built with, so the node's clearing it at a
    /// demotion came back at the next persist; a crash as secondary then marked stale hot extents
    /// and made that node the sync source over the peer's newer data.
    @Test func theCoreDoesNotKeepWasPrimary() {
        let core = ReplicaCore(configuration: .init(nodeID: 0, deviceBytes: 1 << 20), role: .primary, disk: .upToDate,
                               uuids: GenerationUUIDs(current: 0x1000, bitmap: 0, history0: 0, history1: 0),
                               bitmap: DirtyBitmap(deviceBytes: 1 << 20, granularityBytes: 4096), flags: [.consistent, .wasPrimary, .crashedPrimary])
        #expect(core.localFlags == [.consistent, .crashedPrimary])
    }

    /// Found by the simulator (`--primary-disk-errors`, seeds 105, 215, 884): a detached primary
    /// answered a write the link lost before the peer confirmed it.
    @Test func aDetachedPrimaryAnswersOnlyWhatThePeerConfirmed() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1))
        pair.deliverToPrimary()
        pair.completePrimary(.client(1), -5)
        pair.write(2, at: 4096)
        pair.flush(3)
        pair.dropLink()
        #expect(pair.completed[2] == -5 && pair.flushed[3] == -5, "on neither disk: EIO")
        pair.write(4, at: 8192)
        pair.flush(5)
        #expect(pair.completed[4] == -5 && pair.flushed[5] == -5)
    }

    /// Found by the simulator (`--failover`, seeds 968, 1450, 2370, 2653): a secondary that
    /// failed a replicated write stayed UpToDate and was promoted without it.
    @Test func aSecondaryThatFailsAReplicatedWriteDetaches() {
        var pair = Pair()
        pair.write(1, at: 12288)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1), -5)
        #expect(pair.secondary.disk == .failed && pair.secondary.localFlags.contains(.resyncTarget))
        #expect(pair.secondary.bitmap.isDirty(offset: 12288, length: 4096))
        pair.deliverToPrimary()
        #expect(pair.primary.peerDisk == .failed && !pair.primary.replicating)
        pair.completePrimary(.client(1))
        #expect(pair.completed[1] == 0 && pair.primary.bitmap.isDirty(offset: 12288, length: 4096))
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        #expect(pair.secondary.promote(force: false, freshUUID: 0x9000, nowMillis: 1, into: &actions) == .noUsableData)
    }

    @Test func aPeerWriteErrorLeavesTheRangeOutOfSync() {
        var pair = Pair()
        pair.write(1, at: 12288)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1), -28)
        pair.deliverToPrimary()
        pair.completePrimary(.client(1))
        #expect(pair.completed[1] == 0)
        #expect(pair.primary.bitmap.isDirty(offset: 12288, length: 4096))
    }

    @Test func protocolViolationsDropTheLink() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        pair.primary.peerMessage(.writeAck(id: 42, result: 0), into: &actions)
        #expect(actions.contains(.dropLink(.protocolError("ack of unknown write 42"))))
        actions.removeAll()
        pair.primary.peerWrite(PeerWrite(id: 1, offset: 0, length: 4096, epoch: 1), kind: .write, into: &actions)
        #expect(actions.contains { if case .dropLink = $0 { true } else { false } }, "a primary takes no replicated writes")
    }

    @Test func sizeMismatchRefusesTheLink() {
        var pair = Pair()
        pair.dropLink()
        var hello = Pair.hello(1, .secondary)
        hello.deviceSizeBytes += 4096
        var actions: [ReplicaCore.Action] = []
        pair.primary.linkUp(peer: hello, freshUUID: 1, into: &actions)
        #expect(actions.contains(.dropLink(.sizeMismatch)))
        #expect(pair.primary.link == .standalone)
    }

    @Test func sameGenerationNeedsNoSync() {
        let pair = Pair()
        #expect(pair.primary.lastDecision?.decision == .noSync)
        #expect(pair.primary.link == .connected && pair.primary.sync == .established)
        #expect(pair.primary.replicating)
    }

    @Test func reconnectAfterPrimaryWroteAloneResyncsFromThePrimary() {
        var pair = Pair()
        pair.dropLink()
        pair.write(1, at: 3 << 20, 8192)
        pair.completePrimary(.client(1))
        #expect(pair.completed[1] == 0)
        pair.reconnect()
        #expect(pair.primary.lastDecision?.decision == .becomeSource)
        #expect(pair.secondary.lastDecision?.decision == .becomeTarget)
        #expect(pair.primary.sync == .syncSource && pair.secondary.sync == .syncTarget)
        #expect(pair.secondary.disk == .inconsistent)
        #expect(pair.secondary.bitmap.isDirty(offset: 3 << 20, length: 8192), "the target learned the source's bitmap")
        #expect(pair.secondary.bitmap.outOfSyncBytes == pair.primary.bitmap.outOfSyncBytes)
        #expect(pair.primary.replicating, "application writes keep flowing during a resync")
    }

    @Test func theBitmapTravelsAsRunsOfNonZeroWords() {
        var pair = Pair()
        pair.dropLink()
        // Bits 0 and 3 share word 0; words 10 and 13 are 2 zero words apart (one run); the last
        // bit of the device is alone at the end.
        let bits = [0, 3, 640, 832, Int(Pair.size / 4096) - 1]
        for (i, bit) in bits.enumerated() {
            pair.write(UInt64(i + 1), at: UInt64(bit) * 4096)
            pair.completePrimary(.client(UInt64(i + 1)))
        }
        var actions: [ReplicaCore.Action] = []
        pair.primary.linkUp(peer: Pair.hello(of: pair.secondary), freshUUID: 0x7000, into: &actions)
        let chunks = actions.compactMap { action -> PeerBitmapChunk? in
            if case .send(.bitmapChunk(let chunk)) = action { chunk } else { nil }
        }
        #expect(chunks.map(\.firstBit) == [0, 640, UInt64(bits.last! / 64 * 64)])
        #expect(chunks.map(\.bitCount) == [64, 4 * 64, 64])
        var copy = DirtyBitmap(deviceBytes: Pair.size)
        for chunk in chunks {
            for (i, word) in chunk.words.enumerated() {
                for b in 0..<64 where word & (1 << UInt64(b)) != 0 {
                    copy.setRange(offset: (chunk.firstBit + UInt64(i * 64 + b)) * 4096, length: 4096)
                }
            }
        }
        #expect(copy.setBitCount == bits.count)
        for bit in bits { #expect(copy.isDirty(offset: UInt64(bit) * 4096, length: 4096)) }
    }

    /// A pair whose primary wrote after the link dropped, and its secondary forced primary while
    /// apart (its own new generation): the two will find a split brain.
    static func splitApart() -> (pair: Pair, forced: ReplicaCore) {
        var pair = Pair()
        pair.dropLink()
        pair.write(1, at: 0)
        pair.completePrimary(.client(1))
        let forced = ReplicaCore(configuration: pair.secondary.configuration, role: .primary, disk: .upToDate,
                                 uuids: pair.secondary.uuids.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x9000),
                                 bitmap: pair.secondary.bitmap)
        return (pair, forced)
    }

    @Test func bothSidesWritingApartIsSplitBrainAndNeverMerged() {
        var (pair, forced) = Self.splitApart()
        var actions: [ReplicaCore.Action] = []
        forced.linkUp(peer: Pair.hello(of: pair.primary), freshUUID: 1, into: &actions)
        #expect(actions.contains(.dropLink(.splitBrain)))
        #expect(forced.link == .standalone)
        actions.removeAll()
        pair.primary.linkUp(peer: Pair.hello(of: forced), freshUUID: 2, into: &actions)
        #expect(actions.contains(.dropLink(.splitBrain)))
        #expect(pair.primary.link == .standalone)
    }

    /// Found by tools/chaos (seed 33): both sides found the split brain, the peer's
    /// `disconnect(splitBrain)` came in after this side's own verdict had taken the link down,
    /// and the flag it set outlived that link. Once the operator had resolved the split brain and
    /// the pair was back in sync, the next ordinary link loss (the primary crashed) left this
    /// node StandAlone for good instead of reconnecting.
    @Test func aSplitBrainVerdictFromThePeerDoesNotOutliveItsLink() {
        var (pair, forced) = Self.splitApart()
        var actions: [ReplicaCore.Action] = []
        forced.linkUp(peer: Pair.hello(of: pair.primary), freshUUID: 1, into: &actions)
        #expect(forced.link == .standalone)
        // The peer's own verdict arrives after this side dropped the link.
        forced.peerMessage(.disconnect(reason: .splitBrain, text: "split brain"), into: &actions)
        #expect(forced.splitBrain)
        // The operator resolves it: this side demotes and gives up its changes.
        #expect(forced.demote(into: &actions) == nil)
        forced.connect(discardMyData: true, into: &actions)
        #expect(forced.link == .connecting)
        var peer = pair.primary
        peer.connect(discardMyData: false, into: &actions)
        forced.linkUp(peer: Pair.hello(of: peer, flags: 0), freshUUID: 2, into: &actions)
        #expect(forced.link == .handshaking || forced.link == .connected)
        // Later the link drops for an ordinary reason: the node must try to connect again.
        actions.removeAll()
        forced.linkDown(.peerClosed, freshUUID: 3, into: &actions)
        #expect(forced.link == .connecting, "an ordinary link loss after a resolved split brain leaves the node StandAlone")
    }

    @Test func newZeroedPairsSkipTheInitialSyncAndAgreeOnAGeneration() {
        let config = { (id: UInt8) in ReplicaCore.Configuration(nodeID: id, deviceBytes: Pair.size) }
        var a = ReplicaCore(configuration: config(0), role: .primary, disk: .inconsistent, uuids: GenerationUUIDs(), bitmap: DirtyBitmap(deviceBytes: Pair.size), flags: [.newZeroed])
        var b = ReplicaCore(configuration: config(1), role: .secondary, disk: .inconsistent, uuids: GenerationUUIDs(), bitmap: DirtyBitmap(deviceBytes: Pair.size), flags: [.newZeroed])
        let helloA = Pair.hello(of: a, flags: PeerFlags.Hello.newZeroed), helloB = Pair.hello(of: b, flags: PeerFlags.Hello.newZeroed)
        var fromA: [ReplicaCore.Action] = [], fromB: [ReplicaCore.Action] = []
        a.linkUp(peer: helloB, freshUUID: 0xabc0, into: &fromA)
        b.linkUp(peer: helloA, freshUUID: 0xdef0, into: &fromB)
        #expect(a.lastDecision?.decision == .skipInitialSync)
        for case .send(let message) in fromA {
            var ignored: [ReplicaCore.Action] = []
            b.peerMessage(message, into: &ignored)
        }
        #expect(a.uuids.current == b.uuids.current, "one generation for both")
        #expect(!a.uuids.isInitial)
        #expect(a.disk == .upToDate && b.disk == .upToDate)
    }

    /// Runs the resync to its end: completes every read and write as it appears.
    static func driveResync(_ pair: inout Pair, steps: Int = 200) {
        var now: UInt64 = 1_000_000_000
        for _ in 0..<steps {
            var actions: [ReplicaCore.Action] = []
            pair.primary.tick(nowNanos: now, into: &actions)
            pair.applyPrimary(actions)
            now += 10_000_000
            for io in pair.primaryDisk {
                switch io.tag {
                case .resyncRead, .resyncFlush: pair.completePrimary(io.tag)
                default: break
                }
            }
            pair.deliverToSecondary()
            pair.completeResyncWritesAndFlush()
            pair.deliverToPrimary()
            if pair.primary.sync == .established && pair.secondary.sync == .established { return }
        }
    }

    @Test func resyncCopiesExactlyTheOutOfSyncRangesAndEnds() {
        var pair = Pair()
        pair.dropLink()
        for (i, offset) in [UInt64(0), 5 << 20, 40 << 20].enumerated() {
            pair.write(UInt64(i + 1), at: offset, 65536)
            pair.completePrimary(.client(UInt64(i + 1)))
        }
        let dirty = pair.primary.bitmap.outOfSyncBytes
        #expect(dirty == 3 * 65536)
        pair.reconnect()
        #expect(pair.primary.sync == .syncSource)
        Self.driveResync(&pair)
        #expect(pair.primary.sync == .established && pair.secondary.sync == .established)
        #expect(pair.primary.resyncedBytes == dirty, "moved the dirty amount, no more")
        #expect(pair.primary.bitmap.setBitCount == 0 && pair.secondary.bitmap.setBitCount == 0)
        #expect(pair.secondary.disk == .upToDate && pair.primary.peerDisk == .upToDate)
        #expect(pair.secondary.uuids.current == pair.primary.uuids.current, "the target adopted the source's generation")
        #expect(pair.primary.uuids.bitmap == 0)
    }

    /// Found by the simulator (`--switchover --failover --double-faults --primary-disk-errors`,
    /// seed 1009): a secondary source ended the resync with the copied blocks only in its
    /// volatile cache, lost them in a power loss, and the replicas differed with no bit set.
    @Test func theSourceFlushesBeforeItEndsAResync() {
        var pair = Pair()
        pair.resyncAfterWriteAlone(65536)
        pair.readResyncRuns()
        pair.deliverToSecondary()
        pair.completeResyncWritesAndFlush()
        pair.deliverToPrimary()
        #expect(pair.primary.bitmap.setBitCount == 0 && pair.primaryDisk.map(\.tag) == [.resyncFlush])
        #expect(pair.primary.sync == .syncSource, "not done before the flush")
        pair.completePrimary(.resyncFlush)
        #expect(pair.primary.sync == .established && pair.toSecondary.contains(.send(.resyncDone)))
    }

    /// Found by the simulator (`--switchover --overlapping-writes --primary-disk-errors`, seed
    /// 92120945): a secondary source sent a block it held only in its volatile cache (a
    /// replicated write no flush had covered, whose primary had crashed), both sides cleared the
    /// bit, the link reset, and a power loss took the block from the source: the replicas
    /// differed with no bit set. Now the source reads nothing before a flush of its own.
    @Test func theSourceFlushesBeforeItReads() {
        var pair = Pair()
        pair.dropLink()
        pair.write(1, at: 0, 65536)
        pair.completePrimary(.client(1))
        pair.reconnect()
        #expect(pair.primary.sync == .syncSource && pair.primaryDisk.map(\.tag) == [.resyncFlush])
        var actions: [ReplicaCore.Action] = []
        pair.primary.tick(nowNanos: 1_000_000_000, into: &actions)
        pair.primary.tick(nowNanos: 1_100_000_000, into: &actions)
        pair.applyPrimary(actions)
        #expect(pair.primaryDisk.map(\.tag) == [.resyncFlush], "budget, but no read before the flush")
        pair.completePrimary(.resyncFlush, -5)
        #expect(pair.primaryDisk.isEmpty, "a failed flush waits for the next tick")
        actions.removeAll()
        pair.primary.tick(nowNanos: 1_200_000_000, into: &actions)
        pair.applyPrimary(actions)
        #expect(pair.primaryDisk.map(\.tag) == [.resyncFlush], "tried again, still no read")
        #expect(pair.primary.disk == .upToDate, "the peer is no full copy: the disk stays")
        pair.completePrimary(.resyncFlush)
        #expect(pair.primaryDisk.contains { if case .resyncRead = $0.tag { true } else { false } }, "reads once it succeeded")
        // The failed flush took a writeback error (the kernel reports it once): the client's
        // next flush reports it, though the retried flush succeeded.
        for id: UInt64 in [40, 41] {
            pair.flush(id)
            pair.completePrimary(.clientFlush(id))
            pair.deliverToSecondary()
            pair.completeSecondary(.peerFlush(id))
            pair.deliverToPrimary()
        }
        #expect(pair.flushed[40] == -5 && pair.flushed[41] == 0, "reported once")
        Self.driveResync(&pair)
        #expect(pair.primary.sync == .established && pair.secondary.disk == .upToDate)
    }

    /// Found by the simulator (`--witness --failover --double-faults --overlapping-writes`, seed
    /// 1302): a replicated write failed on the resync target just before the source, which had
    /// not heard yet, ended the resync; `resyncDone` made the target UpToDate without the write,
    /// and a failover promoted it.
    @Test func aWriteThatFailedOnTheTargetKeepsItFromBecomingUpToDate() {
        var pair = Pair()
        pair.resyncAfterWriteAlone(65536)
        pair.readResyncRuns()
        pair.write(2, at: 1 << 20)  // replicated to the target during the resync
        pair.completePrimary(.client(2))
        pair.deliverToSecondary()
        pair.completeResyncWritesAndFlush()
        pair.deliverToPrimary()
        pair.completePrimary(.resyncFlush)
        #expect(pair.primary.sync == .established && pair.toSecondary.contains(.send(.resyncDone)), "the source ended the resync")
        pair.completeSecondary(.peerWrite(2), -5)
        #expect(pair.secondary.disk == .inconsistent, "a resync target does not detach at once: the source copies the range again")
        pair.deliverToSecondary()
        #expect(pair.secondary.disk == .failed && pair.secondary.localFlags.contains(.resyncTarget),
                "the resync ended without the failed write: detached, not UpToDate")
        #expect(pair.secondary.bitmap.isDirty(offset: 1 << 20, length: 4096), "marked for the resync after the next attach")
        #expect(pair.secondary.uuids.current == pair.primary.uuids.current, "the source's generation, with that block marked")
        pair.deliverToPrimary()
        #expect(pair.completed[2] == 0 && pair.primary.peerDisk == .failed && pair.primary.bitmap.isDirty(offset: 1 << 20, length: 4096))
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        #expect(pair.secondary.promote(force: false, freshUUID: 0x9000, nowMillis: 1, into: &actions) == .noUsableData)
    }

    /// Found by the simulator (`--switchover`, seed 2722): a client write during a verify's
    /// handshake started a generation the target never adopted (it took the hello's at the end);
    /// after a switchover, the next link loss looked like a split brain.
    @Test func aGenerationStartedDuringAHandshakeIsAdoptedAtTheEnd() {
        var pair = Pair()
        pair.primary.markOutOfSync(offset: 0, length: 4096)
        var actions: [ReplicaCore.Action] = []
        pair.primary.resyncMarked(into: &actions)
        pair.applyPrimary(actions)
        #expect(pair.primary.link == .handshaking)
        pair.primary.spareUUID = 0x4000  // as the node keeps one
        pair.write(1, at: 8192)
        pair.completePrimary(.client(1))
        #expect(pair.completed[1] == 0 && pair.primary.uuids.current == 0x4000, "answered without the peer: a new generation")
        #expect(pair.primary.bitmap.isDirty(offset: 8192, length: 4096), "the resync copies it")
        for _ in 0..<4 {
            pair.deliverToSecondary()
            pair.deliverToPrimary()
        }
        Self.driveResync(&pair)
        #expect(pair.primary.sync == .established && pair.secondary.sync == .established)
        #expect(pair.secondary.uuids.current == 0x4000 && pair.primary.uuids.current == 0x4000)
    }

    @Test func aClientWriteDuringAResyncReadMakesItsDataStale() {
        var pair = Pair()
        pair.resyncAfterWriteAlone(4096)
        var actions: [ReplicaCore.Action] = []
        // The first tick starts the clock; budget accrues from the second.
        pair.primary.tick(nowNanos: 1, into: &actions)
        pair.primary.tick(nowNanos: 100_000_001, into: &actions)
        pair.applyPrimary(actions)
        guard let read = pair.primaryDisk.first(where: { if case .resyncRead = $0.tag { true } else { false } }) else {
            Issue.record("no resync read started")
            return
        }
        // A client writes the same block while the resync read is on the disk.
        pair.write(2, at: 0, 4096)
        pair.completePrimary(read.tag)
        #expect(!pair.toSecondary.contains { if case .sendResync = $0 { true } else { false } }, "stale resync data must not be sent")
        #expect(pair.primary.bitmap.isDirty(offset: 0, length: 4096), "the block stays out of sync")
        // The client write completes on both sides; the resync then copies the block again.
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(2))
        pair.deliverToPrimary()
        pair.completePrimary(.client(2))
        #expect(pair.completed[2] == 0)
        Self.driveResync(&pair)
        #expect(pair.primary.sync == .established && pair.primary.bitmap.setBitCount == 0)
    }

    @Test func overlappingWritesApplyInArrivalOrderOnTheSecondary() {
        var pair = Pair()
        pair.write(1, at: 0, 8192)
        pair.write(2, at: 4096, 4096)
        pair.write(3, at: 65536, 4096)
        pair.deliverToSecondary()
        let started = pair.secondaryDisk.map(\.tag)
        #expect(started == [.peerWrite(1), .peerWrite(3)], "write 2 waits for the overlapping write 1")
        pair.completeSecondary(.peerWrite(1))
        #expect(pair.secondaryDisk.contains { $0.tag == .peerWrite(2) })
    }

    /// Found by the simulator (`--overlapping-writes`, seed 60): the primary submitted
    /// overlapping client writes at once, its disk could finish them in the other order, and the
    /// two copies ended with different data.
    @Test func overlappingClientWritesReachThePrimaryDiskInArrivalOrder() {
        var pair = Pair()
        pair.write(1, at: 0, 8192)
        pair.write(2, at: 4096, 4096)
        pair.write(3, at: 65536, 4096)
        #expect(pair.primaryDisk.map(\.tag) == [.client(1), .client(3)], "write 2 waits for the overlapping write 1")
        #expect(pair.toSecondary.count == 3, "all three go to the peer at once, in order")
        pair.completePrimary(.client(1))
        #expect(pair.primaryDisk.map(\.tag) == [.client(3), .client(2)])
    }

    /// Found by the simulator (`--failover --double-faults --overlapping-writes`, seeds 27782 and
    /// 21570): write 2 waited on the primary behind the overlapping write 1, still on its disk;
    /// the peer applied and acknowledged it; the node stopped cleanly before write 2 reached its
    /// disk. The restart after a clean stop marks no activity-log extents, and the bitmap lacked
    /// the range: no resync covered it and the copies differed.
    @Test func aCleanStopMarksWritesNotDoneOnTheLocalDisk() {
        var pair = Pair()
        pair.write(1, at: 0, 8192)
        pair.write(2, at: 4096, 4 * 4096)
        pair.write(3, at: 1 << 20, 4096)
        #expect(pair.primaryDisk.map(\.tag) == [.client(1), .client(3)], "write 2 waits for the overlapping write 1")
        pair.deliverToSecondary()
        for tag in [LocalIO.Tag.peerWrite(1), .peerWrite(2), .peerWrite(3)] { pair.completeSecondary(tag) }
        pair.deliverToPrimary()
        pair.completePrimary(.client(3))
        #expect(pair.completed[3] == 0)
        // A flush covers the three on the peer: the transfer log no longer marks them.
        pair.flushThroughBoth(10)
        #expect(pair.flushed[10] == 0)
        // The node stops: the link goes down, then the core marks what the local disk may lack.
        pair.dropLink()
        #expect(pair.primary.bitmap.setBitCount == 0, "the peer has every write, durably: nothing it lacks")
        pair.primary.markUnfinishedLocalWrites()
        #expect(pair.primary.bitmap.isDirty(offset: 0, length: 8192), "write 1, still on the disk")
        #expect(pair.primary.bitmap.isDirty(offset: 4 * 4096, length: 4096), "write 2, waiting behind write 1 and on the peer")
        #expect(!pair.primary.bitmap.isDirty(offset: 1 << 20, length: 4096), "write 3 is done on both sides")
        #expect(pair.primary.bitmap.setBitCount == 5)
    }

    /// Found by the simulator (`--witness --failover --double-faults --overlapping-writes`, seed
    /// 20824): a write done on the primary's disk, not yet confirmed by the peer, when the disk
    /// detached and then the link dropped. It was answered with success though only the
    /// detached disk held it (a resync target from then on, overwritten from the peer).
    @Test func aWriteOnlyOnADetachedDiskFails() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.write(2, at: 8192)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(2))
        pair.deliverToPrimary()
        pair.completePrimary(.client(1))
        pair.completePrimary(.client(2))
        #expect(pair.completed[2] == 0 && pair.completed[1] == nil, "write 1 waits for the peer")
        var actions: [ReplicaCore.Action] = []
        _ = pair.primary.localReadFailed(into: &actions)
        pair.applyPrimary(actions)
        #expect(pair.primary.disk == .failed)
        pair.dropLink()
        #expect(pair.completed[1] == -5, "only the detached disk has it")
        #expect(pair.primary.bitmap.isDirty(offset: 0, length: 4096))
    }

    @Test func resyncKeepsToItsRate() {
        var pair = Pair()
        pair.resyncAfterWriteAlone(8 << 20)
        var actions: [ReplicaCore.Action] = []
        // 256 MiB/s for 10 ms earns 2.6 MiB: no more than that (plus one run of debt) is read.
        pair.primary.tick(nowNanos: 1_000_000_000, into: &actions)
        pair.primary.tick(nowNanos: 1_010_000_000, into: &actions)
        let read = actions.reduce(0) { sum, action in
            if case .submitLocal(let io) = action, case .resyncRead = io.tag { return sum + Int(io.length) }
            return sum
        }
        #expect(read > 0 && read <= (256 << 20) / 100 + (1 << 20), "read \(read) bytes in 10 ms")
    }

    /// While client writes or local reads compete, the resync keeps to the lower rate; a tick
    /// with neither gives it the full rate again.
    @Test(arguments: [false, true])
    func resyncSlowsWhileApplicationIOCompetes(byRead: Bool) {
        var pair = Pair()
        pair.resyncAfterWriteAlone(8 << 20)
        func resyncReads(_ actions: [ReplicaCore.Action]) -> Int {
            actions.reduce(0) { sum, action in
                if case .submitLocal(let io) = action, case .resyncRead = io.tag { return sum + Int(io.length) }
                return sum
            }
        }
        var actions: [ReplicaCore.Action] = []
        pair.primary.tick(nowNanos: 1_000_000_000, into: &actions)
        #expect(resyncReads(actions) == 0, "no budget before time passes")
        if byRead {
            pair.primary.applicationIO()
        } else {
            pair.write(2, at: 32 << 20, 4096) // outside what the resync copies
        }
        actions.removeAll()
        // 100 ms at the competing 10 MiB/s earns 1 MiB: one run (of at most 1 MiB) starts.
        pair.primary.tick(nowNanos: 1_100_000_000, into: &actions)
        let competing = resyncReads(actions)
        #expect(competing > 0 && competing <= (10 << 20) / 10, "read \(competing) bytes in 100 ms while competing")
        actions.removeAll()
        // 100 ms with nothing competing earns 25.6 MiB: every free resync slot starts.
        pair.primary.tick(nowNanos: 1_200_000_000, into: &actions)
        let free = resyncReads(actions)
        #expect(free >= 4 << 20, "read \(free) bytes in 100 ms with nothing competing")
    }
}
