import Testing
import TandemCore

@Suite struct SuperblockTests {
    func sample(sequence: UInt64 = 0) throws -> Superblock {
        try Superblock(
            resourceName: "r0-données", nodeID: 1, deviceBytes: (1 << 36) + 4096,
            uuids: GenerationUUIDs(current: 0x1234_5678_9ABC_DEF0, bitmap: 0xAAAA, history0: 0xBBBB, history1: 0xCCCC),
            flags: [.consistent, .wasPrimary], bitmapGranularityBytes: 8192,
            activityLogExtentBytes: 8 << 20, activityLogExtents: 3000, activityLogSlotCount: 8,
            createdUnixSeconds: 1_750_000_000, sequence: sequence)
    }

    /// Rewrites the checksum after a test edits a field, so the field check, not the CRC, answers.
    static func resealed(_ block: [UInt8]) -> [UInt8] {
        var b = block
        for i in 12..<16 { b[i] = 0 }
        let crc = CRC32C.checksum(b)
        for i in 0..<4 { b[12 + i] = UInt8(truncatingIfNeeded: crc >> UInt32(8 * i)) }
        return b
    }

    static func decode(_ block: [UInt8], slot: Int? = nil) throws(MetadataError) -> Superblock {
        let result = block.withUnsafeBytes { raw in
            Result { () throws(MetadataError) in try Superblock(decoding: raw, slot: slot) }
        }
        return try result.get()
    }

    @Test func roundTrip() throws {
        let sb = try sample(sequence: 7)
        let image = sb.encoded
        #expect(image.count == 4096)
        #expect(Array(image[0..<8]) == Array("TNDMMETA".utf8))
        let back = try Self.decode(image, slot: 1)
        #expect(back == sb)
        #expect(back.layout == sb.layout)
        #expect(back.deviceBytes == (1 << 36) + 4096 && back.bitmapGranularityBytes == 8192)
        #expect(back.resourceName == "r0-données" && back.flags == [.consistent, .wasPrimary])
        #expect(back.slot == 1 && back.offset == 4096)
    }

