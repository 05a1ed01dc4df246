import Testing
import TandemCore

@Suite struct DirtyBitmapTests {
    let g: UInt64 = 4096

    @Test func geometry() {
        let one = DirtyBitmap(deviceBytes: 1)
        #expect(one.bitCount == 1 && one.pageCount == 1)
        let exact = DirtyBitmap(deviceBytes: 32768 * 4096)
        #expect(exact.bitCount == 32768 && exact.pageCount == 1)
        let over = DirtyBitmap(deviceBytes: 32768 * 4096 + 1)
        #expect(over.bitCount == 32769 && over.pageCount == 2)
        let coarse = DirtyBitmap(deviceBytes: 1 << 30, granularityBytes: 1 << 20)
        #expect(coarse.bitCount == 1024 && coarse.pageCount == 1)
        #expect(DirtyBitmap.pageCount(deviceBytes: 1 << 40, granularityBytes: 4096) == 8192)
        #expect(DirtyBitmap.bitsPerPage == 32768 && DirtyBitmap.wordsPerPage == 512 && DirtyBitmap.pageBytes == 4096)
    }

    @Test func partialGranulesSetTheirBit() {
        var b = DirtyBitmap(deviceBytes: 100 * g)
        #expect(b.setRange(offset: 100, length: 1) == 1)
        #expect(b.isSet(bit: 0) && !b.isSet(bit: 1))
        #expect(b.setRange(offset: 4095, length: 2) == 1, "bit 0 already set, bit 1 new")
        #expect(b.isSet(bit: 1) && !b.isSet(bit: 2))
        #expect(b.setRange(offset: 0, length: 2 * g) == 0)
        #expect(b.setRange(offset: 10 * g, length: 0) == 0)
        #expect(b.setBitCount == 2)
        #expect(b.isDirty(offset: 8191, length: 1) && !b.isDirty(offset: 8192, length: 4096))
        #expect(!b.isDirty(offset: 8192, length: 0))
        b.checkInvariants()
    }

    @Test func clearingTouchesOnlyWholeGranules() {
        var b = DirtyBitmap(deviceBytes: 10 * g)
        b.setAll()
        #expect(b.setBitCount == 10)
        #expect(b.clearRange(offset: 1, length: 2 * g) == 1, "granule 0 partial, 1 whole, 2 partial")
        #expect(b.isSet(bit: 0) && !b.isSet(bit: 1) && b.isSet(bit: 2))
        #expect(b.clearRange(offset: 5 * g + 1, length: g - 2) == 0)
        #expect(b.clearRange(offset: 0, length: 10 * g) == 9)
        #expect(b.setBitCount == 0)
        b.checkInvariants()
    }

    @Test func partialLastGranule() {
        // 3.5 granules: the last covers 2048 bytes.
        var b = DirtyBitmap(deviceBytes: 3 * g + 2048)
        #expect(b.bitCount == 4)
        b.setRange(offset: 3 * g + 2047, length: 1)
        #expect(b.outOfSyncBytes == 2048)
        b.setRange(offset: 0, length: 1)
        #expect(b.outOfSyncBytes == 4096 + 2048)
        // A range reaching the device end clears the partial granule it covers to the end.
        #expect(b.clearRange(offset: 3 * g, length: 2048) == 1)
        #expect(b.outOfSyncBytes == 4096)
        #expect(b.byteRange(bits: 2..<4) == (2 * g)..<(3 * g + 2048))
        #expect(b.wholeBits(offset: 3 * g + 1, length: 2047).isEmpty)
        b.setAll()
        #expect(b.outOfSyncBytes == b.deviceBytes)
        b.checkInvariants()
    }

    @Test func bitsAndRuns() {
        var b = DirtyBitmap(deviceBytes: 3 * 32768 * g)
        #expect(b.nextSetBit(from: 0) == nil)
        #expect(b.firstRun(from: 0, maxBits: 10) == nil)
        b.setBits(63..<130)
        b.setBit(40000)
        b.setBits(98000..<98304)
        #expect(b.nextSetBit(from: 0) == 63)
        #expect(b.nextSetBit(from: 129) == 129)
        #expect(b.nextSetBit(from: 130) == 40000)
        #expect(b.nextSetBit(from: 40001) == 98000)
        #expect(b.nextSetBit(from: 98304) == nil)
        #expect(b.firstRun(from: 0, maxBits: 1000) == 63..<130)
        #expect(b.firstRun(from: 0, maxBits: 10) == 63..<73)
        #expect(b.firstRun(from: 100, maxBits: 1000) == 100..<130)
        #expect(b.firstRun(from: 130, maxBits: 1000) == 40000..<40001)
        #expect(b.firstRun(from: 40001, maxBits: 1000) == 98000..<98304, "a run that ends at the device end")
        #expect(b.clearBit(40000) && !b.clearBit(40000))
        #expect(b.setBitCount == 67 + 304)
        b.checkInvariants()
    }

