import Testing
import TandemCore
@testable import TandemNBD

/// Seeded fuzz of what a hostile or broken NBD client can send: whole handshakes built from valid
/// options and then mutated, fed to the state machine at once and in random pieces, and the
/// request headers. The properties are the ones the server relies on: the machine
/// never consumes bytes it was not given, it answers the same whatever the chunking, every reply
/// it sends is well-formed and names the option it answers, a session it settles is one the
/// export allows, and a request it validates stays inside the export.
struct NBDFuzzTests {
    static let bitmaps = [NBDDirtyBitmap(name: "b1", key: 11), NBDDirtyBitmap(name: "nightly", key: 12)]

    static func export(readOnly: Bool) -> NBDExport {
        var export = NBDExport(name: "disk", description: "fuzzed", size: 64 << 20, readOnly: readOnly,
                               blockSizeMin: 4096, blockSizePreferred: 4096, blockSizeMax: 32 << 20)
        export.dirtyBitmaps = bitmaps
        return export
    }

    @Test func mutatedHandshakesAnswerTheSameInAnyPiecesAndOnlyWellFormed() {
        var rng = SplitMix64(seed: 0x4E42_445F_F022)
        var failures: [String] = []
        var outcomes = (transmission: 0, closed: 0, needMore: 0, tls: 0)
        for i in 0..<4000 {
            let tls: NBDTLSMode = i % 5 == 4 ? .forced : .none
            let readOnly = i % 3 == 2
            var stream = Self.session(&rng)
            if i % 8 != 0 { Self.mutate(&stream, &rng) }
            let whole = Self.run(stream, tls: tls, readOnly: readOnly, pieces: [stream.count])
            var pieces: [Int] = []
            var left = stream.count
            while left > 0 {
                let n = min(left, [1, 2, 3, 7, 16, 29, 64, 500].randomElement(using: &rng)!)
                pieces.append(n)
                left -= n
            }
            let chunked = Self.run(stream, tls: tls, readOnly: readOnly, pieces: pieces)
            if whole.events != chunked.events {
                failures.append("stream \(i): \(whole.events.count) events whole, \(chunked.events.count) in pieces")
            }
            failures += whole.failures.map { "stream \(i): \($0)" } + chunked.failures.map { "stream \(i) in pieces: \($0)" }
            switch whole.events.last {
            case .transmission?: outcomes.transmission += 1
            case .close?: outcomes.closed += 1
            default: outcomes.needMore += 1
            }
            if whole.events.contains(.startTLS) { outcomes.tls += 1 }
            if failures.count > 20 { break }
        }
        #expect(failures.isEmpty, "\(failures.prefix(10))")
        // The fuzz reaches every ending, so the checks above ran on each kind of answer.
        // (seed 0x4E42_445F_F022: 381 sessions entered transmission, 3130 closed, 489 wanted more
        // bytes, 93 started TLS)
        #expect(outcomes.transmission > 200)
        #expect(outcomes.closed > 1500)
        #expect(outcomes.needMore > 200)
        #expect(outcomes.tls > 40)
    }

    /// Random request headers, biased to the edges (end of the export, the largest payload,
    /// overflowing offsets, unaligned values, every flag): whatever `validate` accepts touches
    /// only the export, carries at most the largest payload, and never writes a read-only one.
    @Test func validatedRequestsStayInsideTheExport() {
        var rng = SplitMix64(seed: 0xB10C_5EED)
        var failures: [String] = []
        var accepted = 0
        for i in 0..<200_000 {
            let export = Self.export(readOnly: i % 4 == 3)
            let structured = i % 2 == 0
            let contexts = i % 3 == 0 ? [] : [NBDMetaContext(id: 1, name: NBD.baseAllocationName, kind: .baseAllocation)]
            let session = NBDSession(export: export, structuredReplies: structured, contexts: contexts,
                                     transmissionFlags: export.transmissionFlags(structuredReplies: structured))
            let request = NBDRequest(flags: Self.edgy16(&rng), type: UInt16.random(in: 0...12, using: &rng),
                                     cookie: rng.next(), offset: Self.edgyOffset(&rng, export), length: Self.edgyLength(&rng, export))
            guard NBDTransmission.validate(request, session) == .ok else { continue }
            accepted += 1
            guard let command = request.command else {
                failures.append("unknown type \(request.type) accepted")
                continue
            }
            let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
            switch command {
            case .read, .write, .writeZeroes, .trim, .cache, .blockStatus:
                if overflow || end > export.size { failures.append("\(command) \(request.offset)+\(request.length) past \(export.size)") }
            case .flush, .disconnect:
                break
            }
            if (command == .read || command == .write) && (request.length == 0 || request.length > export.blockSizeMax) {
                failures.append("\(command) of \(request.length) bytes accepted")
            }
            if (command == .read || command == .write) && (request.offset | UInt64(request.length)) % UInt64(export.blockSizeMin) != 0 {
                failures.append("unaligned \(command) accepted")
            }
            if export.readOnly && (command == .write || command == .writeZeroes || command == .trim) {
                failures.append("\(command) accepted on a read-only export")
            }
            if command == .blockStatus && contexts.isEmpty { failures.append("BLOCK_STATUS without a context accepted") }
            if request.has(NBD.CommandFlag.dontFragment) && !structured { failures.append("DF accepted without structured replies") }
            if failures.count > 20 { break }
        }
        #expect(failures.isEmpty, "\(failures.prefix(10))")
        #expect(accepted > 5_000)
    }

