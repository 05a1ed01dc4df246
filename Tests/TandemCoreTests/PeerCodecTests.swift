import Testing
import TandemCore

/// The peer codec against Protocol/peer.md: layouts byte for byte, round trips of every message
/// type, CRC coverage, incremental decoding, every bound, and a seeded fuzz of random and mutated
/// frames. The CRC here is a separate bitwise implementation, so the tests also check the
/// codec's checksum against the spec's definition rather than against itself.
@Suite struct PeerCodecTests {
    // MARK: Fixtures

    static let hello = PeerHello(
        nodeID: 1, role: .primary, diskState: .upToDate, flags: PeerFlags.Hello.crashedPrimary,
        resourceName: "r0.data-1_x", deviceSizeBytes: 1 << 40, bitmapGranularityBytes: 4096,
        uuids: PeerGenerationUUIDs(current: 0xDEAD_BEEF_0000_0001, bitmap: 0x1234, history: [5, 6, 0, 0]),
        outOfSyncBits: 0x77, primarySinceMillis: 1_700_000_000_123)

    static let samples: [PeerMessage] = [
        .hello(hello),
        .hello(PeerHello(
            versionMin: 1, versionMax: 3, nodeID: 31, role: .secondary, diskState: .inconsistent,
            flags: PeerFlags.Hello.all, resourceName: String(repeating: "z", count: 64), deviceSizeBytes: 0,
            bitmapGranularityBytes: 1 << 20,
            uuids: PeerGenerationUUIDs(current: 4, bitmap: 0, history: [0, 0, 0, 0]))),
        .ping(id: 7),
        .pingAck(id: 0xFFFF_FFFF_FFFF_FFFF),
        .stateChange(PeerStateChange(role: .primary, diskState: .upToDate, uuids: hello.uuids)),
        .stateChange(PeerStateChange(
            id: 9, role: .secondary, diskState: .outdated,
            flags: PeerFlags.State.reply | PeerFlags.State.refused | PeerFlags.State.resyncPaused,
            uuids: PeerGenerationUUIDs(current: 0x77, bitmap: 0x66, history: [0x55, 0x44, 0x33, 0x22]))),
        .stateChange(PeerStateChange(
            id: 10, role: .secondary, diskState: .upToDate, flags: PeerFlags.State.rollingBack | PeerFlags.State.reply | PeerFlags.State.refused,
            uuids: hello.uuids)),
        .disconnect(reason: .splitBrain, text: "both sides wrote — déjà vu"),
        .disconnect(reason: PeerDisconnectReason(rawValue: 999), text: ""),
        .data(PeerWrite(id: 42, offset: 8192, length: 64, epoch: 3, flags: PeerFlags.Write.fua),
              payload: (0..<64).map { UInt8(truncatingIfNeeded: $0 &* 37) }),
        .data(PeerWrite(id: 43, offset: 1, length: 1, epoch: 1 << 40, flags: PeerFlags.Write.setsInSync), payload: [0xAB]),
        .trim(PeerWrite(id: 44, offset: 0, length: 1 << 20, epoch: 4)),
        .zeroes(PeerWrite(id: 45, offset: 4096, length: 4096, epoch: 4,
                          flags: PeerFlags.Write.noHole | PeerFlags.Write.fua | PeerFlags.Write.setsInSync)),
        .writeAck(id: 42, result: 0),
        .writeAck(id: 43, result: 5),
        .flush(id: 1),
        .flushAck(id: 1, result: 28),
        .barrier(epoch: 3),
        .barrierAck(epoch: 3, writes: 2, result: 0),
        .snapshot(BarrierInfo(id: 17, createdUnixSeconds: 1_764_000_000, label: "before-upgrade")),
        .bitmapChunk(PeerBitmapChunk(firstBit: 128, bitCount: 70, words: [0x8000_0000_0000_0001, 0x3F])),
        .bitmapChunk(PeerBitmapChunk(firstBit: 0, bitCount: 64, words: [0xFFFF_FFFF_FFFF_FFFF])),
        .bitmapDone(totalBits: 1 << 28, setBits: 3),
        .resyncRequest(id: 11, offset: 1 << 30, length: 65536),
        .resyncData(PeerResyncData(id: 0, offset: 0, length: 4096), payload: (0..<4096).map { UInt8(truncatingIfNeeded: $0 ^ 0x5A) }),
        .resyncData(PeerResyncData(id: 11, offset: 1 << 30, length: 65536, flags: PeerFlags.ResyncData.zero), payload: []),
        .resyncData(PeerResyncData(id: 12, offset: 8192, length: 8192, result: 5), payload: []),
        .resyncAck(id: 0, offset: 0, length: 4096, result: 0),
        .resyncDone,
        .verifyRequest(id: 3, offset: 0, length: 16384, algorithm: .sha256),
        .verifyDigest(PeerVerifyDigest(id: 3, offset: 0, length: 16384, algorithm: .sha256,
                                       digests: (0..<128).map { UInt8($0) })),
        .verifyDigest(PeerVerifyDigest(id: 4, offset: 4096, length: 8192, algorithm: .crc32c, digests: [1, 2, 3, 4, 5, 6, 7, 8])),
        .verifyDigest(PeerVerifyDigest(id: 5, offset: 4096, length: 8192, result: 5, algorithm: .crc32c, digests: [])),
    ]

    // MARK: Checksums and layout

    @Test func crcIsCastagnoli() {
        let check = Array("123456789".utf8)
        #expect(TestCRC.checksum(check) == 0xE306_9283)
        #expect(check.withUnsafeBytes { PeerEncoder.payloadCRC($0) } == 0xE306_9283)
        #expect([UInt8]().withUnsafeBytes { PeerEncoder.payloadCRC($0) } == 0)
        let zeros = [UInt8](repeating: 0, count: 32)
        #expect(zeros.withUnsafeBytes { PeerEncoder.payloadCRC($0) } == 0x8A91_36AA)  // RFC 3720 B.4
    }

