import Testing
import TandemCore

@Suite struct UndoFormatTests {
    static let geometry = try! UndoGeometry(deviceBytes: 5 * 8192 + 4096, chunkBytes: 8192)

    static func header(id: UInt64 = 7, previous: UInt64 = 3, label: String = "avant-mise-à-jour") -> UndoSegmentHeader {
        UndoSegmentHeader(barrier: BarrierInfo(id: id, createdUnixSeconds: 1_750_000_000, label: label), geometry: geometry, previousID: previous)
    }

    /// A segment file image: the header then one record per (chunk, fill byte).
    static func segment(_ header: UndoSegmentHeader, _ records: [(UInt64, UInt8)]) -> [UInt8] {
        var bytes = header.encoded
        for (chunk, fill) in records {
            let data = [UInt8](repeating: fill, count: header.geometry.length(ofChunk: chunk))
            var head = [UInt8](repeating: 0, count: UndoRecordHeader.encodedBytes)
            head.withUnsafeMutableBytes {
                UndoRecordHeader(chunk: chunk, dataBytes: data.count, dataChecksum: CRC32C.checksum(data), barrierID: header.barrier.id).encode(into: $0)
            }
            bytes += head + data
        }
        return bytes
    }

    static func scan(_ bytes: [UInt8]) -> UndoSegmentScan {
        bytes.withUnsafeBytes { UndoSegmentScan.scan($0) }
    }

    static func decodeHeader(_ bytes: [UInt8]) throws(UndoFormatError) -> UndoSegmentHeader {
        let result = bytes.withUnsafeBytes { raw in Result { () throws(UndoFormatError) in try UndoSegmentHeader(decoding: raw) } }
        return try result.get()
    }

    @Test func geometry() throws {
        let g = Self.geometry
        #expect(g.chunkCount == 6 && g.length(ofChunk: 5) == 4096 && g.length(ofChunk: 0) == 8192)
        #expect(g.chunks(offset: 8191, length: 2) == 0..<2)
        #expect(g.chunks(offset: 5 * 8192, length: 4096) == 5..<6)
        #expect(g.chunks(offset: 100, length: 0).isEmpty)
        #expect(throws: UndoFormatError.badChunkSize(6000)) { try UndoGeometry(deviceBytes: 1 << 20, chunkBytes: 6000) }
        #expect(throws: UndoFormatError.badChunkSize(2048)) { try UndoGeometry(deviceBytes: 1 << 20, chunkBytes: 2048) }
        #expect(throws: UndoFormatError.badChunkSize(2 << 20)) { try UndoGeometry(deviceBytes: 1 << 30, chunkBytes: 2 << 20) }
        #expect(throws: UndoFormatError.badDeviceSize(1000)) { try UndoGeometry(deviceBytes: 1000) }
        #expect(throws: UndoFormatError.badDeviceSize(0)) { try UndoGeometry(deviceBytes: 0) }
    }

