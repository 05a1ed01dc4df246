/// One bit per granule of the device: set means "this granule may differ from the peer" (out of
/// sync), clear means "both sides hold the same bytes here". A bitmap resync copies exactly the
/// set granules.
///
/// Bits are set in memory when a write does not reach the peer (disconnected, or the peer failed
/// it), or when the peer's bitmap is merged in on connect; they are cleared as resync copies
/// granules. The bitmap reaches disk in 4 KiB pages: the node writes the pages `dirtyPages` names.
/// Which pages must be on disk before what is the activity log's business (see `ActivityLog` and
/// Protocol/metadata.md "Write ordering").
///
/// A write that touches any byte of a granule sets that granule's bit: a partial granule differs
/// as much as a whole one. Clearing is the opposite: only granules a range covers whole are
/// cleared, so bytes outside the range are never declared in sync by accident. The last granule
/// may be partial (a device size that is not a multiple of the granularity); it counts as whole
/// when it ends at the device end.
///
/// On disk, page `p` holds 64-bit words `512p ..< 512(p + 1)`, each little-endian; bit `i` of word
/// `w` (value `1 << i`) is granule `64w + i`. Bits past the last granule are zero.
///
/// `setRange`, `clearRange` and the queries allocate nothing and never recount: `setBitCount`
/// is kept up to date by every change.
public struct DirtyBitmap: Equatable, Sendable {
    /// Bytes of one on-disk page.
    public static let pageBytes = Limits.metadataBlockBytes
    /// 64-bit words per page.
    public static let wordsPerPage = pageBytes / 8
    /// Granules (bits) per page.
    public static let bitsPerPage = pageBytes * 8

    /// Bytes of the device the bitmap covers.
    public let deviceBytes: UInt64
    /// Bytes one bit covers, a power of two.
    public let granularityBytes: Int
    /// Granules of the device (the last may be partial).
    public let bitCount: Int
    /// Bits set: the number of granules out of sync.
    public private(set) var setBitCount: UInt64 = 0

    /// log2 of `granularityBytes`, so byte-to-bit is a shift.
    private let granularityShift: Int
    /// `pageCount * wordsPerPage` words, so a page's bytes are always whole.
    private var words: [UInt64]
    /// One bit per page: changed since it was last marked persisted.
    private var dirtyPageWords: [UInt64]
    /// Pages in `dirtyPageWords`.
    public private(set) var dirtyPageCount = 0

    /// Granules a device of `deviceBytes` has at `granularityBytes`.
    public static func bitCount(deviceBytes: UInt64, granularityBytes: Int) -> Int {
        precondition(granularityBytes > 0)
        let granularity = UInt64(granularityBytes)
        return Int((deviceBytes / granularity) + (deviceBytes % granularity == 0 ? 0 : 1))
    }

    /// On-disk pages of the bitmap of a device of `deviceBytes` at `granularityBytes`.
    public static func pageCount(deviceBytes: UInt64, granularityBytes: Int) -> Int {
        let bits = bitCount(deviceBytes: deviceBytes, granularityBytes: granularityBytes)
        return (bits + bitsPerPage - 1) / bitsPerPage
    }

    /// An all-clear bitmap. The granularity must be a power of two in the limits, and the device
    /// small enough for `Limits.bitmapBitsMax` bits (`MetadataLayout` reports these as errors
    /// first; here they are bugs).
    public init(deviceBytes: UInt64, granularityBytes: Int = Limits.bitmapGranularityBytesDefault) {
        do {
            try MetadataLayout.check(deviceBytes: deviceBytes, granularityBytes: granularityBytes)
        } catch {
            preconditionFailure("DirtyBitmap: \(error)")
        }
        self.deviceBytes = deviceBytes
        self.granularityBytes = granularityBytes
        granularityShift = granularityBytes.trailingZeroBitCount
        bitCount = DirtyBitmap.bitCount(deviceBytes: deviceBytes, granularityBytes: granularityBytes)
        let pages = DirtyBitmap.pageCount(deviceBytes: deviceBytes, granularityBytes: granularityBytes)
        words = [UInt64](repeating: 0, count: pages * DirtyBitmap.wordsPerPage)
        dirtyPageWords = [UInt64](repeating: 0, count: (pages + 63) / 64)
    }