    @Test func limitsRelationsHold() {
        PeerProtocol.checkRelations()
        #expect(PeerProtocol.headerBytesMax == 56)
        #expect(PeerProtocol.bitmapChunkBitsMax == 8190 * 64)
        #expect(PeerMessageType.data.payloadBytesRange.upperBound == Limits.nbdRequestBytesMax)
        for type in PeerMessageType.allCases where !type.isBlock || type == .trim || type == .zeroes {
            #expect(type.payloadBytesRange.upperBound <= PeerProtocol.controlPayloadBytesMax, "\(type)")
        }
    }

    /// peer.md "Header": every field at its offset, big-endian, CRCs as specified.
    @Test func headerLayoutMatchesSpec() {
        let frame = PeerMessage.ping(id: 0x0102_0304_0506_0708).encoded()
        #expect(frame.count == 32)
        var expected: [UInt8] = [0x54, 0x4E, 0x44, 0x4D, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        expected += [0, 0, 0, 0, 0, 0, 0, 0]
        let crc = TestCRC.checksum(expected)
        expected[24...27] = [UInt8(crc >> 24), UInt8(crc >> 16 & 0xFF), UInt8(crc >> 8 & 0xFF), UInt8(crc & 0xFF)]
        #expect(frame == expected)

        let payload: [UInt8] = [9, 8, 7, 6, 5]
        let data = PeerMessage.data(
            PeerWrite(id: 0xAA, offset: 0x1122_3344_5566_7788, length: 5, epoch: 0x99, flags: PeerFlags.Write.fua),
            payload: payload).encoded()
        #expect(data.count == 56 + 5)
        #expect(Array(data[6..<8]) == [0, 16])  // type data
        #expect(Array(data[8..<10]) == [0, 1])  // FUA
        #expect(be32(data, 12) == 5)  // payload length excludes the block extension
        #expect(be64(data, 16) == 0xAA)
        #expect(be32(data, 28) == TestCRC.checksum(payload))
        #expect(be64(data, 32) == 0x1122_3344_5566_7788)
        #expect(be64(data, 40) == 0x99)
        #expect(be32(data, 48) == 5)
        #expect(be32(data, 52) == 0)
        var sealed = Array(data[0..<56])
        sealed[24...27] = [0, 0, 0, 0]
        #expect(be32(data, 24) == TestCRC.checksum(sealed))  // header CRC covers the extension
        #expect(Array(data[56...]) == payload)

        // hello: peer.md "hello" offsets.
        let h = PeerMessage.hello(Self.hello).encoded()
        let p = Array(h[32...])
        #expect(p.count == 84 + 11)
        #expect(be16(p, 0) == 1 && be16(p, 2) == 1)
        #expect(be32(p, 4) == 4096)
        #expect(be64(p, 8) == 1 << 40)
        #expect(be64(p, 16) == 0xDEAD_BEEF_0000_0001)
        #expect(be64(p, 24) == 0x1234)
        #expect(be64(p, 32) == 5 && be64(p, 40) == 6 && be64(p, 48) == 0 && be64(p, 56) == 0)
        #expect(Array(p[64..<68]) == [1, 1, 5, 11])
        #expect(Array(p[68..<79]) == Array("r0.data-1_x".utf8))
        #expect(be64(p, 79) == 0x77 && be64(p, 87) == 1_700_000_000_123)  // out-of-sync bits, primary since
        #expect(be16(h, 8) == PeerFlags.Hello.crashedPrimary)

        // stateChange: the UUIDs as in hello, then role and disk state.
        let state = PeerMessage.stateChange(PeerStateChange(
            id: 3, role: .primary, diskState: .inconsistent, flags: PeerFlags.State.ioSuspended, uuids: Self.hello.uuids)).encoded()
        #expect(Array(state[32...]) == Array(p[16..<64]) + [1, 2])
        #expect(be16(state, 8) == 2 && be64(state, 16) == 3)

        // Bitmap words are little-endian inside the big-endian frame.
        let chunk = PeerMessage.bitmapChunk(PeerBitmapChunk(firstBit: 64, bitCount: 64, words: [0x0102_0304_0506_0708])).encoded()
        #expect(Array(chunk[32...]) == [0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 64, 8, 7, 6, 5, 4, 3, 2, 1])
    }

    // MARK: Round trips

    @Test func everyTypeRoundTrips() {
        #expect(Set(Self.samples.map(\.type)) == Set(PeerMessageType.allCases))
        for message in Self.samples {
            let frame = message.encoded()
            #expect(frame.count == message.frameBytes)
            let result = frame.withUnsafeBytes { PeerDecoder.decodeFrame($0) }
            guard case .frame(let header, let decoded) = result else {
                Issue.record("\(message.type): \(result)")
                continue
            }
            #expect(decoded == message)
            #expect(header.type == message.type)
            #expect(header.flags == message.flags)
            #expect(header.sequence == message.sequence)
            #expect(header.block == message.block)
            #expect(header.frameBytes == frame.count)
            #expect(header.headerBytes == (message.type.isBlock ? 56 : 32))
        }
    }

    @Test func framesDecodeBackToBackFromOneStream() {
        let stream = Self.samples.flatMap { $0.encoded() }
        var decoded: [PeerMessage] = []
        stream.withUnsafeBytes { raw in
            var at = 0
            while at < raw.count {
                guard case .frame(let header, let message) = PeerDecoder.decodeFrame(UnsafeRawBufferPointer(rebasing: raw[at...]))
                else { break }
                decoded.append(message)
                at += header.frameBytes
            }
        }
        #expect(decoded == Self.samples)
    }

    @Test func headersFedOneByteAtATime() {
        for message in Self.samples {
            let frame = message.encoded()
            frame.withUnsafeBytes { raw in
                let headerBytes = message.type.headerBytes
                for n in 0..<headerBytes {
                    #expect(PeerDecoder.decodeHeader(UnsafeRawBufferPointer(rebasing: raw[0..<n])) == .needMore,
                            "\(message.type) at \(n)")
                }
                guard case .header(let header) = PeerDecoder.decodeHeader(UnsafeRawBufferPointer(rebasing: raw[0..<headerBytes]))
                else {
                    Issue.record("\(message.type): no header at \(headerBytes) bytes")
                    return
                }
                #expect(header.payloadLength == message.payloadLength)
                // Payload arriving in pieces: still needMore until the last byte.
                for n in stride(from: headerBytes, to: frame.count, by: max(1, header.payloadLength / 97)) {
                    #expect(PeerDecoder.decodeFrame(UnsafeRawBufferPointer(rebasing: raw[0..<n])) == .needMore)
                }
                #expect(PeerDecoder.decodeFrame(raw) == .frame(header, message))
            }
        }
    }

