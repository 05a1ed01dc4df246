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
}
