import Testing
import TandemCore

@Suite struct DiffStreamTests {
    static let geometry = try! UndoGeometry(deviceBytes: 3 * 8192 + 4096, chunkBytes: 8192)
    static let from = BarrierInfo(id: 3, createdUnixSeconds: 100, label: "before")
    static let to = BarrierInfo(id: 9, createdUnixSeconds: 200, label: "après")

    /// A stream of (chunk, base fill, new fill).
    static func stream(full: Bool = false, _ chunks: [(UInt64, UInt8, UInt8)]) -> [UInt8] {
        var writer = DiffStreamWriter(header: DiffStreamHeader(geometry: geometry, from: full ? nil : from, to: to))
        var bytes = writer.headerBytes()
        for (chunk, base, new) in chunks {
            let length = geometry.length(ofChunk: chunk)
            let data = [UInt8](repeating: new, count: length)
            let baseCRC = CRC32C.checksum([UInt8](repeating: base, count: length))
            bytes += data.withUnsafeBytes { writer.chunkHeader(offset: geometry.offset(ofChunk: chunk), data: $0, baseChecksum: baseCRC) }
            bytes += data
        }
        return bytes + writer.trailerBytes()
    }

    /// Reads a whole stream; nil when it ends early (torn), the events otherwise.
    static func read(_ bytes: [UInt8]) throws(DiffStreamError) -> [DiffStreamReader.Event]? {
        var reader = DiffStreamReader()
        var events: [DiffStreamReader.Event] = []
        var at = 0
        while let want = reader.next {
            guard at + want <= bytes.count else { return nil }
            let result = bytes.withUnsafeBytes { raw in
                Result { () throws(DiffStreamError) in try reader.feed(UnsafeRawBufferPointer(rebasing: raw[at..<at + want])) }
            }
            events.append(try result.get())
            at += want
        }
        guard at == bytes.count else { throw DiffStreamError(offset: UInt64(at), message: "bytes after the trailer") }
        return events
    }

    @Test func roundTrip() throws {
        let bytes = Self.stream([(0, 1, 2), (3, 5, 6)])
        #expect(bytes.count == 256 + 32 + 8192 + 32 + 4096 + 32)
        let events = try #require(try Self.read(bytes))
        guard case .header(let header) = events[0] else { Issue.record("\(events[0])"); return }
        #expect(header.from == Self.from && header.to == Self.to && header.geometry == Self.geometry && !header.isFull)
        guard case .chunkData(let last) = events[4], case .end(let trailer) = events[5] else { Issue.record("\(events)"); return }
        #expect(last.offset == 3 * 8192 && last.length == 4096 && last.baseChecksum == CRC32C.checksum([UInt8](repeating: 5, count: 4096)))
        #expect(trailer.chunkCount == 2 && trailer.dataBytes == 8192 + 4096)
    }

    @Test func fullStream() throws {
        let events = try #require(try Self.read(Self.stream(full: true, [(0, 0, 1), (1, 0, 2), (2, 0, 3), (3, 0, 4)])))
        guard case .header(let header) = events[0], case .chunkHeader(let entry) = events[1] else { Issue.record("\(events)"); return }
        #expect(header.isFull && header.from == nil && entry.baseChecksum == 0)
        #expect(DiffStreamReader.decide(entry, full: true, targetChecksum: 12345) == .write)
    }

    @Test func emptyStream() throws {
        let events = try #require(try Self.read(Self.stream([])))
        #expect(events.count == 2)
    }

    @Test func applyDecisions() {
        let entry = DiffChunkHeader(offset: 0, length: 8192, baseChecksum: 1, newChecksum: 2)
        #expect(DiffStreamReader.decide(entry, full: false, targetChecksum: 1) == .write)
        #expect(DiffStreamReader.decide(entry, full: false, targetChecksum: 2) == .alreadyApplied)
        #expect(DiffStreamReader.decide(entry, full: false, targetChecksum: 3) == .wrongBase)
    }

    /// Cut anywhere, the stream never reads as complete.
    @Test func tornAtEveryByte() throws {
        let bytes = Self.stream([(1, 1, 2), (3, 5, 6)])
        for cut in 0..<bytes.count {
            do {
                #expect(try Self.read(Array(bytes[0..<cut])) == nil, "cut \(cut) read as complete")
            } catch {
                // A cut inside the trailer's place can also read as a damaged entry header: fine.
            }
        }
        #expect(try Self.read(bytes) != nil)
    }

    /// Every byte is covered by a check: one flipped bit anywhere is refused.
    @Test func damageAtEveryByteIsRefused() {
        let bytes = Self.stream([(1, 1, 2), (3, 5, 6)])
        for i in 0..<bytes.count {
            var bad = bytes
            bad[i] ^= 0x04
            #expect(throws: DiffStreamError.self, "byte \(i)") { _ = try Self.read(bad) }
        }
        #expect(throws: DiffStreamError.self) { _ = try Self.read(bytes + [0]) }
    }

    @Test func outOfOrderAndDuplicateChunksAreRefused() {
        // The writer refuses them (precondition); build one by hand from two streams.
        let one = Self.stream([(2, 1, 2)])
        let entry = Array(one[256..<(256 + 32 + 8192)])
        var writerless = Array(one[0..<256]) + entry + entry
        var crc = CRC32C()
        writerless.withUnsafeBytes { crc.update($0) }
        var trailer = [UInt8](repeating: 0, count: 32)
        trailer.withUnsafeMutableBytes { DiffStreamTrailer(chunkCount: 2, dataBytes: 2 * 8192, streamChecksum: crc.value).encode(into: $0) }
        writerless += trailer
        #expect(throws: DiffStreamError.self) { _ = try Self.read(writerless) }
    }
}
