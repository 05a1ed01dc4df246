import Testing
import TandemCore

/// The changed-block tracker against a model: for every barrier, the set of granules written
/// since it.
struct ChangeTrackerTests {
    @Test func granulesGrowSoTheStampsFitTheBound() {
        let tib: UInt64 = 1 << 40
        let tracker = ChangeTracker(deviceBytes: tib, granuleBytesMin: 64 << 10)
        #expect(tracker.granuleBytes == 128 << 10)
        #expect(tracker.granuleCount * 2 <= 16 << 20)
        #expect(tracker.memoryBytes == 0, "nothing is allocated before the first barrier")
        let small = ChangeTracker(deviceBytes: 64 << 20, granuleBytesMin: 4096)
        #expect(small.granuleBytes == 4096 && small.granuleCount == 16384)
        let odd = ChangeTracker(deviceBytes: (64 << 20) + 4096, granuleBytesMin: 64 << 10)
        #expect(odd.granuleCount == 1025, "the last granule may be partial")
    }

    @Test func matchesAModelThroughRenumbering() {
        // The model: when each granule was last written and when each barrier was made (steps).
        var rng = SplitMix64(seed: 7)
        let device: UInt64 = 1 << 20
        var tracker = ChangeTracker(deviceBytes: device, granuleBytesMin: 4096)
        let granules = tracker.granuleCount
        var lastWritten = [Int](repeating: -1, count: granules)
        var made: [(id: UInt64, step: Int)] = []
        var nextID: UInt64 = 1
        var runs: [(length: UInt32, flags: UInt32)] = []
        func check() {
            #expect(tracker.barrierIDs == made.map(\.id))
            for (id, step) in made {
                for g in 0..<granules where tracker.changed(granule: g, since: id) != (lastWritten[g] > step) {
                    Issue.record("granule \(g) since barrier \(id)")
                }
                #expect(tracker.changedRuns(since: id, offset: 0, length: UInt32(device), runsMax: 1024, into: &runs))
                var at = 0
                for run in runs {
                    #expect(run.length > 0 && run.length % 4096 == 0)
                    for g in at / 4096..<(at + Int(run.length)) / 4096 where (run.flags == 1) != (lastWritten[g] > step) {
                        Issue.record("run at granule \(g) since barrier \(id)")
                    }
                    at += Int(run.length)
                }
                #expect(at == Int(device))
            }
        }
        // Enough barriers to pass the u16 sequences twice (each pass renumbers); the tracker
        // keeps the newest 256.
        for step in 0..<150_000 {
            if rng.below(20) != 0 {
                tracker.barrierCreated(nextID)
                made.append((nextID, step))
                if made.count > Limits.barriersRetainedMax { made.removeFirst() }
                nextID += UInt64(1 + rng.below(5))
            } else {
                let offset = UInt64(rng.below(Int(device) - 1))
                let length = UInt64(1 + rng.below(min(3 * 4096, Int(device - offset))))
                tracker.written(offset: offset, length: length)
                for g in Int(offset / 4096)...Int((offset + length - 1) / 4096) { lastWritten[g] = step }
            }
            if step % 24_989 == 0 { check() }
        }
        check()
        #expect(tracker.changed(granule: 0, since: made[0].id - 1) == nil, "a forgotten barrier is not known")
    }

    @Test func runsStartAtTheOffsetMergeAndStopAtTheLimit() {
        var tracker = ChangeTracker(deviceBytes: 1 << 20, granuleBytesMin: 64 << 10)
        var runs: [(length: UInt32, flags: UInt32)] = []
        #expect(!tracker.changedRuns(since: 1, offset: 0, length: 4096, runsMax: 1, into: &runs), "no barrier yet")
        tracker.written(offset: 0, length: 1 << 20)  // before any barrier: not a change
        tracker.barrierCreated(5)
        tracker.written(offset: 70_000, length: 10)  // granule 1
        tracker.written(offset: 3 << 16, length: 2 << 16)  // granules 3, 4
        #expect(tracker.changedRuns(since: 5, offset: 1000, length: 6 << 16, runsMax: 16, into: &runs))
        let g: UInt32 = 1 << 16
        #expect(runs.map(\.length) == [g - 1000, g, g, 2 * g, g + 1000])
        #expect(runs.map(\.flags) == [0, 1, 0, 1, 0], "the clean granules 5 and 6 merge")
        #expect(tracker.changedRuns(since: 5, offset: 1000, length: 6 << 16, runsMax: 2, into: &runs))
        #expect(runs.map(\.length) == [g - 1000, g])
        tracker.barrierCreated(9)
        #expect(tracker.changedRuns(since: 9, offset: 0, length: 1 << 20, runsMax: 1, into: &runs))
        #expect(runs.count == 1 && runs[0].length == 16 * g && runs[0].flags == 0, "nothing written since 9")
        tracker.writtenAll()
        #expect(tracker.changedRuns(since: 9, offset: 0, length: 1 << 20, runsMax: 4, into: &runs))
        #expect(runs.count == 1 && runs[0].flags == 1)
        tracker.forget(5)
        #expect(tracker.barrierIDs == [9] && !tracker.tracks(5))
    }
}