    // MARK: Bytes and bits

    /// Pages of the on-disk bitmap.
    public var pageCount: Int { words.count / DirtyBitmap.wordsPerPage }

    /// Bytes out of sync: set granules, the last one counted only up to the device end.
    public var outOfSyncBytes: UInt64 {
        let whole = setBitCount << UInt64(granularityShift)
        let last = bitCount - 1
        guard isSet(bit: last) else { return whole }
        return whole - (UInt64(bitCount) << UInt64(granularityShift) - deviceBytes)
    }

    /// The granules any byte of `offset ..< offset + length` falls in (empty when `length` is 0).
    public func bits(offset: UInt64, length: UInt64) -> Range<Int> {
        checkRange(offset: offset, length: length)
        guard length > 0 else { return 0..<0 }
        let first = Int(offset >> UInt64(granularityShift))
        let last = Int((offset + length - 1) >> UInt64(granularityShift))
        return first..<(last + 1)
    }

    /// The granules `offset ..< offset + length` covers whole (a granule that ends at the device
    /// end counts as covered when the range reaches the device end).
    public func wholeBits(offset: UInt64, length: UInt64) -> Range<Int> {
        checkRange(offset: offset, length: length)
        let granularity = UInt64(granularityBytes)
        let first = Int((offset + granularity - 1) >> UInt64(granularityShift))
        let end = offset + length
        let last = end == deviceBytes ? bitCount : Int(end >> UInt64(granularityShift))
        return first < last ? first..<last : first..<first
    }

    /// The bytes of the device that `bits` cover, cut at the device end (for resync requests).
    public func byteRange(bits: Range<Int>) -> Range<UInt64> {
        precondition(bits.lowerBound >= 0 && bits.upperBound <= bitCount)
        let start = UInt64(bits.lowerBound) << UInt64(granularityShift)
        let end = min(UInt64(bits.upperBound) << UInt64(granularityShift), deviceBytes)
        return start..<max(start, end)
    }

    private func checkRange(offset: UInt64, length: UInt64) {
        let (end, overflow) = offset.addingReportingOverflow(length)
        precondition(!overflow && end <= deviceBytes, "DirtyBitmap: range \(offset)+\(length) past the device end \(deviceBytes)")
    }

    // MARK: Setting and clearing

    /// Marks every granule `offset ..< offset + length` touches out of sync; returns how many
    /// were not already.
    @discardableResult
    public mutating func setRange(offset: UInt64, length: UInt64) -> UInt64 {
        change(bits(offset: offset, length: length), set: true)
    }

    /// Marks the granules `offset ..< offset + length` covers whole in sync (a partial granule at
    /// either edge stays as it is); returns how many were set.
    @discardableResult
    public mutating func clearRange(offset: UInt64, length: UInt64) -> UInt64 {
        change(wholeBits(offset: offset, length: length), set: false)
    }

    /// Sets `bits`; returns how many were not already set.
    @discardableResult
    public mutating func setBits(_ bits: Range<Int>) -> UInt64 {
        precondition(bits.lowerBound >= 0 && bits.upperBound <= bitCount)
        return change(bits, set: true)
    }

    /// Clears `bits`; returns how many were set.
    @discardableResult
    public mutating func clearBits(_ bits: Range<Int>) -> UInt64 {
        precondition(bits.lowerBound >= 0 && bits.upperBound <= bitCount)
        return change(bits, set: false)
    }

    /// Sets one bit; returns whether it was clear.
    @discardableResult
    public mutating func setBit(_ bit: Int) -> Bool {
        setBits(bit..<(bit + 1)) == 1
    }

    /// Clears one bit; returns whether it was set.
    @discardableResult
    public mutating func clearBit(_ bit: Int) -> Bool {
        clearBits(bit..<(bit + 1)) == 1
    }

    /// Marks the whole device out of sync (full sync, or an activity log that could not be read).
    public mutating func setAll() {
        change(0..<bitCount, set: true)
    }