    /// The data path: header and extension in a small slot, payload in the caller's own buffer,
    /// sent as two iovecs; the receiver decodes the header alone and checks the payload where it
    /// landed.
    @Test func dataPayloadTravelsApartFromItsHeader() {
        let payload: [UInt8] = (0..<512).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        let write = PeerWrite(id: 77, offset: 1 << 20, length: 512, epoch: 12, flags: PeerFlags.Write.fua)
        var slot = [UInt8](repeating: 0xEE, count: PeerProtocol.headerBytesMax)
        let crc = payload.withUnsafeBytes { PeerEncoder.payloadCRC($0) }
        let n = slot.withUnsafeMutableBytes {
            PeerEncoder.encodeBlockHeader(type: .data, flags: write.flags, sequence: write.id,
                                          block: PeerBlock(offset: write.offset, epoch: write.epoch, length: write.length),
                                          payloadCRC: crc, into: $0.baseAddress!)
        }
        #expect(n == 56)
        #expect(Array(slot[0..<n]) + payload == PeerMessage.data(write, payload: payload).encoded())

        guard case .header(let header) = slot.withUnsafeBytes({ PeerDecoder.decodeHeader($0) }) else {
            Issue.record("data header did not decode")
            return
        }
        #expect(header.block == PeerBlock(offset: 1 << 20, epoch: 12, length: 512))
        #expect(header.payloadLength == 512 && header.has(PeerFlags.Write.fua))
        var received = payload
        #expect(received.withUnsafeBytes { header.verifyPayload($0) })
        received[200] ^= 0x10
        #expect(!received.withUnsafeBytes { header.verifyPayload($0) })
        #expect(!payload.dropLast().withUnsafeBytes { header.verifyPayload($0) })

        // Control frames go the same way: payload first (anywhere), then its header.
        let ack = PeerMessage.writeAck(id: 77, result: 0).encoded()
        var head = [UInt8](repeating: 0, count: 32)
        head.withUnsafeMutableBytes { h in
            ack[32...].withUnsafeBytes { p in
                _ = PeerEncoder.encodeHeader(type: .writeAck, flags: 0, sequence: 77, payload: p, into: h.baseAddress!)
            }
        }
        #expect(head == Array(ack[0..<32]))
    }