    // MARK: Driving the machine

    enum Event: Equatable {
        case consumed(Int)
        case send([UInt8])
        case startTLS
        case transmission(NBDSession, [UInt8])
        case close([UInt8])
    }

    struct Outcome {
        var events: [Event] = []
        var failures: [String] = []
    }

    /// Feeds `stream` in `pieces` until the machine closes, enters transmission, or wants bytes
    /// the stream does not have; records what it did and checks every answer.
    static func run(_ stream: [UInt8], tls: NBDTLSMode, readOnly: Bool, pieces: [Int]) -> Outcome {
        let export = export(readOnly: readOnly)
        var machine = NBDHandshake(exports: [export], tlsMode: tls)
        var outcome = Outcome()
        var pending: [UInt8] = []
        var fed = 0
        var consumedTotal = 0
        var lastOption: UInt32?
        // Bounded: every turn either consumes bytes or takes the next piece.
        var pieceIndex = 0
        var turns = 0
        while turns < 100_000 {
            turns += 1
            let (consumed, action) = pending.withUnsafeBytes { machine.receive($0) }
            if consumed < 0 || consumed > pending.count {
                outcome.failures.append("consumed \(consumed) of \(pending.count) bytes")
                return outcome
            }
            if consumed > 0 {
                // The option the machine answers is the one it just consumed (the first 4 bytes
                // of a stream are the client flags).
                if consumedTotal > 0 && consumed >= 16 { lastOption = UInt32(pending[8]) << 24 | UInt32(pending[9]) << 16 | UInt32(pending[10]) << 8 | UInt32(pending[11]) }
                pending.removeFirst(consumed)
                consumedTotal += consumed
                outcome.events.append(.consumed(consumedTotal))
            }
            switch action {
            case .needMore:
                if consumed > 0 { continue }
                guard pieceIndex < pieces.count else { return outcome }
                pending += stream[fed..<fed + pieces[pieceIndex]]
                fed += pieces[pieceIndex]
                pieceIndex += 1
            case .send(let bytes):
                outcome.events.append(.send(bytes))
                checkReplies(bytes, option: lastOption, &outcome)
            case .sendThenStartTLS(let bytes):
                outcome.events.append(.startTLS)
                checkReplies(bytes, option: lastOption, &outcome)
                if lastOption != NBD.Option.startTLS.rawValue { outcome.failures.append("TLS started by option \(String(describing: lastOption))") }
                // The client's plaintext after STARTTLS stands in for what it sends inside TLS.
                machine.tlsEstablished()
            case .enterTransmission(let bytes, let session):
                outcome.events.append(.transmission(session, bytes))
                checkSession(session, export: export, tlsUp: machine.isTLSUp, tls: tls, &outcome)
                if lastOption == NBD.Option.exportName.rawValue {
                    if bytes.count != 10 && bytes.count != 134 { outcome.failures.append("EXPORT_NAME answer of \(bytes.count) bytes") }
                } else {
                    checkReplies(bytes, option: lastOption, &outcome)
                }
                return outcome
            case .close(let bytes, _):
                outcome.events.append(.close(bytes))
                checkReplies(bytes, option: lastOption, &outcome)
                return outcome
            }
        }
        outcome.failures.append("no end after \(turns) turns")
        return outcome
    }

