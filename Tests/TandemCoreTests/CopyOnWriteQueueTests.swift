import Testing
import TandemCore

/// Copy-on-write ordering with random completions: no write reaches the device before every
/// chunk it touches is durably saved, no chunk is read after a write to it was released or read
/// twice, reads cover runs, syncs are grouped, and everything drains.
struct CopyOnWriteQueueTests {
    @Test func theExampleInTheDocumentation() {
        var q = CopyOnWriteQueue(readChunksMax: 16)
        var actions: [CopyOnWriteQueue.Action] = []
        var saved: Set<UInt64> = []
        q.write(ticket: 1, chunks: 3..<4, needsSave: { !saved.contains($0) }, into: &actions)
        #expect(actions == [.read(id: 1, firstChunk: 3, chunkCount: 1)])
        actions.removeAll()
        q.write(ticket: 2, chunks: 3..<4, needsSave: { !saved.contains($0) }, into: &actions)
        #expect(actions.isEmpty, "B waits for A's read")
        saved.insert(3)
        q.readDone(id: 1, appendedRecords: true, into: &actions)
        #expect(actions == [.sync(through: 1)])
        actions.removeAll()
        q.write(ticket: 3, chunks: 9..<10, needsSave: { !saved.contains($0) }, into: &actions)
        #expect(actions == [.read(id: 2, firstChunk: 9, chunkCount: 1)])
        actions.removeAll()
        saved.insert(9)
        q.readDone(id: 2, appendedRecords: true, into: &actions)
        #expect(actions.isEmpty, "the next sync waits for the running one")
        q.syncDone(through: 1, into: &actions)
        #expect(actions == [.release(ticket: 1), .release(ticket: 2), .sync(through: 2)])
        actions.removeAll()
        q.write(ticket: 4, chunks: 3..<4, needsSave: { !saved.contains($0) }, into: &actions)
        #expect(actions == [.release(ticket: 4)], "a chunk saved and durable: no wait")
        actions.removeAll()
        #expect(!q.isIdle)
        q.syncDone(through: 2, into: &actions)
        #expect(actions == [.release(ticket: 3)])
        #expect(q.isIdle)
    }

    @Test func oneReadPerRunOfChunksUpToTheLimit() {
        var q = CopyOnWriteQueue(readChunksMax: 4)
        var actions: [CopyOnWriteQueue.Action] = []
        let saved: Set<UInt64> = [12]
        q.write(ticket: 1, chunks: 10..<21, needsSave: { !saved.contains($0) }, into: &actions)
        #expect(actions == [.read(id: 1, firstChunk: 10, chunkCount: 2), .read(id: 2, firstChunk: 13, chunkCount: 4),
                            .read(id: 3, firstChunk: 17, chunkCount: 4)])
        actions.removeAll()
        q.write(ticket: 2, chunks: 16..<23, needsSave: { !saved.contains($0) }, into: &actions)
        #expect(actions == [.read(id: 4, firstChunk: 21, chunkCount: 2)], "chunks being read are not read again")
        actions.removeAll()
        for id: UInt32 in [3, 1, 4, 2] { q.readDone(id: id, appendedRecords: true, into: &actions) }
        #expect(actions == [.sync(through: 1)])
        actions.removeAll()
        q.syncDone(through: 1, into: &actions)
        #expect(actions == [.sync(through: 4)], "a write waits for the sync after its last read")
        actions.removeAll()
        q.syncDone(through: 4, into: &actions)
        #expect(actions == [.release(ticket: 1), .release(ticket: 2)])
        #expect(q.isIdle)
    }

    @Test func randomCompletionsKeepTheOrder() {
        for seed in UInt64(1)...40 {
            var rng = SplitMix64(seed: seed)
            var q = CopyOnWriteQueue(readChunksMax: 1 + rng.below(6))
            var actions: [CopyOnWriteQueue.Action] = []
            let chunkCount = 64
            var appended: Set<UInt64> = []  // records in the store (needsSave is false)
            var durable: Set<UInt64> = []
            var released: Set<UInt64> = []  // chunks some released write touched
            var reads: [UInt32: Range<UInt64>] = [:]
            var reading: Set<UInt64> = []
            var syncs: [UInt64] = []
            var appendsDone: UInt64 = 0
            var appendedAt: [UInt64: UInt64] = [:]
            var writes: [UInt64: Range<UInt64>] = [:]
            var nextTicket: UInt64 = 1
            func handle() {
                for action in actions {
                    switch action {
                    case .read(let id, let first, let count):
                        let run = first..<first + UInt64(count)
                        #expect(count <= q.readChunksMax)
                        for c in run {
                            #expect(!reading.contains(c) && !appended.contains(c), "chunk \(c) read twice")
                            #expect(!released.contains(c), "chunk \(c) read after a write to it reached the device")
                        }
                        reading.formUnion(run)
                        reads[id] = run
                    case .sync(let through):
                        #expect(syncs.isEmpty, "one sync at a time")
                        #expect(through == appendsDone)
                        syncs.append(through)
                    case .release(let ticket):
                        let chunks = writes.removeValue(forKey: ticket)!
                        for c in chunks { #expect(durable.contains(c), "write \(ticket) released before chunk \(c) was durable") }
                        released.formUnion(chunks)
                    }
                }
                actions.removeAll()
            }
            for _ in 0..<400 {
                switch rng.below(4) {
                case 0, 1:
                    let first = UInt64(rng.below(chunkCount))
                    let chunks = first..<min(first + UInt64(1 + rng.below(8)), UInt64(chunkCount))
                    writes[nextTicket] = chunks
                    q.write(ticket: nextTicket, chunks: chunks, needsSave: { !appended.contains($0) }, into: &actions)
                    nextTicket += 1
                case 2 where !reads.isEmpty:
                    let id = reads.keys.sorted()[rng.below(reads.count)]
                    let run = reads.removeValue(forKey: id)!
                    reading.subtract(run)
                    appended.formUnion(run)
                    appendsDone += 1
                    for c in run { appendedAt[c] = appendsDone }
                    q.readDone(id: id, appendedRecords: true, into: &actions)
                case 3 where !syncs.isEmpty:
                    let through = syncs.removeFirst()
                    for (c, at) in appendedAt where at <= through { durable.insert(c) }
                    q.syncDone(through: through, into: &actions)
                default:
                    break
                }
                handle()
            }
            // Drain.
            while !reads.isEmpty || !syncs.isEmpty {
                if let id = reads.keys.min() {
                    let run = reads.removeValue(forKey: id)!
                    reading.subtract(run)
                    appended.formUnion(run)
                    appendsDone += 1
                    for c in run { appendedAt[c] = appendsDone }
                    q.readDone(id: id, appendedRecords: true, into: &actions)
                } else {
                    let through = syncs.removeFirst()
                    for (c, at) in appendedAt where at <= through { durable.insert(c) }
                    q.syncDone(through: through, into: &actions)
                }
                handle()
            }
            #expect(writes.isEmpty, "seed \(seed): writes never released: \(writes.keys.sorted())")
            #expect(q.isIdle)
        }
    }
}