    @Test func fieldOffsetsAreAsDocumented() throws {
        let image = try sample(sequence: 0x0102).encoded
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(image[at + $1]) << UInt32(8 * $1) } }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(image[at + $1]) << UInt64(8 * $1) } }
        #expect(u32(8) == 1)
        #expect(u64(16) == 0x0102)
        #expect(u64(24) == 1_750_000_000)
        #expect(u64(32) == (1 << 36) + 4096)
        #expect(u64(40) == 0x1234_5678_9ABC_DEF0 && u64(48) == 0xAAAA && u64(56) == 0xBBBB && u64(64) == 0xCCCC)
        #expect(u32(72) == 0b101)
        #expect(image[76] == 1 && Int(image[77]) == "r0-données".utf8.count)
        #expect(Array(image[80..<(80 + Int(image[77]))]) == Array("r0-données".utf8))
        #expect(u32(144) == 8192 && u32(148) == 8 << 20 && u32(152) == 3000 && u32(156) == 8)
        #expect(u64(160) == 8192 && u64(168) == 8192 + 8 * 4096)
        #expect(u64(176) == UInt64(DirtyBitmap.pageCount(deviceBytes: (1 << 36) + 4096, granularityBytes: 8192)) * 4096)
        #expect(u64(184) == u64(168) + u64(176))
        #expect(image[192...].allSatisfy { $0 == 0 })
        var zeroed = image
        for i in 12..<16 { zeroed[i] = 0 }
        #expect(u32(12) == CRC32C.checksum(zeroed))
    }

    @Test func encodesIntoCallerMemoryOnly() throws {
        let sb = try sample()
        var buffer = [UInt8](repeating: 0xEE, count: 5000)
        buffer.withUnsafeMutableBytes { sb.encode(into: $0) }
        #expect(Array(buffer[0..<4096]) == sb.encoded)
        #expect(buffer[4096...].allSatisfy { $0 == 0xEE })
    }

    @Test func rejectsDamage() throws {
        let image = try sample().encoded
        #expect(throws: MetadataError.blank) { try Self.decode([UInt8](repeating: 0, count: 4096)) }
        #expect(throws: MetadataError.tooShort(bytes: 100)) { try Self.decode(Array(image[0..<100])) }
        var bad = image
        bad[0] = UInt8(ascii: "X")
        #expect(throws: MetadataError.badMagic) { try Self.decode(bad) }
        bad = image
        bad[8] = 2
        #expect(throws: MetadataError.unsupportedVersion(2)) { try Self.decode(bad) }
        // Any flipped byte, header or padding, fails the checksum.
        for at in [13, 20, 77, 100, 150, 2000, 4095] {
            bad = image
            bad[at] ^= 0x10
            #expect(throws: (any Error).self) { try Self.decode(bad) }
            do {
                _ = try Self.decode(bad)
            } catch {
                if case .checksumMismatch = error {} else { Issue.record("byte \(at): \(error)") }
            }
        }
        #expect(throws: MetadataError.wrongSlot(sequence: 0, slot: 1)) { try Self.decode(image, slot: 1) }
    }

    @Test func rejectsBadFieldsEvenWithAGoodChecksum() throws {
        let image = try sample().encoded
        func check(_ expected: MetadataError, sourceLocation: SourceLocation = #_sourceLocation, _ change: (inout [UInt8]) -> Void) {
            var b = image
            change(&b)
            let sealed = Self.resealed(b)
            #expect(throws: expected, sourceLocation: sourceLocation) { try Self.decode(sealed) }
        }
        check(MetadataError.nonzeroReserved(offset: 3000)) { $0[3000] = 1 }
        check(MetadataError.nonzeroReserved(offset: 79)) { $0[79] = 1 }
        check(MetadataError.nonzeroReserved(offset: 143)) { $0[143] = 1 }
        check(MetadataError.badResourceName("stored length 0")) { $0[77] = 0 }
        check(MetadataError.badResourceName("stored length 65")) { $0[77] = 65 }
        check(MetadataError.badResourceName("not UTF-8")) { $0[80] = 0xC3; $0[81] = 0x28 }
        check(MetadataError.badResourceName("contains NUL")) { $0[81] = 0 }
        check(MetadataError.unknownFlags(1 << 9)) { $0[73] |= 2 }
        check(MetadataError.contradictoryFlags(0b10101)) { $0[72] = 0b10101 }
        check(MetadataError.badNodeID(32)) { $0[76] = 32 }
        check(MetadataError.badGranularity(12288)) { $0[145] = 0x30 }
        check(MetadataError.badExtentSize(1 << 21)) { $0[150] = 0x20 }
        check(MetadataError.badExtentCount(0)) { $0[152] = 0; $0[153] = 0 }
        // 70000 extents need more ring than 8 slots.
        check(MetadataError.badExtentCount(7000)) { $0[152] = 0x58; $0[153] = 0x1B }
        check(MetadataError.layoutMismatch(field: "bitmap offset", stored: 8192 + 8 * 4096 + 1, expected: 8192 + 8 * 4096)) { $0[168] &+= 1 }
        check(MetadataError.badActivityLogSlotCount(0)) { $0[156] = 0 }
        check(MetadataError.badDeviceSize(0)) { for i in 32..<40 { $0[i] = 0 } }
    }

    @Test func validatesInput() {
        func make(name: String = "r0", node: UInt8 = 0, flags: Superblock.Flags = [], extents: Int = 1237, slots: Int = 8, extentBytes: Int = 4 << 20) throws(MetadataError) -> Superblock {
            try Superblock(resourceName: name, nodeID: node, deviceBytes: 1 << 30, flags: flags,
                           activityLogExtentBytes: extentBytes, activityLogExtents: extents, activityLogSlotCount: slots, createdUnixSeconds: 0)
        }
        #expect(throws: MetadataError.badResourceName("empty")) { try make(name: "") }
        #expect(throws: MetadataError.badResourceName("65 bytes, at most 64")) { try make(name: String(repeating: "x", count: 65)) }
        #expect(throws: Never.self) { try make(name: String(repeating: "é", count: 32)) }
        #expect(throws: MetadataError.badResourceName("65 bytes, at most 64")) { try make(name: String(repeating: "é", count: 32) + "x") }
        #expect(throws: MetadataError.badResourceName("contains NUL")) { try make(name: "a\u{0}b") }
        #expect(throws: MetadataError.badNodeID(32)) { try make(node: 32) }
        #expect(throws: MetadataError.contradictoryFlags(0b10001)) { try make(flags: [.consistent, .resyncTarget]) }
        #expect(throws: MetadataError.badExtentCount(17)) { try make(extents: 17) }
        #expect(throws: MetadataError.badExtentCount(Limits.activityLogExtentsMax + 1)) { try make(extents: Limits.activityLogExtentsMax + 1) }
        #expect(throws: MetadataError.badExtentCount(1237)) { try make(slots: 2) }
        #expect(throws: Never.self) { try make(extents: 884, slots: 2) }
        #expect(throws: MetadataError.badExtentSize(1 << 20)) { try make(extentBytes: 1 << 20) }
        #expect(throws: MetadataError.badExtentSize(6 << 20)) { try make(extentBytes: 6 << 20) }
        for error in [MetadataError.badMagic, .checksumMismatch(stored: 1, computed: 0xABCDEF), .badExtentCount(3)] {
            #expect(!error.description.isEmpty)
        }
        #expect(MetadataError.checksumMismatch(stored: 1, computed: 0xABCDEF).description.contains("0x00abcdef"))
    }

    @Test func twoSlotsSurviveATornWrite() throws {
        var sb = try sample()
        var slots = [[UInt8]](repeating: [UInt8](repeating: 0, count: 4096), count: 2)
        func newest() -> Superblock? {
            let a = try? Self.decode(slots[0], slot: 0)
            let b = try? Self.decode(slots[1], slot: 1)
            return Superblock.newest(a, b)
        }
        #expect(newest() == nil)
        slots[sb.slot] = sb.encoded
        #expect(newest()?.sequence == 0)
        for _ in 0..<5 {
            let previous = sb
            sb.advanceSequence()
            sb.uuids.current += 2
            #expect(sb.slot != previous.slot)
            // Torn: the new header and sequence over the old version's fields. (Every field lives
            // in the first 192 bytes, so a tear at a sector boundary would leave a whole version.)
            var torn = slots[sb.slot]
            torn.replaceSubrange(0..<24, with: sb.encoded[0..<24])
            let saved = slots[sb.slot]
            slots[sb.slot] = torn
            #expect(newest() == previous, "the other slot still holds the previous version")
            slots[sb.slot] = saved
            slots[sb.slot] = sb.encoded
            #expect(newest() == sb)
        }
        #expect(Superblock.newest(nil, nil) == nil)
        let older = try sample(sequence: 3), newer = try sample(sequence: 4)
        #expect(Superblock.newest(older, nil) == older && Superblock.newest(nil, newer) == newer)
        #expect(Superblock.newest(older, newer) == newer && Superblock.newest(newer, older) == newer)
    }
}