    @Test func headerRoundTripAndOffsets() throws {
        let h = Self.header()
        let image = h.encoded
        #expect(image.count == 128 && Array(image[0..<8]) == Array("TNDMUNDO".utf8))
        #expect(try Self.decodeHeader(image) == h)
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(image[at + $1]) << UInt64(8 * $1) } }
        #expect(u64(16) == 7 && u64(24) == 1_750_000_000 && u64(32) == 5 * 8192 + 4096 && u64(112) == 3)
        #expect(image[40] == 0 && image[41] == 0x20 && Int(image[44]) == "avant-mise-à-jour".utf8.count)
    }

    @Test func everyHeaderByteIsChecked() {
        let image = Self.header().encoded
        for i in 0..<image.count {
            var bad = image
            bad[i] ^= 0x10
            #expect(throws: UndoFormatError.self) { try Self.decodeHeader(bad) }
        }
    }

    @Test func labels() throws {
        #expect(throws: UndoFormatError.self) { try BarrierInfo(id: 1, createdUnixSeconds: 0, label: String(repeating: "x", count: 65)).validate() }
        #expect(throws: UndoFormatError.self) { try BarrierInfo(id: 1, createdUnixSeconds: 0, label: "a\u{0}b").validate() }
        #expect(throws: UndoFormatError.badBarrierID(0)) { try BarrierInfo(id: 0, createdUnixSeconds: 0).validate() }
        let long = String(repeating: "é", count: 32)
        #expect(try Self.decodeHeader(Self.header(label: long).encoded).barrier.label == long)
        #expect(try Self.decodeHeader(Self.header(label: "").encoded).barrier.label == "")
    }

    @Test func cleanScan() {
        let h = Self.header()
        let bytes = Self.segment(h, [(2, 0xAA), (5, 0xBB), (0, 0xCC)])
        let scan = Self.scan(bytes)
        #expect(scan.outcome == .clean && scan.header == h)
        #expect(scan.validBytes == UInt64(bytes.count))
        #expect(scan.records.map(\.chunk) == [2, 5, 0])
        #expect(scan.records[0].dataOffset == 128 + 32 && scan.records[1].dataBytes == 4096)
        #expect(scan.records[2].dataOffset == UInt64(128 + 32 + 8192 + 32 + 4096 + 32))
        #expect(Self.scan(h.encoded).outcome == .clean && Self.scan(h.encoded).records.isEmpty)
    }

    /// A crash can cut the file at any byte: the scan keeps exactly the whole records before it.
    @Test func tornAtEveryByte() {
        let h = Self.header()
        let records: [(UInt64, UInt8)] = [(1, 1), (5, 2), (3, 3)]
        let bytes = Self.segment(h, records)
        var ends = [128]
        for (chunk, _) in records { ends.append(ends.last! + 32 + h.geometry.length(ofChunk: chunk)) }
        for cut in 0...bytes.count {
            let scan = Self.scan(Array(bytes[0..<cut]))
            if cut < 128 {
                guard case .badHeader = scan.outcome else { Issue.record("cut \(cut): \(String(describing: scan.outcome))"); continue }
                continue
            }
            let whole = ends.lastIndex { $0 <= cut }!
            #expect(scan.records.count == whole, "cut \(cut)")
            #expect(scan.validBytes == UInt64(ends[whole]), "cut \(cut)")
            #expect(scan.outcome == (cut == ends[whole] ? .clean : scan.outcome) && (cut == ends[whole]) == (scan.outcome == .clean))
        }
    }

    /// Zeros after the records (space preallocated for more, of any length) end the records
    /// without a loss: not a torn record.
    @Test func zerosAfterTheRecordsArePreallocatedSpace() {
        let h = Self.header()
        let bytes = Self.segment(h, [(1, 1), (5, 2)])
        for zeros in [1, 31, 32, 33, 4096, 3 * 4096 + 17] {
            let scan = Self.scan(bytes + [UInt8](repeating: 0, count: zeros))
            #expect(scan.outcome == .zeroTail && scan.records.count == 2 && scan.validBytes == UInt64(bytes.count), "\(zeros) zeros")
        }
        // A record header that never reached the disk, with its data that did: the same.
        let torn = bytes + [UInt8](repeating: 0, count: 32) + [UInt8](repeating: 9, count: 100)
        #expect(Self.scan(torn).outcome == .zeroTail && Self.scan(torn).records.count == 2)
    }

    /// Damage anywhere in a record stops the scan at that record; the records before it stay.
    @Test func damageAtEveryByte() {
        let h = Self.header()
        let bytes = Self.segment(h, [(1, 1), (5, 2)])
        let second = 128 + 32 + 8192
        for i in 128..<bytes.count {
            var bad = bytes
            bad[i] ^= 0x01
            let scan = Self.scan(bad)
            let expected = i < second ? 0 : 1
            #expect(scan.records.count == expected, "byte \(i)")
            #expect(scan.validBytes == UInt64(expected == 0 ? 128 : second), "byte \(i)")
            guard case .torn = scan.outcome else { Issue.record("byte \(i): \(String(describing: scan.outcome))"); continue }
        }
    }

    @Test func recordsFromAnotherSegmentOrPastTheDeviceAreRefused() {
        let h = Self.header(id: 7)
        let other = Self.segment(Self.header(id: 8, previous: 7), [(1, 1)])
        let mixed = h.encoded + Array(other[128...])
        #expect(Self.scan(mixed).records.isEmpty)
        guard case .torn(let why) = Self.scan(mixed).outcome else { Issue.record("not torn"); return }
        #expect(why.contains("barrier 8"))
    }

    @Test func aSecondRecordForAChunkIsSkipped() {
        let h = Self.header()
        let scan = Self.scan(Self.segment(h, [(4, 1), (4, 2), (2, 3)]))
        #expect(scan.outcome == .clean && scan.records.map(\.chunk) == [4, 2])
        #expect(scan.records[0].dataChecksum == CRC32C.checksum([UInt8](repeating: 1, count: 8192)))
    }
}