    @Test func mergeIsOr() {
        var a = DirtyBitmap(deviceBytes: 70000 * g)
        var b = DirtyBitmap(deviceBytes: 70000 * g)
        a.setBits(0..<100)
        b.setBits(50..<150)
        b.setBit(69999)
        a.markAllPagesPersisted()
        #expect(a.merge(b) == 51)
        #expect(a.setBitCount == 151)
        #expect(a.firstRun(from: 0, maxBits: 1000) == 0..<150)
        #expect(a.isSet(bit: 69999))
        #expect(Array(a.dirtyPages) == [0, 2])
        #expect(a.merge(b) == 0)
        a.checkInvariants()
    }

    @Test func pageImageIsLittleEndianWords() {
        var b = DirtyBitmap(deviceBytes: 40000 * g)
        b.setBit(0)
        b.setBit(9)
        b.setBit(64 + 63)
        b.setBit(32768 + 8)
        b.withPageBytes(0) { page in
            #expect(page.count == 4096)
            #expect(page[0] == 0x01 && page[1] == 0x02, "bits 0 and 9 in the first two bytes")
            #expect(page[15] == 0x80, "bit 63 of word 1 is the top bit of byte 15")
            #expect(page[2..<15].allSatisfy { $0 == 0 })
        }
        b.withPageBytes(1) { page in
            #expect(page[1] == 0x01)
        }
    }

    @Test func pagesRoundTripAndTailBitsAreIgnored() {
        var rng = MetadataTestRNG(seed: 3)
        let device: UInt64 = (2 * 32768 + 1000) * g - 100
        var a = DirtyBitmap(deviceBytes: device)
        for _ in 0..<300 { a.setBit(rng.below(a.bitCount)) }
        var b = DirtyBitmap(deviceBytes: device)
        b.setBits(0..<5000)
        for page in 0..<a.pageCount {
            a.withPageBytes(page) { b.loadPage(page, from: $0) }
        }
        #expect(b == a)
        #expect(b.dirtyPageCount == 0, "loaded pages match the disk")
        b.checkInvariants()

        // A disk page with bits past the device end: they are dropped, not counted.
        var image = [UInt8](repeating: 0xFF, count: 4096)
        image.withUnsafeBytes { b.loadPage(2, from: $0) }
        #expect(b.setBitCount == a.setBitCount - UInt64((2 * 32768..<b.bitCount).filter { a.isSet(bit: $0) }.count) + 1000)
        b.checkInvariants()
        image = [UInt8](repeating: 0, count: 4096)
        image.withUnsafeBytes { b.loadPage(2, from: $0) }
        #expect(b.nextSetBit(from: 2 * 32768) == nil)
        b.checkInvariants()
    }

    @Test func dirtyPageTracking() {
        var b = DirtyBitmap(deviceBytes: 5 * 32768 * g)
        #expect(b.dirtyPageCount == 0 && b.dirtyPages.isEmpty)
        b.setRange(offset: 0, length: 1)
        b.setRange(offset: 3 * 32768 * g, length: 32768 * g + 1)  // pages 3 and 4
        #expect(Array(b.dirtyPages) == [0, 3, 4] && b.dirtyPageCount == 3)
        #expect(b.nextDirtyPage(from: 1) == 3 && b.nextDirtyPage(from: 5) == nil)
        #expect(b.pages(offset: 3 * 32768 * g - 1, length: 2) == 2..<4)
        // Setting bits already set changes nothing, so the page stays clean.
        b.markPagesPersisted(0..<5)
        b.setRange(offset: 0, length: 1)
        #expect(b.dirtyPageCount == 0)
        // A bit set after the page was copied for writing marks it dirty again.
        b.markPagePersisted(1)
        b.setBit(32768 + 5)
        #expect(b.isPageDirty(1))
        b.clearBit(32768 + 5)
        #expect(b.dirtyPages.contains(1) && !b.dirtyPages.contains(2) && !b.dirtyPages.contains(99))
        b.markPageDirty(2)
        b.markPageDirty(2)
        #expect(b.dirtyPageCount == 2)
        b.markAllPagesPersisted()
        #expect(b.nextDirtyPage(from: 0) == nil)
        b.setAll()
        #expect(Array(b.dirtyPages) == [0, 1, 2, 4], "page 3 was already all set")
        b.checkInvariants()
    }

