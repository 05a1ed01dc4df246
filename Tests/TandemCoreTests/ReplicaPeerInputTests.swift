import Testing
@testable import TandemCore

/// Values a misbehaving peer puts in well-formed messages: ids past `Int`, results past any
/// errno, ranges past the end of the device, ids of writes still in flight. Each is a protocol
/// error (the link drops), never a trap, never a write, never a buffer taken over.
@Suite struct ReplicaPeerInputTests {
    static func isProtocolError(_ action: ReplicaCore.Action) -> Bool {
        if case .dropLink(.protocolError) = action { true } else { false }
    }

    /// The result is negated into an `Int32`: 0x8000_0000 once trapped there.
    @Test(arguments: [UInt32(0x8000_0000), UInt32.max, PeerProtocol.resultMax + 1])
    func ackResultsPastAnyErrnoAreProtocolErrors(result: UInt32) {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.flush(2)
        pair.deliverToSecondary()
        pair.toPrimary = [.writeAck(id: 1, result: result), .flushAck(id: 2, result: result)]
        pair.deliverToPrimary()
        #expect(pair.dropped.count == 2 && pair.dropped.allSatisfy {
            if case .protocolError(let why) = $0 { why.contains("result \(result)") } else { false }
        }, "\(pair.dropped)")
        pair.completePrimary(.client(1))
        #expect(pair.completed[1] == nil && pair.flushed[2] == nil, "nothing is answered on such an ack")
    }

    /// The node keyed resync buffers by `Int(id)`: an id from 2^63 up trapped there.
    @Test(arguments: [UInt64(1) << 63, UInt64.max])
    func resyncDataWithAnIdPastIntIsAProtocolError(id: UInt64) {
        var pair = Pair()
        pair.resyncAfterWriteAlone(4096)
        #expect(pair.secondary.sync == .syncTarget)
        var actions: [ReplicaCore.Action] = []
        pair.secondary.peerMessage(.resyncData(PeerResyncData(id: id, offset: 0, length: 4096), payload: []), into: &actions)
        #expect(actions == [.dropLink(.protocolError("resync data id \(id) out of range"))])
    }

    /// Protocol/peer.md 2.2: the receiver checks a write's range against its device. A file
    /// backing device grew under such a write; a block device failed it, and the secondary
    /// detached over a peer's mistake.
    @Test func writesAndResyncDataPastTheEndOfTheDeviceAreProtocolErrors() {
        var pair = Pair()
        let end = Pair.size
        let writes: [PeerMessage] = [
            .data(PeerWrite(id: 1, offset: end - 4096, length: 8192, epoch: 1), payload: []),
            .trim(PeerWrite(id: 2, offset: end, length: 1, epoch: 1)),
            .zeroes(PeerWrite(id: 3, offset: UInt64.max - 4096, length: 4096, epoch: 1)),
        ]
        for message in writes {
            var actions: [ReplicaCore.Action] = []
            pair.secondary.peerMessage(message, into: &actions)
            #expect(actions.count == 1 && actions.allSatisfy(Self.isProtocolError), "\(message): \(actions)")
        }
        var actions: [ReplicaCore.Action] = []
        pair.secondary.peerMessage(.data(PeerWrite(id: 4, offset: end - 4096, length: 4096, epoch: 1), payload: []), into: &actions)
        #expect(actions.contains { if case .submitLocal = $0 { true } else { false } }, "the last block is still writable")

        pair.resyncAfterWriteAlone(4096)
        actions.removeAll()
        pair.secondary.peerMessage(.resyncData(PeerResyncData(id: 1, offset: end, length: 4096), payload: []), into: &actions)
        #expect(actions.count == 1 && actions.allSatisfy(Self.isProtocolError), "\(actions)")
    }

    /// A chunk whose bit range overflows 64 bits (the codec refuses it; the core checks without
    /// the sum, which trapped) or runs past the bitmap.
    @Test(arguments: [UInt64.max - 63, UInt64(Pair.size / 4096)])
    func aBitmapChunkPastTheBitmapIsAProtocolError(firstBit: UInt64) {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        pair.secondary.peerMessage(.bitmapChunk(PeerBitmapChunk(firstBit: firstBit, bitCount: 128, words: [1, 1])), into: &actions)
        #expect(actions.contains(.dropLink(.protocolError("unexpected bitmap chunk"))), "\(actions)")
        #expect(pair.secondary.bitmap.setBitCount == 0)
    }

    /// A resync write of an earlier link is no longer owed an ack, but it still holds its id
    /// (the node's buffer key) until it completes: data arriving with that id again, here from a
    /// source whose new link drew the same id base, once replaced the buffer under the write.
    @Test func resyncDataWithTheIdOfAWriteStillInFlightIsAProtocolError() {
        var pair = Pair()
        let old = pair.resyncRunsOnTheTarget(1)
        #expect(old.count == 1)
        pair.dropLink()
        pair.reconnect()  // the same resync id base as the first link
        pair.readResyncRuns()
        guard case .sendResync(let data, _)? = pair.toSecondary.first(where: { if case .sendResync = $0 { true } else { false } }) else {
            Issue.record("the source sent no resync data: \(pair.toSecondary)")
            return
        }
        #expect(data.id == ReplicaResyncTests.id(old[0]), "the test needs the ids to collide")
        pair.deliverToSecondary()
        #expect(pair.dropped == [.protocolError("resync data \(data.id) again before its ack")])
        #expect(pair.secondaryDisk.count { $0.tag == old[0].tag } == 1, "the write in flight is the only one with its id")
        // The old write completes: the id is free again.
        pair.completeSecondary(old[0].tag)
        var actions: [ReplicaCore.Action] = []
        pair.secondary.peerMessage(.resyncData(data, payload: []), into: &actions)
        #expect(!actions.contains(where: Self.isProtocolError), "\(actions)")
    }

    /// What the node relies on to hand a payload over: a buffer key only for data the core
    /// accepted and writes from a payload.
    @Test func onlyAcceptedPayloadsAreHandedOver() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        #expect(pair.secondary.peerResyncData(PeerResyncData(id: 5, offset: 0, length: 4096), into: &actions) == nil, "outside a resync")
        #expect(pair.secondary.peerWrite(PeerWrite(id: 6, offset: 0, length: 4096, epoch: 1), kind: .write, into: &actions))
        #expect(!pair.secondary.peerWrite(PeerWrite(id: 6, offset: 4096, length: 4096, epoch: 1), kind: .write, into: &actions), "duplicate")
        #expect(!pair.primary.peerWrite(PeerWrite(id: 7, offset: 0, length: 4096, epoch: 1), kind: .write, into: &actions), "a primary")

        pair.resyncAfterWriteAlone(4096)
        actions.removeAll()
        #expect(pair.secondary.peerResyncData(PeerResyncData(id: 5, offset: 8192, length: 4096), into: &actions) == .resync(5))
        #expect(pair.secondary.peerResyncData(PeerResyncData(id: 5, offset: 8192, length: 4096), into: &actions) == nil, "again")
        #expect(pair.secondary.peerResyncData(PeerResyncData(id: 8, offset: 16384, length: 4096, flags: PeerFlags.ResyncData.zero),
                                              into: &actions) == nil, "zeroes need no payload")
        #expect(pair.secondary.peerResyncData(PeerResyncData(id: 9, offset: 16384, length: 4096, result: 5), into: &actions) == nil,
                "a failed read writes nothing")
        #expect(actions.count(where: Self.isProtocolError) == 1, "only the repeated id: \(actions)")
    }

    /// A sync no request waits for (the node's resync checkpoint, an activity-log eviction) took
    /// a writeback error from the flushes that come after it: handled as a failed flush.
    @Test func aFailedSyncOnATargetFailsTheUnacknowledgedRunsAndTheResyncsEnd() {
        var pair = Pair()
        let runs = pair.resyncRunsOnTheTarget(2)
        pair.completeSecondary(runs[0].tag)
        #expect(pair.targetFlushes == 1)
        var actions: [ReplicaCore.Action] = []
        pair.secondary.localSyncFailed(result: -5, into: &actions)
        pair.applySecondary(actions)
        #expect(pair.resyncAcksOnTheWire == [ReplicaResyncTests.id(runs[0]): 5], "written before the sync: its ack carries the error")
        pair.completeSecondary(.resyncTargetFlush)  // the flush after it succeeds: the error was taken
        pair.completeSecondary(runs[1].tag)
        #expect(pair.resyncAcksOnTheWire == [ReplicaResyncTests.id(runs[0]): 5, ReplicaResyncTests.id(runs[1]): 5], "still writing: fails too")
        #expect(pair.targetFlushes == 0 && pair.secondary.bitmap.outOfSyncBytes == 2 << 20, "the target's bits stay")
        pair.deliverToPrimary()
        #expect(pair.dropped.isEmpty && pair.primary.bitmap.outOfSyncBytes == 2 << 20, "the source keeps its bits and copies again")
        ReplicaCoreTests.driveResync(&pair)
        #expect(pair.primary.sync == .established)
        #expect(pair.secondary.disk == .failed, "not made UpToDate by the resync's end")
    }

    @Test func aFailedSyncDetachesAnUpToDateSecondaryAndAPrimary() {
        var pair = Pair()
        var actions: [ReplicaCore.Action] = []
        pair.secondary.localSyncFailed(result: -5, into: &actions)
        pair.applySecondary(actions)
        #expect(pair.secondary.disk == .failed && pair.secondary.localFlags.contains(.resyncTarget))
        pair.deliverToPrimary()
        #expect(pair.primary.peerDisk == .failed)

        var other = Pair()
        actions.removeAll()
        other.primary.localSyncFailed(result: -5, into: &actions)
        other.applyPrimary(actions)
        #expect(other.primary.disk == .failed && other.primary.readsFromPeer)
        // The client's next flush is the peer's answer: the local one cannot vouch for the data.
        other.flush(3)
        other.deliverToSecondary()
        other.completeSecondary(.peerFlush(3))
        other.deliverToPrimary()
        #expect(other.flushed[3] == 0 && other.primaryDisk.isEmpty, "a detached disk is not flushed")
    }

    /// Found by the simulator (`--witness --switchover --primary-disk-errors` 103288): the
    /// switchover's flush failed on the primary's disk, which stayed UpToDate through the
    /// demotion without the writes the flush covered; a power loss took them later, and no mark
    /// made the resync copy them. A failed client flush is handled as a failed write: with a
    /// full copy on the peer the disk detaches and the peer's flush answers; the node marks the
    /// activity log's extents, and a detached disk's marks do not hold up the demotion.
    @Test func aFailedClientFlushDetachesAPrimaryWhosePeerIsAFullCopy() {
        var pair = Pair()
        pair.writeDoneOnBoth(1, at: 0)
        pair.flush(100)
        pair.completePrimary(.clientFlush(100), -5)
        #expect(pair.primary.disk == .upToDate, "until the peer's flush made its copy durable, this disk may hold the only one")
        pair.deliverToSecondary()
        pair.completeSecondary(.peerFlush(100))
        pair.deliverToPrimary()
        #expect(pair.primary.disk == .failed && pair.primary.localFlags.contains(.resyncTarget))
        #expect(!pair.primary.localFlags.contains(.consistent))
        #expect(pair.flushed[100] == 0, "the peer's flush covers the data")
        pair.deliverToSecondary()
        #expect(pair.secondary.peerDisk == .failed)
        pair.primary.markOutOfSync(offset: 0, length: 1 << 20)  // as the node: the log's extents
        var actions: [ReplicaCore.Action] = []
        #expect(pair.primary.demote(into: &actions) == nil)
        pair.applyPrimary(actions)
        #expect(pair.primary.role == .secondary && pair.primary.bitmap.isDirty(offset: 0, length: 4096))
    }

    /// Without the peer's flush the local disk may hold the only durable copy: it stays, and
    /// the client hears of the error (seed 109210 lost a write when it detached at once: the
    /// peer had lost power with it in its cache).
    @Test func aFailedClientFlushKeepsTheDiskWhenThePeerFlushFails() {
        var pair = Pair()
        pair.writeDoneOnBoth(1, at: 0)
        pair.flushThroughBoth(100, peer: -5, local: -5)
        #expect(pair.primary.disk == .upToDate && pair.flushed[100] == -5)
    }

    /// Without a full copy on the peer the disk stays (the client hears of the error).
    @Test func aFailedClientFlushKeepsTheDiskOfAPrimaryWhosePeerIsNoFullCopy() {
        var pair = Pair()
        pair.resyncAfterWriteAlone(4096)
        #expect(pair.primary.sync == .syncSource)
        pair.flush(10)
        pair.completePrimary(.clientFlush(10), -5)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerFlush(10))
        pair.deliverToPrimary()
        #expect(pair.primary.disk == .upToDate && pair.flushed[10] == -5)
    }

    /// A resync source's peer is no full copy: detached, the primary would read a disk that no
    /// longer gets the writes. It keeps the disk, and its next flush reports the error the sync
    /// took (as the kernel would have), once.
    @Test func aFailedSyncOnAPrimaryWhosePeerIsNoFullCopyFailsItsNextFlush() {
        var pair = Pair()
        pair.resyncAfterWriteAlone(4096)
        #expect(pair.primary.sync == .syncSource)
        var actions: [ReplicaCore.Action] = []
        #expect(!pair.primary.localSyncFailed(result: -5, into: &actions))
        pair.applyPrimary(actions)
        #expect(pair.primary.disk == .upToDate && !pair.primary.readsFromPeer)
        for id in [UInt64(10), 11] {
            pair.flush(id)
            pair.completePrimary(.clientFlush(id))  // the disk's own flush succeeds: the error was taken
            pair.deliverToSecondary()
            pair.completeSecondary(.peerFlush(id))
            pair.deliverToPrimary()
        }
        #expect(pair.flushed == [10: -5, 11: 0], "the next flush reports it, the one after does not")
    }

    /// Found by the simulator (`--witness --barriers --failover`, seed 102100484): a secondary
    /// holding writes its peer lacked (it had written them as primary, crashed and restarted)
    /// became the resync source; the link reset before its flush before the first read came
    /// back failed, and it detached as an UpToDate secondary does. Its peer, the target, was
    /// Inconsistent already: after the restart that attaches a detached disk both were, and
    /// neither could be promoted or resynced. It keeps the disk now, as a primary whose peer is
    /// no full copy does, and the next connect resyncs the peer from it.
    @Test func aFailedSyncKeepsTheDiskOfASecondaryHoldingWritesItsPeerLacks() {
        var pair = Pair()
        pair.dropLink()
        pair.write(1, at: 0, 65536)
        pair.completePrimary(.client(1))
        var actions: [ReplicaCore.Action] = []
        #expect(pair.primary.demote(into: &actions) == nil)
        pair.applyPrimary(actions)
        pair.reconnect()
        // `primary` is the demoted node: a secondary, the source of what it wrote alone.
        #expect(pair.primary.role == .secondary && pair.primary.sync == .syncSource && pair.primaryDisk.map(\.tag) == [.resyncFlush])
        #expect(pair.secondary.disk == .inconsistent)
        pair.dropLink()
        pair.completePrimary(.resyncFlush, -5)
        #expect(pair.primary.disk == .upToDate && pair.primary.localFlags.contains(.consistent), "the only copy of those writes stays")
        #expect(!pair.primary.localFlags.contains(.resyncTarget))
        pair.reconnect(freshUUIDs: (0x7_0000, 0x8_0000))
        #expect(pair.primary.sync == .syncSource && pair.secondary.sync == .syncTarget)
        ReplicaCoreTests.driveResync(&pair)
        #expect(pair.primary.sync == .established && pair.secondary.disk == .upToDate)
        #expect(pair.secondary.uuids.current == pair.primary.uuids.current)

        // Without writes its peer lacks, an UpToDate secondary still detaches: the peer holds
        // every block, and the failed sync may have hidden a replicated write's loss.
        actions.removeAll()
        #expect(pair.primary.localSyncFailed(result: -5, into: &actions))
        #expect(pair.primary.disk == .failed)
    }

    /// Found by the simulator (`--failover --double-faults --primary-disk-errors
    /// --overlapping-writes`, seeds 195654 and 199606): as 102100484, but the secondary was a
    /// crashed primary restarted secondary (its hot extents marked, `crashedPrimary`), the
    /// source of them in the peer's own generation: no bitmap UUID. The link dropped just after
    /// the connect made the peer an Inconsistent target, so the source role had ended too when
    /// its flush before the first read came back failed, and it detached. After its restart
    /// both disks were Inconsistent and every promotion was refused. The source role a link
    /// loss ended counts now (`sourceWhenTheLinkDropped`): it keeps its disk.
    @Test func aFailedSyncKeepsTheDiskOfACrashedPrimaryItsPeerResyncsFrom() {
        var pair = Pair()
        pair.dropLink()
        // `primary` lost power as primary and restarted secondary: the attach marked its hot
        // extents and kept the crash as `crashedPrimary`. Same generation as the peer.
        var marked = pair.primary.bitmap
        marked.setRange(offset: 1 << 20, length: 65536)
        pair.primary = ReplicaCore(configuration: pair.primary.configuration, role: .secondary, disk: .upToDate,
                                   uuids: pair.primary.uuids, bitmap: marked, flags: [.consistent, .crashedPrimary])
        #expect(pair.primary.uuids == pair.secondary.uuids && pair.primary.uuids.bitmap == 0)
        var actions: [ReplicaCore.Action] = []
        pair.primary.linkUp(peer: Pair.hello(of: pair.secondary), freshUUID: 0x7000, into: &actions)
        pair.applyPrimary(actions)
        actions.removeAll()
        pair.secondary.linkUp(peer: Pair.hello(of: pair.primary, flags: PeerFlags.Hello.crashedPrimary), freshUUID: 0x8000, into: &actions)
        pair.applySecondary(actions)
        for _ in 0..<4 {
            pair.deliverToSecondary()
            pair.deliverToPrimary()
        }
        #expect(pair.primary.lastDecision?.decision == .becomeSource && pair.primary.lastDecision?.rule == .equalCurrents)
        #expect(pair.primary.sync == .syncSource && pair.primaryDisk.map(\.tag) == [.resyncFlush])
        #expect(pair.secondary.sync == .syncTarget && pair.secondary.disk == .inconsistent)
        pair.dropLink()
        #expect(pair.primary.sync == .established, "the source role ended with the link")
        pair.completePrimary(.resyncFlush, -5)
        #expect(pair.primary.disk == .upToDate && pair.primary.localFlags.contains(.consistent), "the peer's source stays")
        #expect(!pair.primary.localFlags.contains(.resyncTarget))
        pair.reconnect(freshUUIDs: (0x7_0000, 0x8_0000))
        #expect(pair.primary.sync == .syncSource && pair.secondary.sync == .syncTarget)
        ReplicaCoreTests.driveResync(&pair)
        #expect(pair.primary.sync == .established && pair.secondary.disk == .upToDate)
        #expect(!pair.primary.localFlags.contains(.crashedPrimary) && pair.primary.bitmap.setBitCount == 0)

        // Its hot extents copied, it is an UpToDate secondary of the peer's generation like any
        // other: a failed sync detaches it.
        actions.removeAll()
        #expect(pair.primary.localSyncFailed(result: -5, into: &actions))
        #expect(pair.primary.disk == .failed)
    }

    /// The same window by another road: a primary lost its link with a write the peer had not
    /// flushed (the transfer log marked it) and demoted. The next connect (same generation,
    /// `noSync`) makes it the source of its marks between secondaries, no bitmap UUID and no
    /// crash flag to say so; the link drops and its flush before the first read fails.
    @Test func aFailedSyncKeepsTheDiskOfADemotedSecondaryItsPeerResyncsFrom() {
        var pair = Pair()
        pair.write(1, at: 0, 65536)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1))
        pair.deliverToPrimary()
        pair.completePrimary(.client(1))
        #expect(pair.completed[1] == 0)
        pair.dropLink()
        #expect(pair.primary.bitmap.setBitCount > 0 && pair.primary.uuids.bitmap == 0, "marked, and no generation started")
        var actions: [ReplicaCore.Action] = []
        #expect(pair.primary.demote(into: &actions) == nil)
        pair.applyPrimary(actions)
        pair.reconnect()
        #expect(pair.primary.lastDecision?.decision == .noSync)
        #expect(pair.primary.sync == .syncSource && pair.primaryDisk.map(\.tag) == [.resyncFlush])
        #expect(pair.secondary.sync == .syncTarget && pair.secondary.disk == .inconsistent)
        pair.dropLink()
        pair.completePrimary(.resyncFlush, -5)
        #expect(pair.primary.disk == .upToDate && !pair.primary.localFlags.contains(.resyncTarget), "the peer's source stays")
        pair.reconnect(freshUUIDs: (0x7_0000, 0x8_0000))
        #expect(pair.primary.sync == .syncSource && pair.secondary.sync == .syncTarget)
        ReplicaCoreTests.driveResync(&pair)
        #expect(pair.primary.sync == .established && pair.secondary.disk == .upToDate && pair.primary.bitmap.setBitCount == 0)
    }
}