    /// Option replies (proto.md "Option reply"): magic, the option answered, type, length, data;
    /// the bytes must split into whole replies exactly.
    static func checkReplies(_ bytes: [UInt8], option: UInt32?, _ outcome: inout Outcome) {
        var at = 0
        while at < bytes.count {
            guard bytes.count - at >= 20 else {
                outcome.failures.append("\(bytes.count - at) stray bytes after the replies")
                return
            }
            let magic = be64(bytes, at)
            let answered = be32(bytes, at + 8)
            let length = Int(be32(bytes, at + 16))
            if magic != NBD.optionReplyMagic { outcome.failures.append("reply magic \(magic)") }
            if let option, answered != option { outcome.failures.append("reply names option \(answered), answers \(option)") }
            guard at + 20 + length <= bytes.count else {
                outcome.failures.append("reply length \(length) past its \(bytes.count - at - 20) bytes")
                return
            }
            at += 20 + length
        }
    }

    static func checkSession(_ session: NBDSession, export: NBDExport, tlsUp: Bool, tls: NBDTLSMode, _ outcome: inout Outcome) {
        if session.export != export { outcome.failures.append("session for another export") }
        if tls == .forced && !tlsUp { outcome.failures.append("transmission without TLS on a TLS-only export") }
        if !session.structuredReplies && !session.contexts.isEmpty { outcome.failures.append("meta contexts without structured replies") }
        let offered = [NBD.baseAllocationName] + bitmaps.map { NBD.dirtyBitmapPrefix + $0.name }
        for context in session.contexts where !offered.contains(context.name) {
            outcome.failures.append("context \(context.name) not offered")
        }
        if Set(session.contexts.map(\.id)).count != session.contexts.count { outcome.failures.append("context ids repeat") }
        if session.transmissionFlags != export.transmissionFlags(structuredReplies: session.structuredReplies) {
            outcome.failures.append("transmission flags \(session.transmissionFlags)")
        }
    }

    // MARK: Streams

    /// Client flags, up to six options, usually an ending (GO, EXPORT_NAME or ABORT), then a
    /// few request headers.
    static func session(_ rng: inout SplitMix64) -> [UInt8] {
        var out = be(UInt32([3, 3, 3, 1, 2, 0].randomElement(using: &rng)!))
        for _ in 0..<Int.random(in: 0...6, using: &rng) {
            out += option([0, 1, 2, 2, 3, 4, 4, 5, 9, 9].randomElement(using: &rng)!, &rng)
        }
        switch Int.random(in: 0..<10, using: &rng) {
        case 0..<6: out += option(6, &rng)  // GO
        case 6..<8: out += option(7, &rng)  // EXPORT_NAME
        case 8: out += option(8, &rng)      // ABORT
        default: break
        }
        for _ in 0..<Int.random(in: 0...3, using: &rng) {
            out += be(NBD.requestMagic) + be(UInt16.random(in: 0...3, using: &rng)) + be(UInt16.random(in: 0...7, using: &rng))
                + be(rng.next()) + be(UInt64.random(in: 0...16, using: &rng) * 4096) + be(UInt32(4096))
        }
        return out
    }

    static func option(_ kind: Int, _ rng: inout SplitMix64) -> [UInt8] {
        let names = ["", "disk", "other", String(repeating: "x", count: 300)]
        let name = names.randomElement(using: &rng)!
        let queries = ["", "base:", NBD.baseAllocationName, "qemu:", NBD.dirtyBitmapPrefix, NBD.dirtyBitmapPrefix + "b1",
                       NBD.dirtyBitmapPrefix + "nightly", NBD.dirtyBitmapPrefix + "gone", "base:allocation:x", "unknown:thing"]
        func metaContext() -> [UInt8] {
            var data = be(UInt32(name.utf8.count)) + Array(name.utf8)
            let chosen = (0..<Int.random(in: 0...4, using: &rng)).map { _ in queries.randomElement(using: &rng)! }
            data += be(UInt32(chosen.count))
            for q in chosen { data += be(UInt32(q.utf8.count)) + Array(q.utf8) }
            return data
        }
        func nameAndInfos() -> [UInt8] {
            var data = be(UInt32(name.utf8.count)) + Array(name.utf8)
            let infos = (0..<Int.random(in: 0...3, using: &rng)).map { _ in UInt16.random(in: 0...4, using: &rng) }
            data += be(UInt16(infos.count))
            for info in infos { data += be(info) }
            return data
        }
        switch kind {
        case 0: return header(NBD.Option.list.rawValue, [])
        case 1: return header(NBD.Option.structuredReply.rawValue, [])
        case 2: return header(NBD.Option.setMetaContext.rawValue, metaContext())
        case 3: return header(NBD.Option.listMetaContext.rawValue, metaContext())
        case 4: return header(NBD.Option.info.rawValue, nameAndInfos())
        case 5: return header(NBD.Option.startTLS.rawValue, [])
        case 6: return header(NBD.Option.go.rawValue, nameAndInfos())
        case 7: return header(NBD.Option.exportName.rawValue, Array(name.utf8))
        case 8: return header(NBD.Option.abort.rawValue, [])
        default: return header(UInt32.random(in: 0...12, using: &rng), [])
        }
    }