    /// Random operations against a plain array of flags: counts, scans, runs and dirty pages.
    @Test(arguments: [4096, 65536])
    func randomOperationsMatchAModel(granularity: Int) {
        var rng = MetadataTestRNG(seed: UInt64(granularity))
        let gran = UInt64(granularity)
        let bits = 2 * 32768 + 777
        let device = UInt64(bits) * gran - gran / 2  // a partial last granule
        var b = DirtyBitmap(deviceBytes: device, granularityBytes: granularity)
        var model = [Bool](repeating: false, count: bits)
        var dirty = Set<Int>()
        func mark(_ range: Range<Int>, _ value: Bool) -> UInt64 {
            var changed: UInt64 = 0
            for i in range where model[i] != value {
                model[i] = value
                dirty.insert(i / 32768)
                changed += 1
            }
            return changed
        }
        for step in 0..<2000 {
            let offset = UInt64(rng.below(Int(device)))
            let length = UInt64(rng.below(Int(min(device - offset, 3 * 32768 * gran / 2)))) + 1
            switch rng.below(6) {
            case 0, 1:
                let first = Int(offset / gran), last = Int((offset + length - 1) / gran)
                #expect(b.setRange(offset: offset, length: length) == mark(first..<(last + 1), true))
            case 2:
                let first = Int((offset + gran - 1) / gran)
                let end = offset + length == device ? bits : Int((offset + length) / gran)
                #expect(b.clearRange(offset: offset, length: length) == (first < end ? mark(first..<end, false) : 0))
            case 3:
                let lo = rng.below(bits), hi = min(bits, lo + rng.below(100))
                #expect(b.clearBits(lo..<hi) == mark(lo..<hi, false))
            case 4:
                var other = DirtyBitmap(deviceBytes: device, granularityBytes: granularity)
                let lo = rng.below(bits), hi = min(bits, lo + rng.below(300))
                other.setBits(lo..<hi)
                let before = model
                _ = mark(lo..<hi, true)
                let added = zip(before, model).filter { $0 != $1 }.count
                #expect(b.merge(other) == UInt64(added))
            default:
                for page in dirty { b.markPagePersisted(page) }
                dirty.removeAll()
            }
            #expect(b.setBitCount == UInt64(model.filter { $0 }.count))
            #expect(Set(b.dirtyPages) == dirty)
            if step % 50 == 0 {
                b.checkInvariants()
                var from = rng.below(bits)
                for _ in 0..<20 {
                    let expected = model[from...].firstIndex(of: true)
                    #expect(b.nextSetBit(from: from) == expected)
                    guard let start = expected else { break }
                    let maxBits = 1 + rng.below(5000)
                    let run = b.firstRun(from: from, maxBits: maxBits)!
                    let end = model[start...].firstIndex(of: false) ?? bits
                    #expect(run == start..<min(end, start + maxBits))
                    from = run.upperBound
                    if from >= bits { break }
                }
                let checkOffset = UInt64(rng.below(Int(device)))
                let checkLength = UInt64(rng.below(Int(min(device - checkOffset, 64 * gran)))) + 1
                let touched = Int(checkOffset / gran)...Int((checkOffset + checkLength - 1) / gran)
                #expect(b.isDirty(offset: checkOffset, length: checkLength) == touched.contains { model[$0] })
            }
        }
        let lastSet = model[bits - 1]
        #expect(b.outOfSyncBytes == UInt64(model.filter { $0 }.count) * gran - (lastSet ? gran / 2 : 0))
    }

    @Test func outOfRangeIsABug() async {
        await #expect(processExitsWith: .failure) {
            var b = DirtyBitmap(deviceBytes: 4096 * 10)
            b.setRange(offset: 4096 * 10 - 1, length: 2)
        }
        await #expect(processExitsWith: .failure) {
            _ = DirtyBitmap(deviceBytes: 4096, granularityBytes: 4096 * 3)
        }
    }
}