/// Limits.peerRequestsPendingMax: a burst of requests past it (8,200 flushes trapped the node
/// once, out of operation slots) is a protocol error in the core; the node stops reading first.
@Suite struct ReplicaPeerBoundsTests {
    static func submits(_ actions: [ReplicaCore.Action]) -> Int {
        actions.filter { if case .submitLocal = $0 { true } else { false } }.count
    }

    @Test(arguments: ["flush", "trim", "zeroes", "data", "barrier"])
    func requestsPastTheBoundAreProtocolErrors(kind: String) {
        var secondary = Pair().secondary
        let bound = Limits.peerRequestsPendingMax
        var actions: [ReplicaCore.Action] = []
        // One write that never completes keeps every later flush and barrier waiting.
        secondary.peerMessage(.trim(PeerWrite(id: 1 << 40, offset: 0, length: 4096, epoch: 1)), into: &actions)
        for i in 0..<(bound + 10) {
            let id = UInt64(i)
            let message: PeerMessage = switch kind {
            case "flush": .flush(id: id)
            case "trim": .trim(PeerWrite(id: id, offset: UInt64(i % 64) * 4096, length: 4096, epoch: 1))
            case "zeroes": .zeroes(PeerWrite(id: id, offset: UInt64(i % 64) * 4096, length: 4096, epoch: 1))
            case "data": .data(PeerWrite(id: id, offset: UInt64(i % 64) * 4096, length: 4096, epoch: 1), payload: [])
            default: .barrier(epoch: id)
            }
            secondary.peerMessage(message, into: &actions)
        }
        #expect(secondary.peerRequestsPending == bound)
        #expect(!secondary.acceptsPeerRequests)
        let refused = actions.filter(ReplicaPeerInputTests.isProtocolError)
        #expect(refused.count == 11, "every request past the bound is refused: \(refused.count)")
        #expect(Self.submits(actions) <= bound, "no more local operations than the bound")
    }

    /// Flushes with no write before them go straight to the disk: they count until they complete.
    @Test func flushesOnTheDiskCountUntilTheyComplete() {
        var secondary = Pair().secondary
        var actions: [ReplicaCore.Action] = []
        for i in 0..<Limits.peerRequestsPendingMax {
            secondary.peerMessage(.flush(id: UInt64(i)), into: &actions)
        }
        #expect(Self.submits(actions) == Limits.peerRequestsPendingMax)
        #expect(!secondary.acceptsPeerRequests)
        actions.removeAll()
        secondary.peerMessage(.flush(id: 1 << 50), into: &actions)
        #expect(actions.count == 1 && actions.allSatisfy(ReplicaPeerInputTests.isProtocolError))
        actions.removeAll()
        secondary.localCompleted(.peerFlush(0), result: 0, into: &actions)
        #expect(secondary.acceptsPeerRequests, "a completion frees room")
        #expect(actions == [.send(.flushAck(id: 0, result: 0))])
    }
}