    @Test func largestMessagesOfEachBoundRoundTrip() {
        let words = [UInt64](repeating: 0xA5A5_A5A5_A5A5_A5A5, count: PeerProtocol.bitmapChunkBitsMax / 64)
        let chunk = PeerMessage.bitmapChunk(PeerBitmapChunk(
            firstBit: 1 << 40, bitCount: UInt32(PeerProtocol.bitmapChunkBitsMax), words: words))
        #expect(chunk.payloadLength <= PeerProtocol.controlPayloadBytesMax)
        #expect(PeerProtocol.controlPayloadBytesMax - chunk.payloadLength < 8)
        let digests = PeerMessage.verifyDigest(PeerVerifyDigest(
            id: 1, offset: 0, length: UInt32(PeerProtocol.verifyBytesMax), algorithm: .sha256,
            digests: [UInt8](repeating: 0x42, count: PeerProtocol.verifyBytesMax / 4096 * 32)))
        let text = PeerMessage.disconnect(reason: .protocolError, text: String(repeating: "é", count: 128))
        for message in [chunk, digests, text] {
            let frame = message.encoded()
            #expect(frame.withUnsafeBytes { PeerDecoder.decodeFrame($0) } == .frame(
                PeerHeader(type: message.type, flags: 0, sequence: message.sequence, payloadLength: message.payloadLength,
                           payloadCRC: TestCRC.checksum(Array(frame[32...])), block: nil), message))
        }
        // A full-size data header decodes before any of its 32 MiB arrives.
        var slot = [UInt8](repeating: 0, count: 56)
        slot.withUnsafeMutableBytes {
            _ = PeerEncoder.encodeBlockHeader(
                type: .data, flags: 0, sequence: 1,
                block: PeerBlock(offset: 0, epoch: 1, length: UInt32(PeerProtocol.dataPayloadBytesMax)),
                payloadCRC: 0x1234_5678, into: $0.baseAddress!)
        }
        guard case .header(let header) = slot.withUnsafeBytes({ PeerDecoder.decodeHeader($0) }) else {
            Issue.record("32 MiB data header refused")
            return
        }
        #expect(header.payloadLength == 32 * 1024 * 1024)
    }

    @Test func versionNegotiationPicksTheHighestCommonVersion() {
        var a = Self.hello
        var b = Self.hello
        #expect(PeerProtocol.agreedVersion(local: a, peer: b) == 1)
        a.versionMax = 3
        b.versionMax = 2
        #expect(PeerProtocol.agreedVersion(local: a, peer: b) == 2)
        a.versionMin = 3
        #expect(PeerProtocol.agreedVersion(local: a, peer: b) == nil)
    }

    // MARK: Integrity

    @Test func everyHeaderBitFlipIsDetected() {
        for message in Self.samples {
            // Padding after the frame, so a flipped type that asks for the block extension is
            // judged on bytes rather than waiting for more.
            let frame = message.encoded() + [UInt8](repeating: 0, count: 64)
            for bit in 0..<(message.type.headerBytes * 8) {
                var bad = frame
                bad[bit / 8] ^= 1 << UInt8(bit % 8)
                let result = bad.withUnsafeBytes { PeerDecoder.decodeHeader($0) }
                guard case .invalid = result else {
                    Issue.record("\(message.type): flipping header bit \(bit) gave \(result)")
                    continue
                }
            }
        }
    }

    @Test func payloadBitFlipsAreDetected() {
        var rng = SplitMix64(seed: 0xC0FFEE)
        for message in Self.samples where message.payloadLength > 0 {
            let frame = message.encoded()
            let headerBytes = message.type.headerBytes
            let bits = message.payloadLength * 8
            let chosen = bits <= 2048 ? Array(0..<bits) : (0..<256).map { _ in Int.random(in: 0..<bits, using: &rng) }
            for bit in chosen {
                var bad = frame
                bad[headerBytes + bit / 8] ^= 1 << UInt8(bit % 8)
                let result = bad.withUnsafeBytes { PeerDecoder.decodeFrame($0) }
                #expect(result == .invalid("\(message.type): payload crc mismatch"), "bit \(bit)")
            }
        }
    }

    // MARK: Bounds and strictness

    @Test func headerFieldsAreBounded() {
        func expectInvalid(_ frame: RawFrame, _ fragment: String, sourceLocation: SourceLocation = #_sourceLocation) {
            let result = frame.bytes().withUnsafeBytes { PeerDecoder.decodeFrame($0) }
            guard case .invalid(let reason) = result, reason.contains(fragment) else {
                Issue.record("expected invalid with '\(fragment)', got \(result)", sourceLocation: sourceLocation)
                return
            }
        }
        func expectValid(_ frame: RawFrame, sourceLocation: SourceLocation = #_sourceLocation) {
            let result = frame.bytes().withUnsafeBytes { PeerDecoder.decodeFrame($0) }
            guard case .frame = result else {
                Issue.record("expected a frame, got \(result)", sourceLocation: sourceLocation)
                return
            }
        }
        let t = PeerMessageType.self
        expectValid(RawFrame(type: t.ping.rawValue, sequence: 3))
        expectInvalid(RawFrame(magic: 0x4E42_444D, type: t.ping.rawValue), "bad magic")
        expectInvalid(RawFrame(version: 2, type: t.ping.rawValue), "version 2")
        expectInvalid(RawFrame(version: 0, type: t.ping.rawValue), "version 0")
        for unknown: UInt16 in [0, 6, 15, 25, 38, 50, 0xFFFF] {
            expectInvalid(RawFrame(type: unknown), "unknown message type \(unknown)")
        }
        expectInvalid(RawFrame(type: t.ping.rawValue, reserved: 1), "reserved")
        expectInvalid(RawFrame(type: t.ping.rawValue, flags: 1), "flags")
        expectInvalid(RawFrame(type: t.ping.rawValue, payload: [0]), "payload length 1")
        expectInvalid(RawFrame(type: t.barrier.rawValue, sequence: 1, payload: [UInt8](repeating: 0, count: 8)), "sequence")
        expectInvalid(RawFrame(type: t.ping.rawValue, payloadCRC: 1), "empty payload")
        expectInvalid(RawFrame(type: t.writeAck.rawValue, payload: [0, 0, 0]), "payload length 3")
        // Lengths that would make a receiver buffer too much are refused from the header alone.
        expectInvalid(RawFrame(type: t.bitmapChunk.rawValue, payloadLength: 64 * 1024 + 1), "payload length 65537")
        expectInvalid(RawFrame(type: t.hello.rawValue, payloadLength: 84 + 65), "payload length 149")
        expectInvalid(RawFrame(type: t.disconnect.rawValue, payloadLength: 4 + 257), "payload length 261")
        expectInvalid(RawFrame(type: t.verifyDigest.rawValue, payloadLength: 0xFFFF_FFFF), "payload length")
        expectInvalid(RawFrame(type: t.data.rawValue, payloadLength: 32 * 1024 * 1024 + 1,
                               block: (0, 1, 32 * 1024 * 1024 + 1, 0)), "payload length 33554433")
        expectInvalid(RawFrame(type: t.resyncRequest.rawValue, payload: be(UInt64(0)) + be(UInt32(4096))), "id must not be 0")
        expectInvalid(RawFrame(type: t.stateChange.rawValue, flags: PeerFlags.State.refused, payload: uuidBytes + [0, 5]), "refused")
        expectInvalid(RawFrame(type: t.stateChange.rawValue, flags: PeerFlags.State.reply, payload: uuidBytes + [0, 5]), "reply without id")
        expectValid(RawFrame(type: t.stateChange.rawValue, flags: PeerFlags.State.reply, sequence: 2, payload: uuidBytes + [0, 5]))
        // Rollback notices (State bit 5, Hello bit 3); the bits above them are still undefined.
        expectValid(RawFrame(type: t.stateChange.rawValue, flags: PeerFlags.State.rollingBack, sequence: 3, payload: uuidBytes + [0, 5]))
        expectInvalid(RawFrame(type: t.stateChange.rawValue, flags: 1 << 6, payload: uuidBytes + [0, 5]), "flags")
    }

    @Test func blockExtensionIsBounded() {
        func check(_ frame: RawFrame, _ fragment: String?, sourceLocation: SourceLocation = #_sourceLocation) {
            let result = frame.bytes().withUnsafeBytes { PeerDecoder.decodeFrame($0) }
            switch (result, fragment) {
            case (.frame, nil): break
            case (.invalid(let reason), let fragment?) where reason.contains(fragment): break
            default: Issue.record("expected \(fragment ?? "a frame"), got \(result)", sourceLocation: sourceLocation)
            }
        }
        let data = PeerMessageType.data.rawValue, trim = PeerMessageType.trim.rawValue
        let zeroes = PeerMessageType.zeroes.rawValue, resync = PeerMessageType.resyncData.rawValue
        let four = [UInt8](repeating: 1, count: 4)
        let page = [UInt8](repeating: 1, count: 4096)
        check(RawFrame(type: data, block: (3, 1, 4, 0), payload: four), nil)
        check(RawFrame(type: data, block: (3, 1, 5, 0), payload: four), "does not match the block")
        check(RawFrame(type: data, payloadLength: 5, block: (3, 1, 4, 0), payload: four + [0]), "does not match the block")
        check(RawFrame(type: data, block: (UInt64.max - 2, 1, 4, 0), payload: four), "overflows")
        check(RawFrame(type: data, block: (0, 1, 4, 7), payload: four), "result must be 0")
        check(RawFrame(type: data, flags: PeerFlags.Write.noHole, block: (0, 1, 4, 0), payload: four), "flags")
        check(RawFrame(type: trim, block: (0, 1, 0, 0)), "zero length")
        check(RawFrame(type: trim, block: (0, 1, 4096, 0), payload: four), "payload length 4")
        check(RawFrame(type: trim, flags: PeerFlags.Write.fua, block: (0, 1, 4096, 0)), nil)
        check(RawFrame(type: zeroes, flags: PeerFlags.Write.noHole, block: (0, 1, 4096, 0)), nil)
        check(RawFrame(type: zeroes, flags: 8, block: (0, 1, 4096, 0)), "flags")
        check(RawFrame(type: resync, block: (4096, 0, 4096, 0), payload: page), nil)
        check(RawFrame(type: resync, block: (512, 0, 4096, 0), payload: page), "aligned")
        check(RawFrame(type: resync, block: (4096, 0, 4000, 0), payload: Array(page[0..<4000])), "aligned")
        check(RawFrame(type: resync, block: (4096, 9, 4096, 0), payload: page), "epoch must be 0")
        check(RawFrame(type: resync, block: (4096, 0, 4096, 5), payload: page), "does not match the block")
        check(RawFrame(type: resync, block: (4096, 0, 4096, 5)), nil)
        check(RawFrame(type: resync, flags: PeerFlags.ResyncData.zero, block: (4096, 0, 4096, 5)), "failed read")
        check(RawFrame(type: resync, flags: PeerFlags.ResyncData.zero, block: (4096, 0, 4096, 0)), nil)
        check(RawFrame(type: resync, flags: PeerFlags.ResyncData.zero, block: (4096, 0, 4096, 0), payload: page),
              "does not match the block")
        check(RawFrame(type: resync, block: (0, 0, 64 << 20, 0)), "over the maximum")
    }

    @Test func payloadFieldsAreBounded() {
        func check(_ type: PeerMessageType, _ payload: [UInt8], _ fragment: String?, flags: UInt16 = 0, sequence: UInt64 = 1,
                   sourceLocation: SourceLocation = #_sourceLocation) {
            let frame = RawFrame(type: type.rawValue, flags: flags, sequence: type.sequenceIsZero ? 0 : sequence, payload: payload)
            let result = frame.bytes().withUnsafeBytes { PeerDecoder.decodeFrame($0) }
            switch (result, fragment) {
            case (.frame(_, let message), nil):
                #expect(message.encoded() == frame.bytes(), sourceLocation: sourceLocation)
            case (.invalid(let reason), let fragment?) where reason.contains(fragment): break
            default: Issue.record("expected \(fragment ?? "a frame"), got \(result)", sourceLocation: sourceLocation)
            }
        }
        func hello(vmin: UInt16 = 1, vmax: UInt16 = 1, granularity: UInt32 = 4096, size: UInt64 = 1 << 30,
                   node: UInt8 = 0, role: UInt8 = 1, disk: UInt8 = 5, nameLength: UInt8? = nil, name: [UInt8] = Array("r0".utf8)) -> [UInt8] {
            be(vmin) + be(vmax) + be(granularity) + be(size) + uuidBytes
                + [node, role, disk, nameLength ?? UInt8(name.count)] + name + be(UInt64(7)) + be(UInt64(1_700_000_000_000))
        }
        check(.hello, hello(), nil)
        check(.hello, hello(), nil, flags: PeerFlags.Hello.discardMyData)
        check(.hello, hello(), "flags", flags: 16)
        check(.hello, hello(vmin: 2, vmax: 1), "version range")
        check(.hello, hello(vmin: 0, vmax: 1), "version range")
        check(.hello, hello(granularity: 6144), "granularity")
        check(.hello, hello(granularity: 2048), "granularity")
        check(.hello, hello(granularity: 2 << 20), "granularity")
        check(.hello, hello(size: 1 << 30 + 512), "device size")
        check(.hello, hello(node: 32), "node id")
        check(.hello, hello(role: 2), "unknown role")
        check(.hello, hello(disk: 6), "unknown disk state")
        check(.hello, hello(nameLength: 3), "name length")
        check(.hello, hello(nameLength: 1), "name length")
        check(.hello, hello(name: Array("r 0".utf8)), "resource name")
        check(.hello, hello(name: Array("r/0".utf8)), "resource name")
        check(.hello, hello(name: [0x72, 0xC3, 0xA9]), "resource name")
        check(.hello, hello(nameLength: 0, name: []), "payload length 84")

        check(.stateChange, uuidBytes + [1, 5], nil)
        check(.stateChange, uuidBytes + [2, 5], "unknown role")
        check(.stateChange, uuidBytes + [1, 9], "unknown disk state")
        check(.stateChange, uuidBytes + [1], "payload length 49")

        check(.disconnect, be(UInt16(4)) + be(UInt16(2)) + Array("ok".utf8), nil)
        check(.disconnect, be(UInt16(4)) + be(UInt16(3)) + Array("ok".utf8), "text length")
        check(.disconnect, be(UInt16(4)) + be(UInt16(2)) + [0xC3, 0x28], "not UTF-8")
        check(.disconnect, be(UInt16(4)) + be(UInt16(300)) + [UInt8](repeating: 0x61, count: 252), "text length")

        check(.barrierAck, be(UInt64(1)) + be(UInt32(3)) + be(UInt32(0)), nil)

        let chunkHead = be(UInt64(64)) + be(UInt32(3))
        check(.bitmapChunk, chunkHead + le(UInt64(0b101)), nil)
        check(.bitmapChunk, chunkHead + le(UInt64(0b1000)), "past the bit count")
        check(.bitmapChunk, be(UInt64(65)) + be(UInt32(3)) + le(UInt64(1)), "multiple of 64")
        check(.bitmapChunk, be(UInt64(0)) + be(UInt32(0)) + le(UInt64(0)), "bit count 0")
        check(.bitmapChunk, be(UInt64(0)) + be(UInt32(65)) + le(UInt64(0)), "bytes of words")
        check(.bitmapChunk, be(UInt64(0)) + be(UInt32(3)) + le(UInt64(0)) + le(UInt64(0)), "bytes of words")
        check(.bitmapChunk, be(UInt64.max - 63) + be(UInt32(128)) + le(UInt64(0)) + le(UInt64(0)), "overflows")
        check(.bitmapChunk, be(UInt64(0)) + be(UInt32(3)) + le(UInt64(0)) + [0], "9 bytes of words")
        check(.bitmapDone, be(UInt64(10)) + be(UInt64(10)), nil)
        check(.bitmapDone, be(UInt64(10)) + be(UInt64(11)), "11 of 10")

        check(.resyncRequest, be(UInt64(8192)) + be(UInt32(4096)), nil)
        check(.resyncRequest, be(UInt64(8192)) + be(UInt32(0)), "zero length")
        check(.resyncRequest, be(UInt64(8193)) + be(UInt32(4096)), "aligned")
        check(.resyncRequest, be(UInt64(0)) + be(UInt32(64 << 20)), "over the maximum")
        check(.resyncRequest, be(UInt64.max - 4095) + be(UInt32(8192)), "overflows")
        check(.resyncAck, be(UInt64(0)) + be(UInt32(4096)) + be(UInt32(5)), nil)
        check(.resyncAck, be(UInt64(0)) + be(UInt32(100)) + be(UInt32(0)), "aligned")

        check(.verifyRequest, be(UInt64(0)) + be(UInt32(4096)) + [2], nil)
        check(.verifyRequest, be(UInt64(0)) + be(UInt32(4096)) + [3], "unknown digest algorithm")
        check(.verifyRequest, be(UInt64(0)) + be(UInt32(8 << 20)) + [2], "over the maximum")
        check(.verifyRequest, be(UInt64(0)) + be(UInt32(0)) + [2], "zero length")
        let digestHead = be(UInt64(0)) + be(UInt32(8192)) + be(UInt32(0))
        check(.verifyDigest, digestHead + [1, 4] + [UInt8](repeating: 7, count: 8), nil)
        check(.verifyDigest, digestHead + [1, 4] + [UInt8](repeating: 7, count: 4), "expected 8")
        check(.verifyDigest, digestHead + [1, 32] + [UInt8](repeating: 7, count: 64), "32-byte digests")
        check(.verifyDigest, digestHead + [2, 32] + [UInt8](repeating: 7, count: 64), nil)
        check(.verifyDigest, be(UInt64(0)) + be(UInt32(8192)) + be(UInt32(5)) + [2, 32], nil)
        check(.verifyDigest, be(UInt64(0)) + be(UInt32(8192)) + be(UInt32(5)) + [2, 32] + [UInt8](repeating: 7, count: 64),
              "expected 0")
        check(.verifyDigest, be(UInt64(0)) + be(UInt32(8192)) + be(UInt32(0)) + [2], "payload length 17")
    }

    /// Result fields carry 0 or an errno, which a receiver negates into an `Int32`: a peer that
    /// sent 0x8000_0000 in a `writeAck` made the primary trap.
    @Test func resultFieldsAreErrnos() {
        func check(_ frame: RawFrame, valid: Bool, sourceLocation: SourceLocation = #_sourceLocation) {
            let result = frame.bytes().withUnsafeBytes { PeerDecoder.decodeFrame($0) }
            switch result {
            case .frame(_, let message) where valid:
                #expect(message.encoded() == frame.bytes(), sourceLocation: sourceLocation)
            case .invalid(let reason) where !valid:
                #expect(reason.contains("not an errno"), "\(reason)", sourceLocation: sourceLocation)
            default:
                Issue.record("expected \(valid ? "a frame" : "an error"), got \(result)", sourceLocation: sourceLocation)
            }
        }
        let t = PeerMessageType.self
        for (result, valid) in [(UInt32(0), true), (5, true), (PeerProtocol.resultMax, true), (PeerProtocol.resultMax + 1, false),
                                (0x8000_0000, false), (UInt32.max, false)] {
            check(RawFrame(type: t.writeAck.rawValue, sequence: 1, payload: be(result)), valid: valid)
            check(RawFrame(type: t.flushAck.rawValue, sequence: 1, payload: be(result)), valid: valid)
            check(RawFrame(type: t.barrierAck.rawValue, payload: be(UInt64(1)) + be(UInt32(2)) + be(result)), valid: valid)
            check(RawFrame(type: t.resyncAck.rawValue, sequence: 1, payload: be(UInt64(0)) + be(UInt32(4096)) + be(result)), valid: valid)
            check(RawFrame(type: t.verifyDigest.rawValue, sequence: 1,
                           payload: be(UInt64(0)) + be(UInt32(4096)) + be(result) + [1, 4] + (result == 0 ? [1, 2, 3, 4] : [])), valid: valid)
            let page = [UInt8](repeating: 7, count: 4096)
            check(RawFrame(type: t.resyncData.rawValue, sequence: 1, block: (4096, 0, 4096, result), payload: result == 0 ? page : []),
                  valid: valid)
        }
        // Ids are the requester's to choose: any 64-bit value decodes (the state machine checks
        // what it can key), so a huge one reaches the core, not a trap in the codec.
        for id in [UInt64(1) << 63, UInt64.max] {
            check(RawFrame(type: t.writeAck.rawValue, sequence: id, payload: be(UInt32(0))), valid: true)
            check(RawFrame(type: t.resyncData.rawValue, sequence: id, block: (0, 0, 4096, 0), payload: [UInt8](repeating: 1, count: 4096)),
                  valid: true)
            check(RawFrame(type: t.verifyDigest.rawValue, sequence: id, payload: be(UInt64(0)) + be(UInt32(4096)) + be(UInt32(0)) + [1, 4, 0, 0, 0, 0]),
                  valid: true)
        }
    }

    @Test func truncatedPayloadIsRefused() {
        let frame = PeerMessage.hello(Self.hello).encoded()
        frame.withUnsafeBytes { raw in
            guard case .header(let header) = PeerDecoder.decodeHeader(raw) else {
                Issue.record("no header")
                return
            }
            let short = UnsafeRawBufferPointer(rebasing: raw[32..<raw.count - 1])
            #expect(!header.verifyPayload(short))
            guard case .invalid(let reason) = PeerMessage.decode(header: header, payload: short) else {
                Issue.record("a truncated payload decoded")
                return
            }
            #expect(reason.contains("header says"))
        }
    }

    // MARK: Fuzz

    /// 10,000 random byte strings, from pure noise to frames with a valid magic, version, type
    /// and freshly computed CRCs (so the payload validators are reached, not just the CRC).
    @Test func randomBytesNeverDecodeToAnythingButValidFrames() {
        var rng = SplitMix64(seed: 0x7A4D_3E11)
        var checker = FuzzChecker()
        let types = PeerMessageType.allCases
        for i in 0..<10_000 {
            let mode = i % 4
            var bytes = (0..<Int.random(in: 0...(i % 10 == 0 ? 600 : 160), using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if mode >= 1 && bytes.count >= 8 {
                bytes.replaceSubrange(0..<4, with: be(PeerProtocol.magic))
                bytes.replaceSubrange(4..<6, with: be(PeerProtocol.version))
                bytes.replaceSubrange(6..<8, with: be(types.randomElement(using: &rng)!.rawValue))
            }
            if mode == 3 && bytes.count >= 56 {
                // Plausible header fields: reserved 0, flags allowed, length within the type's range.
                let type = PeerMessageType(rawValue: be16(bytes, 6))!
                bytes.replaceSubrange(8..<10, with: be(UInt16.random(in: 0...0xFFFF, using: &rng) & type.allowedFlags))
                bytes.replaceSubrange(10..<12, with: [0, 0])
                let range = type.payloadBytesRange
                let length = Int.random(in: range.lowerBound...min(range.upperBound, range.lowerBound + 96), using: &rng)
                bytes.replaceSubrange(12..<16, with: be(UInt32(length)))
                if type.sequenceIsZero { bytes.replaceSubrange(16..<24, with: [UInt8](repeating: 0, count: 8)) }
                let needed = type.headerBytes + length
                if bytes.count < needed {
                    bytes += (bytes.count..<needed).map { _ in UInt8.random(in: 0...255, using: &rng) }
                }
            }
            if mode >= 2 { reseal(&bytes) }
            checker.check(bytes)
        }
        #expect(checker.failures.isEmpty, "\(checker.failures.prefix(5))")
        #expect(checker.invalid > 5_000)
    }

    /// 10,000 mutations of valid frames: bit flips, overwritten bytes and fields, truncation and
    /// extension, mostly resealed so the mutation reaches the field checks.
    @Test func mutatedFramesNeverDecodeToAnythingButValidFrames() {
        var rng = SplitMix64(seed: 0x5EED_0F_7A2D)
        var checker = FuzzChecker()
        let frames = Self.samples.map { $0.encoded() }.filter { $0.count <= 1024 }
        for _ in 0..<10_000 {
            var bytes = frames.randomElement(using: &rng)!
            for _ in 0..<Int.random(in: 1...3, using: &rng) {
                switch Int.random(in: 0..<6, using: &rng) {
                case 0:
                    let bit = Int.random(in: 0..<bytes.count * 8, using: &rng)
                    bytes[bit / 8] ^= 1 << UInt8(bit % 8)
                case 1:
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                case 2:
                    // A whole field-sized run set to an extreme or random value.
                    let width = [1, 2, 4, 8].randomElement(using: &rng)!
                    guard bytes.count >= width else { continue }
                    let at = Int.random(in: 0...(bytes.count - width), using: &rng)
                    let fill: UInt8 = [0, 0xFF, UInt8.random(in: 0...255, using: &rng)].randomElement(using: &rng)!
                    for k in at..<at + width { bytes[k] = fill }
                case 3:
                    bytes.removeLast(Int.random(in: 0...bytes.count, using: &rng))
                case 4:
                    bytes += (0..<Int.random(in: 1...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                default:
                    // Another frame's tail spliced on.
                    let other = frames.randomElement(using: &rng)!
                    let cut = Int.random(in: 0...bytes.count, using: &rng)
                    bytes = Array(bytes[0..<cut]) + Array(other[Int.random(in: 0...other.count, using: &rng)...])
                }
                if bytes.isEmpty { break }
            }
            if Int.random(in: 0..<4, using: &rng) != 0 { reseal(&bytes) }
            checker.check(bytes)
        }
        #expect(checker.failures.isEmpty, "\(checker.failures.prefix(5))")
        #expect(checker.frames > 500)
        #expect(checker.invalid > 3_000)
    }
}

// MARK: Helpers

/// Accepts a decoder answer only if it is an error, a justified needMore, or a frame that
/// re-encodes to exactly the bytes it came from (so nothing non-canonical is ever accepted).
fileprivate struct FuzzChecker {
    var failures: [String] = []
    var frames = 0
    var invalid = 0
    var needMore = 0

    mutating func check(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in
            let header = PeerDecoder.decodeHeader(raw)
            switch PeerDecoder.decodeFrame(raw) {
            case .invalid:
                invalid += 1
            case .needMore:
                needMore += 1
                switch header {
                case .needMore: if raw.count >= PeerProtocol.headerBytesMax { failures.append("needMore with \(raw.count) bytes") }
                case .header(let h): if raw.count >= h.frameBytes { failures.append("needMore on a whole \(h.type) frame") }
                case .invalid(let reason): failures.append("frame needMore but header invalid: \(reason)")
                }
            case .frame(let h, let message):
                frames += 1
                guard case .header(h) = header else { return failures.append("frame without the same header") }
                if !h.type.payloadBytesRange.contains(h.payloadLength) { failures.append("\(h.type) length out of range") }
                if h.frameBytes > PeerProtocol.frameBytesMax { failures.append("frame over the maximum") }
                if message.encoded() != Array(bytes[0..<h.frameBytes]) {
                    failures.append("\(h.type) accepted but re-encodes differently: \(bytes.prefix(80))")
                }
            }
        }
    }
}

/// Recomputes both CRCs of whatever frame `bytes` starts with, as far as the bytes reach.
fileprivate func reseal(_ bytes: inout [UInt8]) {
    guard bytes.count >= 32 else { return }
    let headerBytes = PeerMessageType(rawValue: be16(bytes, 6))?.headerBytes ?? 32
    guard bytes.count >= headerBytes else { return }
    let length = Int(be32(bytes, 12))
    if bytes.count - headerBytes >= length {
        let crc = length == 0 ? 0 : TestCRC.checksum(Array(bytes[headerBytes..<headerBytes + length]))
        bytes.replaceSubrange(28..<32, with: be(crc))
    }
    bytes.replaceSubrange(24..<28, with: [0, 0, 0, 0])
    bytes.replaceSubrange(24..<28, with: be(TestCRC.checksum(Array(bytes[0..<headerBytes]))))
}

/// A frame built field by field, for frames the encoder refuses to produce.
fileprivate struct RawFrame {
    var magic = PeerProtocol.magic
    var version = PeerProtocol.version
    var type: UInt16
    var flags: UInt16 = 0
    var reserved: UInt16 = 0
    var payloadLength: UInt32?
    var sequence: UInt64 = 0
    var payloadCRC: UInt32?
    var block: (offset: UInt64, epoch: UInt64, length: UInt32, result: UInt32)?
    var payload: [UInt8] = []

    func bytes() -> [UInt8] {
        var out = be(magic) + be(version) + be(type) + be(flags) + be(reserved)
        out += be(payloadLength ?? UInt32(payload.count)) + be(sequence) + be(UInt32(0))
        out += be(payloadCRC ?? (payload.isEmpty ? 0 : TestCRC.checksum(payload)))
        if let block { out += be(block.offset) + be(block.epoch) + be(block.length) + be(block.result) }
        out.replaceSubrange(24..<28, with: be(TestCRC.checksum(out)))
        return out + payload
    }
}

/// Bitwise CRC-32C written from the definition (reflected 0x1EDC6F41), apart from the codec's.
fileprivate enum TestCRC {
    static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        }
        return ~crc
    }
}


/// Generation UUIDs on the wire (current 9, bitmap 0, no history).
fileprivate let uuidBytes = be(UInt64(9)) + be(UInt64(0)) + [UInt8](repeating: 0, count: 32)

fileprivate func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<T.bitWidth / 8).reversed().map { UInt8(truncatingIfNeeded: value >> ($0 * 8)) }
}

fileprivate func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<T.bitWidth / 8).map { UInt8(truncatingIfNeeded: value >> ($0 * 8)) }
}

fileprivate func be16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
fileprivate func be32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(b[at + $1]) } }
fileprivate func be64(_ b: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(b[at + $1]) } }