    /// Marks the whole device in sync (a full sync finished).
    public mutating func clearAll() {
        change(0..<bitCount, set: false)
    }

    /// ORs `other` in (the peer's bitmap on connect: a granule out of sync on either side is out
    /// of sync). Both must describe the same device at the same granularity. Returns the bits
    /// newly set.
    @discardableResult
    public mutating func merge(_ other: DirtyBitmap) -> UInt64 {
        precondition(other.deviceBytes == deviceBytes && other.granularityBytes == granularityBytes,
                     "DirtyBitmap.merge: different geometry")
        var added: UInt64 = 0
        for page in 0..<pageCount {
            var changed = false
            let base = page * DirtyBitmap.wordsPerPage
            for w in base..<(base + DirtyBitmap.wordsPerPage) {
                let old = words[w]
                let new = old | other.words[w]
                if new != old {
                    added += UInt64((new ^ old).nonzeroBitCount)
                    words[w] = new
                    changed = true
                }
            }
            if changed { markPageDirty(page) }
        }
        setBitCount += added
        return added
    }

    /// Sets or clears `bits`, a page at a time so each changed page is marked dirty once.
    @discardableResult
    private mutating func change(_ bits: Range<Int>, set: Bool) -> UInt64 {
        guard !bits.isEmpty else { return 0 }
        var changedBits: UInt64 = 0
        var bit = bits.lowerBound
        while bit < bits.upperBound {
            let page = bit / DirtyBitmap.bitsPerPage
            let pageEnd = min(bits.upperBound, (page + 1) * DirtyBitmap.bitsPerPage)
            var changedInPage: UInt64 = 0
            var w = bit >> 6
            let lastWord = (pageEnd - 1) >> 6
            while w <= lastWord {
                var mask = UInt64.max
                if w == bit >> 6 { mask &= UInt64.max << UInt64(bit & 63) }
                if w == lastWord, pageEnd & 63 != 0 { mask &= (1 << UInt64(pageEnd & 63)) - 1 }
                let old = words[w]
                let new = set ? old | mask : old & ~mask
                if new != old {
                    changedInPage += UInt64((new ^ old).nonzeroBitCount)
                    words[w] = new
                }
                w += 1
            }
            if changedInPage > 0 {
                markPageDirty(page)
                changedBits += changedInPage
            }
            bit = pageEnd
        }
        if set { setBitCount += changedBits } else { setBitCount -= changedBits }
        return changedBits
    }

    // MARK: Queries

    /// Whether granule `bit` is out of sync.
    public func isSet(bit: Int) -> Bool {
        precondition(bit >= 0 && bit < bitCount)
        return words[bit >> 6] & (1 << UInt64(bit & 63)) != 0
    }

    /// Whether any granule `offset ..< offset + length` touches is out of sync.
    public func isDirty(offset: UInt64, length: UInt64) -> Bool {
        let range = bits(offset: offset, length: length)
        guard let next = nextSetBit(from: range.lowerBound) else { return false }
        return next < range.upperBound
    }

    /// The first set bit at or after `from`, a word at a time.
    public func nextSetBit(from: Int) -> Int? {
        precondition(from >= 0)
        guard from < bitCount else { return nil }
        let wordEnd = (bitCount + 63) >> 6
        var w = from >> 6
        var word = words[w] & (UInt64.max << UInt64(from & 63))
        while word == 0 {
            w += 1
            if w == wordEnd { return nil }
            word = words[w]
        }
        let bit = w << 6 + word.trailingZeroBitCount
        precondition(bit < bitCount, "DirtyBitmap: a bit past the device end is set")
        return bit
    }

    /// The first run of consecutive set bits at or after `from`, at most `maxBits` long: what one
    /// resync request should cover.
    public func firstRun(from: Int, maxBits: Int) -> Range<Int>? {
        precondition(maxBits > 0)
        guard let start = nextSetBit(from: from) else { return nil }
        let limit = min(bitCount, start + maxBits)
        // The first clear bit after start, found by scanning inverted words.
        var w = start >> 6
        var inverted = ~words[w] & (UInt64.max << UInt64(start & 63))
        while inverted == 0 {
            w += 1
            if w << 6 >= limit { return start..<limit }
            inverted = ~words[w]
        }
        return start..<min(limit, w << 6 + inverted.trailingZeroBitCount)
    }

