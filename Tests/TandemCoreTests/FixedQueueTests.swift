import Testing
import TandemCore

@Suite struct FixedQueueTests {
    @Test func fifoAcrossWrapAround() {
        var q = FixedQueue<Int>(capacity: 3)
        var expected: [Int] = []
        var got: [Int] = []
        for i in 0..<10 {
            q.push(i)
            expected.append(i)
            if q.isFull || i % 2 == 1 { got.append(q.pop()!) }
        }
        while let x = q.pop() { got.append(x) }
        #expect(got == expected)
        #expect(q.isEmpty)
    }

    @Test func indexingFromHead() {
        var q = FixedQueue<String>(capacity: 4)
        for s in ["a", "b", "c"] { q.push(s) }
        q.pop()
        q.push("d")
        q.push("e")
        #expect(q.count == 4)
        #expect([q[0], q[1], q[2], q[3]] == ["b", "c", "d", "e"])
        #expect(q.first == "b")
    }

    @Test func theNewestComesOffTheBackAcrossWrapAround() {
        var q = FixedQueue<Int>(capacity: 3)
        q.push(1); q.push(2); q.pop(); q.push(3); q.push(4)  // storage wraps: [4, 2→gone, 3]
        #expect(q.last == 4 && q.first == 2)
        #expect(q.popLast() == 4 && q.last == 3 && q.count == 2)
        q.push(5)
        #expect(q.pop() == 2 && q.pop() == 3 && q.popLast() == 5 && q.popLast() == nil && q.last == nil)
    }

    @Test func limitsRelationsHold() {
        Limits.checkRelations()
        #expect(Limits.diskQueueDepthMax >= Limits.nbdRequestsInFlightMax * Limits.nbdConnectionsMax)
    }
}
