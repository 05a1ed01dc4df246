import Testing
import TandemCore
@testable import TandemNBD

/// Drives the handshake state machine with bytes, as a client would, with no sockets.
struct HandshakeDriver {
    var machine: NBDHandshake
    var pending: [UInt8] = []

    init(tls: NBDTLSMode = .none, readOnly: Bool = false, dirtyBitmaps: [NBDDirtyBitmap] = []) {
        var export = NBDExport(name: "disk", description: "test disk", size: 1 << 20, readOnly: readOnly, blockSizeMin: 512, blockSizeMax: 32 << 20)
        export.dirtyBitmaps = dirtyBitmaps
        machine = NBDHandshake(exports: [export], tlsMode: tls)
    }

    /// Feeds bytes (optionally one at a time) and collects every action until `.needMore`.
    mutating func feed(_ bytes: [UInt8], byteByByte: Bool = false) -> [NBDHandshake.Action] {
        var actions: [NBDHandshake.Action] = []
        let chunks: [[UInt8]] = byteByByte ? bytes.map { [$0] } : [bytes]
        for chunk in chunks {
            pending += chunk
            while true {
                let (consumed, action) = pending.withUnsafeBytes { machine.receive($0) }
                pending.removeFirst(consumed)
                if action == .needMore {
                    if consumed == 0 { break }
                    continue
                }
                actions.append(action)
                if case .close = action { return actions }
                if case .enterTransmission = action { return actions }
                if case .sendThenStartTLS = action { return actions }
            }
        }
        return actions
    }

    static func clientFlags(_ flags: UInt32 = 3) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(flags)
        return out
    }

    static func option(_ code: UInt32, _ data: [UInt8] = [], magic: UInt64 = NBD.optionMagic) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(magic)
        out.appendBE(code)
        out.appendBE(UInt32(data.count))
        return out + data
    }

    static func nameAndInfos(_ name: String, _ infos: [UInt16] = [NBD.Info.blockSize]) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(UInt32(name.utf8.count))
        out += Array(name.utf8)
        out.appendBE(UInt16(infos.count))
        for i in infos { out.appendBE(i) }
        return out
    }

    static func metaQuery(_ name: String, _ queries: [String]) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(UInt32(name.utf8.count))
        out += Array(name.utf8)
        out.appendBE(UInt32(queries.count))
        for q in queries {
            out.appendBE(UInt32(q.utf8.count))
            out += Array(q.utf8)
        }
        return out
    }
}

/// Splits concatenated option replies into (option, type, data).
func parseReplies(_ bytes: [UInt8]) -> [(option: UInt32, type: UInt32, data: [UInt8])] {
    var out: [(UInt32, UInt32, [UInt8])] = []
    bytes.withUnsafeBytes { raw in
        var r = ByteReader(raw)
        while r.remaining > 0 {
            #expect(r.u64() == NBD.optionReplyMagic)
            let option = r.u32()!, type = r.u32()!, length = r.u32()!
            out.append((option, type, Array(r.bytes(Int(length))!)))
        }
    }
    return out
}

@Suite struct NBDHandshakeTests {
    @Test func greetingIsFixedNewstyleWithNoZeroes() {
        let g = NBDHandshake.greeting()
        #expect(g.count == 18)
        #expect(Array(g[0..<8]) == Array("NBDMAGIC".utf8))
        #expect(Array(g[8..<16]) == Array("IHAVEOPT".utf8))
        #expect(g[16] == 0 && g[17] == 3)
    }

    @Test func refusesOldstyleAndUnknownClientFlags() {
        var d = HandshakeDriver()
        guard case .close = d.feed(HandshakeDriver.clientFlags(0)).first else { Issue.record("no close"); return }
        var e = HandshakeDriver()
        guard case .close(_, let reason) = e.feed(HandshakeDriver.clientFlags(1 | 8)).first else { Issue.record("no close"); return }
        #expect(reason.contains("unknown client flags"))
    }