    static func header(_ code: UInt32, _ data: [UInt8]) -> [UInt8] {
        be(NBD.optionMagic) + be(code) + be(UInt32(data.count)) + data
    }

    /// One to three changes: a flipped bit, an overwritten byte, a field-sized run set to an
    /// extreme, a cut, random bytes inserted, or a part repeated.
    static func mutate(_ bytes: inout [UInt8], _ rng: inout SplitMix64) {
        for _ in 0..<Int.random(in: 1...3, using: &rng) {
            guard !bytes.isEmpty else { return }
            switch Int.random(in: 0..<6, using: &rng) {
            case 0:
                let bit = Int.random(in: 0..<bytes.count * 8, using: &rng)
                bytes[bit / 8] ^= 1 << UInt8(bit % 8)
            case 1:
                bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            case 2:
                let width = [1, 2, 4, 8].randomElement(using: &rng)!
                guard bytes.count >= width else { continue }
                let at = Int.random(in: 0...(bytes.count - width), using: &rng)
                let fill: UInt8 = [0, 0xFF, 0x7F, UInt8.random(in: 0...255, using: &rng)].randomElement(using: &rng)!
                for k in at..<at + width { bytes[k] = fill }
            case 3:
                bytes.removeLast(Int.random(in: 0...bytes.count, using: &rng))
            case 4:
                let at = Int.random(in: 0...bytes.count, using: &rng)
                bytes.insert(contentsOf: (0..<Int.random(in: 1...32, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }, at: at)
            default:
                let from = Int.random(in: 0..<bytes.count, using: &rng)
                let to = Int.random(in: from...bytes.count, using: &rng)
                bytes.insert(contentsOf: bytes[from..<to], at: Int.random(in: 0...bytes.count, using: &rng))
            }
        }
    }

    static func edgy16(_ rng: inout SplitMix64) -> UInt16 {
        Int.random(in: 0..<4, using: &rng) == 0 ? UInt16.random(in: 0...0xFFFF, using: &rng) : UInt16(1) << UInt16.random(in: 0...5, using: &rng) & 0x1F
    }

    static func edgyOffset(_ rng: inout SplitMix64, _ export: NBDExport) -> UInt64 {
        switch Int.random(in: 0..<6, using: &rng) {
        case 0: return 0
        case 1: return export.size - UInt64.random(in: 0...3, using: &rng) * 4096
        case 2: return export.size + UInt64.random(in: 0...4096, using: &rng)
        case 3: return UInt64.max - UInt64.random(in: 0...(64 << 20), using: &rng)
        case 4: return UInt64.random(in: 0..<(export.size / 4096), using: &rng) * 4096 + (Bool.random(using: &rng) ? 0 : 512)
        default: return rng.next()
        }
    }

    static func edgyLength(_ rng: inout SplitMix64, _ export: NBDExport) -> UInt32 {
        switch Int.random(in: 0..<6, using: &rng) {
        case 0: return 0
        case 1: return export.blockSizeMax + UInt32.random(in: 0...1, using: &rng) * 4096
        case 2: return UInt32.random(in: 1...8, using: &rng) * 4096
        case 3: return UInt32.max - UInt32.random(in: 0...4096, using: &rng)
        case 4: return UInt32.random(in: 1...(1 << 20), using: &rng)
        default: return UInt32.random(in: 0...UInt32.max, using: &rng)
        }
    }
}

private func be(_ value: UInt16) -> [UInt8] { [UInt8(value >> 8), UInt8(value & 0xFF)] }
private func be(_ value: UInt32) -> [UInt8] { be(UInt16(value >> 16)) + be(UInt16(value & 0xFFFF)) }
private func be(_ value: UInt64) -> [UInt8] { be(UInt32(value >> 32)) + be(UInt32(value & 0xFFFF_FFFF)) }

private func be32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
    bytes[at..<at + 4].reduce(0) { $0 << 8 | UInt32($1) }
}

private func be64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
    bytes[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) }
}
