import Testing
@testable import TandemCore

/// Point-in-time barriers in the replication stream: a consistent cut on the secondary.
@Suite struct ReplicaBarrierTests {
    @Test func theSecondaryRecordsABarrierAfterEarlierWritesAndBeforeLaterOnes() {
        var pair = Pair()
        pair.write(1, at: 0)
        var actions: [ReplicaCore.Action] = []
        let info = BarrierInfo(id: 7, createdUnixSeconds: 100, label: "b")
        #expect(pair.primary.createBarrier(info, into: &actions))
        pair.applyPrimary(actions)
        pair.write(2, at: 0)  // overlaps write 1: must land after the barrier
        pair.write(3, at: 1 << 20)
        pair.deliverToSecondary()
        #expect(pair.secondaryDisk.map(\.tag) == [.peerWrite(1)], "writes after the barrier wait for it")
        // Write 1 done: now the barrier is recorded, then the later writes go.
        guard let i = pair.secondaryDisk.firstIndex(where: { $0.tag == .peerWrite(1) }) else { return }
        pair.secondaryDisk.remove(at: i)
        actions.removeAll()
        pair.secondary.localCompleted(.peerWrite(1), result: 0, into: &actions)
        #expect(actions.contains(.recordBarrier(info)))
        #expect(!actions.contains { if case .submitLocal = $0 { true } else { false } })
        actions.removeAll()
        pair.secondary.barrierRecorded(into: &actions)
        let submitted = actions.compactMap { if case .submitLocal(let io) = $0 { io.tag } else { nil } }
        #expect(submitted == [.peerWrite(2), .peerWrite(3)])
    }

    @Test func aBarrierNeedsAnUpToDateConnectedSecondary() {
        var pair = Pair()
        pair.dropLink()
        var actions: [ReplicaCore.Action] = []
        #expect(!pair.primary.createBarrier(BarrierInfo(id: 1, createdUnixSeconds: 1), into: &actions))
        #expect(actions.isEmpty)
        var other = Pair()
        other.secondary.peerMessage(.snapshot(BarrierInfo(id: 1, createdUnixSeconds: 1)), into: &actions)
        #expect(actions.contains(.recordBarrier(BarrierInfo(id: 1, createdUnixSeconds: 1))), "nothing in flight: recorded at once")
        actions.removeAll()
        other.primary.peerMessage(.snapshot(BarrierInfo(id: 2, createdUnixSeconds: 1)), into: &actions)
        #expect(actions.contains { if case .dropLink(.protocolError) = $0 { true } else { false } })
    }

    /// A secondary whose disk failed a replicated write lacks it: a barrier after it would not be
    /// the image it names, so the secondary keeps none (found by `tandem sim --barriers`).
    @Test func aSecondaryThatFailedAWriteKeepsNoBarrier() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.deliverToSecondary()
        pair.completeSecondary(.peerWrite(1), -5)
        var actions: [ReplicaCore.Action] = []
        let info = BarrierInfo(id: 3, createdUnixSeconds: 1)
        pair.secondary.peerMessage(.snapshot(info), into: &actions)
        #expect(!actions.contains(.recordBarrier(info)))
        // A write after it is not held for a barrier that will never be recorded.
        pair.applySecondary(actions)
        pair.write(2, at: 1 << 20)
        pair.deliverToSecondary()
        #expect(pair.secondaryDisk.contains { $0.tag == .peerWrite(2) })
    }

    /// A write of an earlier link that completes after the next link is up is not acknowledged
    /// on it: its primary never sent it there (and after a restart may reuse the id).
    @Test func writesOfAnEarlierLinkAreNotAcknowledgedOnTheNext() {
        var pair = Pair()
        pair.write(1, at: 0)
        pair.deliverToSecondary()
        pair.dropLink()
        pair.reconnect()
        pair.toPrimary.removeAll()
        pair.completeSecondary(.peerWrite(1))
        #expect(!pair.toPrimary.contains { if case .writeAck = $0 { true } else { false } })
        #expect(pair.dropped.allSatisfy { if case .protocolError = $0 { false } else { true } })
    }
}