    // MARK: Pages

    /// The page holding granule `bit`.
    public func page(ofBit bit: Int) -> Int {
        precondition(bit >= 0 && bit < bitCount)
        return bit / DirtyBitmap.bitsPerPage
    }

    /// The pages holding the granules `offset ..< offset + length` touches (for an AL eviction:
    /// the pages of the evicted extent).
    public func pages(offset: UInt64, length: UInt64) -> Range<Int> {
        let range = bits(offset: offset, length: length)
        guard !range.isEmpty else { return 0..<0 }
        return (range.lowerBound / DirtyBitmap.bitsPerPage)..<((range.upperBound - 1) / DirtyBitmap.bitsPerPage + 1)
    }

    /// Calls `body` with the 4 KiB on-disk image of `page` (the words little-endian). The node
    /// copies it into its write buffer and marks the page persisted at that moment (see
    /// `markPagePersisted`).
    public func withPageBytes<R>(_ page: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        precondition(page >= 0 && page < pageCount)
        let base = page * DirtyBitmap.wordsPerPage
        #if _endian(little)
        return try words.withUnsafeBytes { raw in
            try body(UnsafeRawBufferPointer(rebasing: raw[(base * 8)..<((base + DirtyBitmap.wordsPerPage) * 8)]))
        }
        #else
        return try withUnsafeTemporaryAllocation(byteCount: DirtyBitmap.pageBytes, alignment: 8) { image in
            for i in 0..<DirtyBitmap.wordsPerPage {
                image.storeBytes(of: words[base + i].littleEndian, toByteOffset: i * 8, as: UInt64.self)
            }
            return try body(UnsafeRawBufferPointer(image))
        }
        #endif
    }

    /// Replaces `page` with its on-disk image (at attach). Bits past the device end are ignored, so
    /// a stale tail cannot count as out of sync. The page is then clean: it matches the disk.
    public mutating func loadPage(_ page: Int, from bytes: UnsafeRawBufferPointer) {
        precondition(page >= 0 && page < pageCount)
        precondition(bytes.count >= DirtyBitmap.pageBytes, "DirtyBitmap.loadPage: a page is \(DirtyBitmap.pageBytes) bytes")
        let base = page * DirtyBitmap.wordsPerPage
        var removed: UInt64 = 0
        var added: UInt64 = 0
        for i in 0..<DirtyBitmap.wordsPerPage {
            let w = base + i
            var new = MetadataCoding.load64(bytes, i * 8)
            let firstBit = w << 6
            if firstBit >= bitCount {
                new = 0
            } else if bitCount - firstBit < 64 {
                new &= (1 << UInt64(bitCount - firstBit)) - 1
            }
            removed += UInt64(words[w].nonzeroBitCount)
            added += UInt64(new.nonzeroBitCount)
            words[w] = new
        }
        setBitCount = setBitCount - removed + added
        markPagePersisted(page)
    }

    /// Whether `page` changed since it was last marked persisted.
    public func isPageDirty(_ page: Int) -> Bool {
        precondition(page >= 0 && page < pageCount)
        return dirtyPageWords[page >> 6] & (1 << UInt64(page & 63)) != 0
    }

    /// The first dirty page at or after `from` (allocation-free iteration).
    public func nextDirtyPage(from: Int) -> Int? {
        precondition(from >= 0)
        guard from < pageCount else { return nil }
        var w = from >> 6
        var word = dirtyPageWords[w] & (UInt64.max << UInt64(from & 63))
        while word == 0 {
            w += 1
            if w == dirtyPageWords.count { return nil }
            word = dirtyPageWords[w]
        }
        return w << 6 + word.trailingZeroBitCount
    }

    /// The dirty pages, as a set (a copy: iterate `nextDirtyPage` where nothing may allocate).
    public var dirtyPages: PageSet { PageSet(words: dirtyPageWords, count: dirtyPageCount, limit: pageCount) }