    @Test func goSettlesTheDefaultExportWithBlockSizes() {
        var d = HandshakeDriver()
        let actions = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.go.rawValue, HandshakeDriver.nameAndInfos("", [NBD.Info.blockSize, NBD.Info.name])))
        guard case .enterTransmission(let bytes, let session) = actions.last else { Issue.record("not in transmission: \(actions)"); return }
        #expect(session.export.name == "disk")
        #expect(!session.structuredReplies)
        let replies = parseReplies(bytes)
        #expect(replies.last?.type == NBD.Reply.ack)
        let infos = replies.filter { $0.type == NBD.Reply.info }.map { UInt16($0.data[0]) << 8 | UInt16($0.data[1]) }
        #expect(infos.contains(NBD.Info.export) && infos.contains(NBD.Info.blockSize) && infos.contains(NBD.Info.name))
        let block = replies.first { $0.type == NBD.Reply.info && $0.data[1] == 3 }!.data
        #expect(block == [0, 3, 0, 0, 2, 0, 0, 0, 16, 0, 2, 0, 0, 0])
        let export = replies.first { $0.type == NBD.Reply.info && $0.data[1] == 0 }!.data
        let flags = UInt16(export[10]) << 8 | UInt16(export[11])
        #expect(flags & NBD.TransmissionFlag.hasFlags != 0)
        #expect(flags & NBD.TransmissionFlag.canMultiConn != 0)
        #expect(flags & NBD.TransmissionFlag.sendDF == 0, "DF needs structured replies")
    }

    @Test func sameResultFedByteByByte() {
        let input = HandshakeDriver.clientFlags()
            + HandshakeDriver.option(NBD.Option.structuredReply.rawValue)
            + HandshakeDriver.option(NBD.Option.setMetaContext.rawValue, HandshakeDriver.metaQuery("disk", ["base:allocation"]))
            + HandshakeDriver.option(NBD.Option.go.rawValue, HandshakeDriver.nameAndInfos("disk"))
        var whole = HandshakeDriver()
        var split = HandshakeDriver()
        let a = whole.feed(input)
        let b = split.feed(input, byteByByte: true)
        #expect(a == b)
        guard case .enterTransmission(_, let session) = a.last else { Issue.record("no transmission"); return }
        #expect(session.structuredReplies && session.contexts.map(\.kind) == [.baseAllocation])
        #expect(session.transmissionFlags & NBD.TransmissionFlag.sendDF != 0)
    }

    @Test func unknownOptionIsUnsupportedAndNegotiationGoesOn() {
        var d = HandshakeDriver()
        let actions = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(48, [1, 2, 3]) + HandshakeDriver.option(NBD.Option.go.rawValue, HandshakeDriver.nameAndInfos("disk")))
        guard case .send(let bytes) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(bytes).first?.type == NBD.Reply.errUnsupported)
        guard case .enterTransmission = actions.last else { Issue.record("no transmission"); return }
    }

    @Test func unknownExportAndMalformedInfo() {
        var d = HandshakeDriver()
        var actions = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.info.rawValue, HandshakeDriver.nameAndInfos("nope")))
        guard case .send(let bytes) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(bytes).first?.type == NBD.Reply.errUnknown)
        actions = d.feed(HandshakeDriver.option(NBD.Option.info.rawValue, [0, 0, 0, 9, 1]))
        guard case .send(let bytes2) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(bytes2).first?.type == NBD.Reply.errInvalid)
    }

    @Test func listAndMetaContextRules() {
        var d = HandshakeDriver()
        var actions = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.list.rawValue))
        guard case .send(let list) = actions.first else { Issue.record("no list"); return }
        let replies = parseReplies(list)
        #expect(replies.map(\.type) == [NBD.Reply.server, NBD.Reply.ack])
        #expect(Array(replies[0].data[4...]) == Array("disktest disk".utf8))
        actions = d.feed(HandshakeDriver.option(NBD.Option.setMetaContext.rawValue, HandshakeDriver.metaQuery("disk", ["base:allocation"])))
        guard case .send(let early) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(early).first?.type == NBD.Reply.errInvalid, "SET_META_CONTEXT needs structured replies")
        actions = d.feed(HandshakeDriver.option(NBD.Option.listMetaContext.rawValue, HandshakeDriver.metaQuery("disk", [])))
        guard case .send(let all) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(all).map(\.type) == [NBD.Reply.metaContext, NBD.Reply.ack])
        actions = d.feed(HandshakeDriver.option(NBD.Option.listMetaContext.rawValue, HandshakeDriver.metaQuery("disk", ["qemu:dirty-bitmap:x"])))
        guard case .send(let none) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(none).map(\.type) == [NBD.Reply.ack])
    }

    /// qemu-nbd's conventions for changed-block bitmaps: `qemu:dirty-bitmap:NAME` contexts,
    /// listed by a bare LIST and by the `qemu:` and `qemu:dirty-bitmap:` wildcards.
    @Test func dirtyBitmapContextsAreListedAndSelected() {
        var d = HandshakeDriver(dirtyBitmaps: [NBDDirtyBitmap(name: "17", key: 17), NBDDirtyBitmap(name: "nightly", key: 17), NBDDirtyBitmap(name: "20", key: 20)])
        func names(_ action: NBDHandshake.Action?) -> [String] {
            guard case .send(let bytes) = action else { Issue.record("no reply: \(String(describing: action))"); return [] }
            let replies = parseReplies(bytes)
            #expect(replies.last?.type == NBD.Reply.ack)
            return replies.filter { $0.type == NBD.Reply.metaContext }.map { String(decoding: $0.data[4...], as: UTF8.self) }
        }
        func ids(_ action: NBDHandshake.Action?) -> [UInt32] {
            guard case .send(let bytes) = action else { return [] }
            return parseReplies(bytes).filter { $0.type == NBD.Reply.metaContext }.map { $0.data[0..<4].reduce(0) { $0 << 8 | UInt32($1) } }
        }
        _ = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.structuredReply.rawValue))
        let list = { (queries: [String]) in d.feed(HandshakeDriver.option(NBD.Option.listMetaContext.rawValue, HandshakeDriver.metaQuery("disk", queries))).first }
        let all = list([])
        #expect(names(all) == ["base:allocation", "qemu:dirty-bitmap:17", "qemu:dirty-bitmap:nightly", "qemu:dirty-bitmap:20"])
        #expect(ids(all).allSatisfy { $0 == 0 }, "LIST ids are reserved: zero")
        #expect(names(list(["qemu:"])) == ["qemu:dirty-bitmap:17", "qemu:dirty-bitmap:nightly", "qemu:dirty-bitmap:20"])
        #expect(names(list(["qemu:dirty-bitmap:", "base:"])) == ["qemu:dirty-bitmap:17", "qemu:dirty-bitmap:nightly", "qemu:dirty-bitmap:20", "base:allocation"])
        #expect(names(list(["qemu:dirty-bitmap:20", "qemu:dirty-bitmap:99", "x-other:thing"])) == ["qemu:dirty-bitmap:20"])
        // SET: exact names only, duplicates once, ids 1 for base:allocation and 2... for bitmaps.
        let set = d.feed(HandshakeDriver.option(NBD.Option.setMetaContext.rawValue, HandshakeDriver.metaQuery("disk", [
            "qemu:dirty-bitmap:nightly", "qemu:dirty-bitmap:", "base:allocation", "qemu:dirty-bitmap:20", "qemu:dirty-bitmap:nightly", "qemu:dirty-bitmap:5",
        ]))).first
        #expect(names(set) == ["qemu:dirty-bitmap:nightly", "base:allocation", "qemu:dirty-bitmap:20"])
        #expect(ids(set) == [2, 1, 3])
        guard case .enterTransmission(_, let session) = d.feed(HandshakeDriver.option(NBD.Option.go.rawValue, HandshakeDriver.nameAndInfos("disk"))).last else {
            Issue.record("no transmission"); return
        }
        #expect(session.contexts.map(\.kind) == [.dirtyBitmap(key: 17), .baseAllocation, .dirtyBitmap(key: 20)])
        #expect(session.contexts.map(\.id) == [2, 1, 3])
    }

    @Test func aFailedSetMetaContextClearsTheSelection() {
        var d = HandshakeDriver(dirtyBitmaps: [NBDDirtyBitmap(name: "1", key: 1)])
        _ = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.structuredReply.rawValue)
            + HandshakeDriver.option(NBD.Option.setMetaContext.rawValue, HandshakeDriver.metaQuery("disk", ["qemu:dirty-bitmap:1"])))
        let bad = d.feed(HandshakeDriver.option(NBD.Option.setMetaContext.rawValue, [0, 0, 0, 9]))
        guard case .send(let bytes) = bad.first else { Issue.record("no reply"); return }
        #expect(parseReplies(bytes).first?.type == NBD.Reply.errInvalid)
        guard case .enterTransmission(_, let session) = d.feed(HandshakeDriver.option(NBD.Option.go.rawValue, HandshakeDriver.nameAndInfos("disk"))).last else {
            Issue.record("no transmission"); return
        }
        #expect(session.contexts.isEmpty)
    }

    @Test func forcedTLSRefusesEverythingButStartTLS() {
        var d = HandshakeDriver(tls: .forced)
        var actions = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.go.rawValue, HandshakeDriver.nameAndInfos("disk")))
        guard case .send(let refused) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(refused).first?.type == NBD.Reply.errTLSRequired)
        actions = d.feed(HandshakeDriver.option(NBD.Option.startTLS.rawValue))
        guard case .sendThenStartTLS(let ack) = actions.first else { Issue.record("no STARTTLS: \(actions)"); return }
        #expect(parseReplies(ack).first?.type == NBD.Reply.ack)
        d.machine.tlsEstablished()
        actions = d.feed(HandshakeDriver.option(NBD.Option.startTLS.rawValue))
        guard case .send(let again) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(again).first?.type == NBD.Reply.errInvalid)
        actions = d.feed(HandshakeDriver.option(NBD.Option.go.rawValue, HandshakeDriver.nameAndInfos("disk")))
        guard case .enterTransmission = actions.last else { Issue.record("no transmission after TLS"); return }
    }

    @Test func exportNameBeforeTLSDisconnects() {
        var d = HandshakeDriver(tls: .forced)
        let actions = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.exportName.rawValue, Array("disk".utf8)))
        guard case .close = actions.first else { Issue.record("no close"); return }
    }

    @Test func startTLSWithoutTLSIsUnsupported() {
        var d = HandshakeDriver()
        let actions = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.startTLS.rawValue))
        guard case .send(let bytes) = actions.first else { Issue.record("no reply"); return }
        #expect(parseReplies(bytes).first?.type == NBD.Reply.errUnsupported)
    }

    @Test func exportNameOptionWithAndWithoutZeroes() {
        var d = HandshakeDriver()
        guard case .enterTransmission(let bytes, _) = d.feed(HandshakeDriver.clientFlags(1) + HandshakeDriver.option(NBD.Option.exportName.rawValue, Array("disk".utf8))).last else { Issue.record("no transmission"); return }
        #expect(bytes.count == 8 + 2 + 124)
        var e = HandshakeDriver()
        guard case .enterTransmission(let short, _) = e.feed(HandshakeDriver.clientFlags(3) + HandshakeDriver.option(NBD.Option.exportName.rawValue, Array("disk".utf8))).last else { Issue.record("no transmission"); return }
        #expect(short.count == 10)
        var f = HandshakeDriver()
        guard case .close = f.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.exportName.rawValue, Array("other".utf8))).last else { Issue.record("no close"); return }
    }

    @Test func boundsCloseTheConnection() {
        var flood = HandshakeDriver()
        var input = HandshakeDriver.clientFlags()
        for _ in 0...Limits.nbdOptionsPerHandshakeMax { input += HandshakeDriver.option(NBD.Option.structuredReply.rawValue) }
        guard case .close(_, let reason) = flood.feed(input).last else { Issue.record("no close on flood"); return }
        #expect(reason.contains("options"))
        var big = HandshakeDriver()
        var header = HandshakeDriver.clientFlags()
        header.appendBE(NBD.optionMagic)
        header.appendBE(UInt32(NBD.Option.go.rawValue))
        header.appendBE(UInt32(1 << 30))
        guard case .close = big.feed(header).last else { Issue.record("no close on a 1 GiB option"); return }
        var magic = HandshakeDriver()
        guard case .close = magic.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(7, magic: 0x1234)).last else { Issue.record("no close on bad magic"); return }
    }

    @Test func readOnlyExportAdvertisesNoWrites() {
        var d = HandshakeDriver(readOnly: true)
        guard case .enterTransmission(_, let session) = d.feed(HandshakeDriver.clientFlags() + HandshakeDriver.option(NBD.Option.go.rawValue, HandshakeDriver.nameAndInfos("disk"))).last else { Issue.record("no transmission"); return }
        let f = session.transmissionFlags
        #expect(f & NBD.TransmissionFlag.readOnly != 0)
        #expect(f & (NBD.TransmissionFlag.sendTrim | NBD.TransmissionFlag.sendWriteZeroes | NBD.TransmissionFlag.sendFastZero) == 0)
    }
}
