import Testing
@testable import TandemCore

@Suite struct CRC32CTests {
    /// Bit at a time, straight from the definition: the reference the tables must agree with.
    static func bitwise(_ bytes: [UInt8], seed: UInt32 = 0) -> UInt32 {
        var crc = ~seed
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        }
        return ~crc
    }

    @Test func standardVectors() {
        // RFC 3720 appendix B.4 and the usual check value.
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        #expect(CRC32C.checksum((0..<32).reversed().map { UInt8($0) }) == 0x113F_DB5C)
        #expect(CRC32C.checksum(Array("The quick brown fox jumps over the lazy dog".utf8)) == 0x2262_0404)
        #expect(CRC32C.checksum([]) == 0)
        #expect(CRC32C().value == 0)
    }

    @Test func tablesAgreeWithBitwiseAtEveryLengthAndAlignment() {
        var rng = MetadataTestRNG(seed: 7)
        let data = (0..<300).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        data.withUnsafeBytes { all in
            for start in 0..<9 {
                for length in 0...(data.count - start) where length < 40 || length % 17 == 0 {
                    let slice = UnsafeRawBufferPointer(rebasing: all[start..<(start + length)])
                    #expect(CRC32C.checksum(slice) == Self.bitwise(Array(data[start..<(start + length)])))
                }
            }
        }
    }

    @Test func streamingAndSeedsChain() {
        var rng = MetadataTestRNG(seed: 11)
        for _ in 0..<200 {
            let data = (0..<rng.below(5000)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let oneShot = CRC32C.checksum(data)
            var crc = CRC32C()
            var cut = 0
            data.withUnsafeBytes { raw in
                while cut < data.count {
                    let next = min(data.count, cut + rng.below(100))
                    crc.update(UnsafeRawBufferPointer(rebasing: raw[cut..<next]))
                    cut = next
                }
            }
            #expect(crc.value == oneShot)
            let split = data.isEmpty ? 0 : rng.below(data.count)
            let head = CRC32C.checksum(Array(data[..<split]))
            #expect(CRC32C.checksum(Array(data[split...]), seed: head) == oneShot)
            var resumed = CRC32C(seed: head)
            Array(data[split...]).withUnsafeBytes { resumed.update($0) }
            #expect(resumed.value == oneShot)
        }
    }

    @Test func detectsEverySingleBitFlipInABlock() {
        var block = [UInt8](repeating: 0x5A, count: 4096)
        let good = CRC32C.checksum(block)
        for bit in stride(from: 0, to: 4096 * 8, by: 97) {
            block[bit / 8] ^= 1 << UInt8(bit % 8)
            #expect(CRC32C.checksum(block) != good)
            block[bit / 8] ^= 1 << UInt8(bit % 8)
        }
    }
}

/// The randomized metadata tests draw from the core's seeded generator.
typealias MetadataTestRNG = SplitMix64

@Suite struct CRC32CHardwareTests {
    @Test func hardwareAndTableAgreeOnEveryLengthAndAlignment() {
        var rng = SplitMix64(seed: 0xC3C3)
        let bytes = (0..<65536 + 64).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        bytes.withUnsafeBytes { raw in
            // Around the three-stripe paths too: 3 x 256 and 3 x 8192 bytes, and their mixes.
            let stripes = [767, 768, 769, 1536 + 5, 24575, 24576, 24577, 24576 + 768 + 13, 65536]
            for length in [0, 1, 3, 7, 8, 9, 15, 16, 63, 64, 65, 511, 4096] + stripes {
                for shift in 0..<8 {
                    let slice = UnsafeRawBufferPointer(rebasing: raw[shift..<shift + length])
                    let table = ~CRC32C.advanceByTable(~0, slice)
                    #expect(CRC32C.checksum(slice) == table, "length \(length) shift \(shift)")
                }
            }
        }
    }

    /// From 512 bytes a CPU with VPCLMULQDQ folds 64-byte blocks with carry-less multiplies
    /// (four chains of 256 bytes, then one, then the lanes), and the crc32 paths take the rest.
    @Test func carrylessFoldingAgreesWithTheTableAroundEveryBoundary() {
        var rng = SplitMix64(seed: 0xF01D)
        let bytes = (0..<(1 << 20) + 64).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        bytes.withUnsafeBytes { raw in
            var lengths = [255, 256, 257, 511, 512, 513, 575, 576, 577, 767, 768, 831, 1023, 1024, 1025, 4096, 4096 + 63, 16384 + 320, 1 << 20]
            for _ in 0..<60 { lengths.append(512 + rng.below(1 << 20 - 512)) }
            for length in lengths {
                let shift = rng.below(64)
                let slice = UnsafeRawBufferPointer(rebasing: raw[shift..<shift + length])
                let seed = UInt32(truncatingIfNeeded: rng.next())
                #expect(CRC32C.checksum(slice, seed: seed) == ~CRC32C.advanceByTable(~seed, slice), "length \(length) shift \(shift)")
            }
        }
    }
}