    /// Marks `page` persisted. Call it when the page's bytes are copied into the write buffer, not
    /// when the write completes: a bit set after the copy marks the page dirty again, so it is not
    /// lost. If the write then fails, call `markPageDirty`.
    public mutating func markPagePersisted(_ page: Int) {
        precondition(page >= 0 && page < pageCount)
        let mask: UInt64 = 1 << UInt64(page & 63)
        if dirtyPageWords[page >> 6] & mask != 0 {
            dirtyPageWords[page >> 6] &= ~mask
            dirtyPageCount -= 1
        }
    }

    /// Marks `pages` persisted (see `markPagePersisted`).
    public mutating func markPagesPersisted(_ pages: Range<Int>) {
        for page in pages { markPagePersisted(page) }
    }

    /// Marks every page persisted (after the whole bitmap was written).
    public mutating func markAllPagesPersisted() {
        for i in dirtyPageWords.indices { dirtyPageWords[i] = 0 }
        dirtyPageCount = 0
    }

    /// Marks `page` as needing a write (its write failed, or a new metadata file needs all pages).
    public mutating func markPageDirty(_ page: Int) {
        precondition(page >= 0 && page < pageCount)
        let mask: UInt64 = 1 << UInt64(page & 63)
        if dirtyPageWords[page >> 6] & mask == 0 {
            dirtyPageWords[page >> 6] |= mask
            dirtyPageCount += 1
        }
    }

    /// Equal when they describe the same device and the same granules are out of sync (which pages
    /// still need writing does not matter).
    public static func == (a: DirtyBitmap, b: DirtyBitmap) -> Bool {
        a.deviceBytes == b.deviceBytes && a.granularityBytes == b.granularityBytes
            && a.setBitCount == b.setBitCount && a.words == b.words
    }

    /// Recounts everything from scratch and checks it against the kept counters: O(size), for
    /// tests and the simulator, never the write path.
    public func checkInvariants() {
        var count: UInt64 = 0
        for (w, word) in words.enumerated() {
            count += UInt64(word.nonzeroBitCount)
            let firstBit = w << 6
            if firstBit >= bitCount {
                precondition(word == 0, "DirtyBitmap: bits past the device end")
            } else if bitCount - firstBit < 64 {
                precondition(word >> UInt64(bitCount - firstBit) == 0, "DirtyBitmap: bits past the device end")
            }
        }
        precondition(count == setBitCount, "DirtyBitmap: setBitCount \(setBitCount), counted \(count)")
        let dirty = dirtyPageWords.reduce(0) { $0 + $1.nonzeroBitCount }
        precondition(dirty == dirtyPageCount, "DirtyBitmap: dirtyPageCount \(dirtyPageCount), counted \(dirty)")
        precondition(nextDirtyPage(from: pageCount) == nil)
        if let last = dirtyPageWords.last, pageCount & 63 != 0 {
            precondition(last >> UInt64(pageCount & 63) == 0, "DirtyBitmap: a dirty page past the end")
        }
    }

    /// A set of page indexes, one bit each (bounded by the page count).
    public struct PageSet: Sequence, Equatable, Sendable {
        let words: [UInt64]
        /// Pages in the set.
        public let count: Int
        let limit: Int

        /// Whether `page` is in the set.
        public func contains(_ page: Int) -> Bool {
            guard page >= 0 && page < limit else { return false }
            return words[page >> 6] & (1 << UInt64(page & 63)) != 0
        }

        public var isEmpty: Bool { count == 0 }

        public func makeIterator() -> Iterator { Iterator(words: words, word: 0, remaining: words.first ?? 0) }

        /// Walks the set in increasing order.
        public struct Iterator: IteratorProtocol {
            let words: [UInt64]
            var word: Int
            var remaining: UInt64

            public mutating func next() -> Int? {
                while remaining == 0 {
                    word += 1
                    guard word < words.count else { return nil }
                    remaining = words[word]
                }
                let bit = remaining.trailingZeroBitCount
                remaining &= remaining - 1
                return word << 6 + bit
            }
        }
    }
}
