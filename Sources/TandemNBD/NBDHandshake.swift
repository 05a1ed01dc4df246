import TandemCore

/// The server side of the fixed-newstyle NBD handshake, as a sans-I/O state machine.
///
/// It takes the bytes a client sent and returns what to do: send these bytes, start TLS, enter
/// transmission with a settled session, or close. It never touches a socket, so the same code runs
/// under io_uring, epoll, and in tests byte by byte (proto.md "Handshake", "Option haggling").
public struct NBDHandshake {
    public enum Action: Equatable {
        /// Not enough bytes yet for the next step.
        case needMore
        case send([UInt8])
        /// Send these bytes (the STARTTLS ack) in the clear, then run a TLS handshake, then call
        /// `tlsEstablished()`. Any unread plaintext the client sent after STARTTLS must be dropped.
        case sendThenStartTLS([UInt8])
        /// Send these bytes (the export's details or the final ack), then serve requests.
        case enterTransmission(send: [UInt8], session: NBDSession)
        /// Send these bytes (possibly none), then close, for `reason`.
        case close(send: [UInt8], reason: String)
    }

    private enum State {
        case awaitClientFlags
        case awaitOption
        case awaitTLS
        case done
    }

    public let exports: [NBDExport]
    public let tlsMode: NBDTLSMode
    private var state: State = .awaitClientFlags
    private var noZeroes = false
    private var tlsUp = false
    private var structuredReplies = false
    private var optionCount = 0
    /// Export name the meta context selection belongs to (nil: nothing selected).
    private var metaContextExport: String?
    private var selectedContexts: [NBDMetaContext] = []

    public init(exports: [NBDExport], tlsMode: NBDTLSMode) {
        precondition(!exports.isEmpty, "an NBD server needs an export")
        self.exports = exports
        self.tlsMode = tlsMode
    }

    /// The server greeting, sent as soon as a client connects.
    public static func greeting() -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(NBD.initMagic)
        out.appendBE(NBD.optionMagic)
        out.appendBE(NBD.HandshakeFlag.fixedNewstyle | NBD.HandshakeFlag.noZeroes)
        return out
    }

    /// Looks an export up; the empty name is the default (first) export.
    public func export(named name: String) -> NBDExport? {
        if name.isEmpty { return exports.first }
        return exports.first { $0.name == name }
    }

    /// Handles the bytes received so far. Returns how many it consumed and what to do; call again
    /// with the rest until it answers `.needMore`.
    public mutating func receive(_ bytes: UnsafeRawBufferPointer) -> (consumed: Int, action: Action) {
        switch state {
        case .awaitClientFlags:
            guard bytes.count >= 4 else { return (0, .needMore) }
            let flags = bytes.loadBE32(at: 0)
            if flags & NBD.ClientFlag.fixedNewstyle == 0 {
                return (4, .close(send: [], reason: "client does not speak fixed newstyle"))
            }
            if flags & ~NBD.ClientFlag.known != 0 {
                return (4, .close(send: [], reason: "unknown client flags 0x\(String(flags, radix: 16))"))
            }
            noZeroes = flags & NBD.ClientFlag.noZeroes != 0
            state = .awaitOption
            return (4, .needMore)
        case .awaitOption:
            return receiveOption(bytes)
        case .awaitTLS, .done:
            preconditionFailure("handshake received bytes in state \(state)")
        }
    }

    /// The TLS session is up: negotiation starts over, inside it (proto.md "TLS support").
    public mutating func tlsEstablished() {
        precondition(state == .awaitTLS, "TLS established without STARTTLS")
        tlsUp = true
        structuredReplies = false
        metaContextExport = nil
        selectedContexts = []
        state = .awaitOption
    }

    public var isTLSUp: Bool { tlsUp }

    private mutating func receiveOption(_ bytes: UnsafeRawBufferPointer) -> (consumed: Int, action: Action) {
        guard bytes.count >= 16 else { return (0, .needMore) }
        let magic = bytes.loadBE64(at: 0)
        let option = bytes.loadBE32(at: 8)
        let length = Int(bytes.loadBE32(at: 12))
        if magic != NBD.optionMagic {
            return (16, .close(send: [], reason: "bad option magic"))
        }
        if length > Limits.nbdOptionLengthMax {
            return (16, .close(send: [], reason: "option \(option) of \(length) bytes is over the \(Limits.nbdOptionLengthMax)-byte limit"))
        }
        guard bytes.count >= 16 + length else { return (0, .needMore) }
        optionCount += 1
        if optionCount > Limits.nbdOptionsPerHandshakeMax {
            return (16 + length, .close(send: [], reason: "more than \(Limits.nbdOptionsPerHandshakeMax) options"))
        }
        let data = UnsafeRawBufferPointer(rebasing: bytes[16..<16 + length])
        return (16 + length, handleOption(option, data))
    }

    private mutating func handleOption(_ code: UInt32, _ data: UnsafeRawBufferPointer) -> Action {
        guard let option = NBD.Option(rawValue: code) else {
            return .send(Self.reply(code, NBD.Reply.errUnsupported, message: "unknown option \(code)"))
        }
        if tlsMode == .forced && !tlsUp {
            switch option {
            case .startTLS, .abort: break
            case .exportName: return .close(send: [], reason: "EXPORT_NAME before TLS on a TLS-only server")
            default: return .send(Self.reply(code, NBD.Reply.errTLSRequired, message: "TLS is required"))
            }
        }
        switch option {
        case .abort:
            return .close(send: Self.reply(code, NBD.Reply.ack), reason: "client aborted the handshake")
        case .startTLS:
            if tlsMode == .none { return .send(Self.reply(code, NBD.Reply.errUnsupported, message: "TLS is not configured")) }
            if tlsUp || !data.isEmpty { return .send(Self.reply(code, NBD.Reply.errInvalid, message: "invalid STARTTLS")) }
            state = .awaitTLS
            return .sendThenStartTLS(Self.reply(code, NBD.Reply.ack))
        case .list:
            if !data.isEmpty { return .send(Self.reply(code, NBD.Reply.errInvalid, message: "LIST takes no data")) }
            var out: [UInt8] = []
            for export in exports {
                var payload: [UInt8] = []
                payload.appendBE(UInt32(export.name.utf8.count))
                payload.append(contentsOf: export.name.utf8)
                payload.append(contentsOf: export.description.utf8)
                out += Self.reply(code, NBD.Reply.server, payload)
            }
            out += Self.reply(code, NBD.Reply.ack)
            return .send(out)
        case .structuredReply:
            if !data.isEmpty { return .send(Self.reply(code, NBD.Reply.errInvalid, message: "STRUCTURED_REPLY takes no data")) }
            structuredReplies = true
            return .send(Self.reply(code, NBD.Reply.ack))
        case .listMetaContext, .setMetaContext:
            return metaContext(option, data)
        case .info, .go:
            return infoOrGo(option, data)
        case .exportName:
            guard data.count <= Limits.nbdStringLengthMax else {
                return .close(send: [], reason: "export name longer than \(Limits.nbdStringLengthMax) bytes")
            }
            let name = String(decoding: data, as: UTF8.self)
            guard let export = export(named: name) else {
                return .close(send: [], reason: "unknown export \(Printable.quoted(name))")
            }
            let session = makeSession(export, requestedName: name)
            var out: [UInt8] = []
            out.appendBE(export.size)
            out.appendBE(session.transmissionFlags)
            if !noZeroes { out += [UInt8](repeating: 0, count: 124) }
            state = .done
            return .enterTransmission(send: out, session: session)
        }
    }

    private func makeSession(_ export: NBDExport, requestedName: String) -> NBDSession {
        let selectedHere = structuredReplies && metaContextExport.map { self.export(named: $0) == export } == true
        return NBDSession(
            export: export, structuredReplies: structuredReplies, contexts: selectedHere ? selectedContexts : [],
            transmissionFlags: export.transmissionFlags(structuredReplies: structuredReplies))
    }

    private mutating func infoOrGo(_ option: NBD.Option, _ data: UnsafeRawBufferPointer) -> Action {
        let code = option.rawValue
        var reader = ByteReader(data)
        guard let nameLength = reader.u32(), nameLength <= Limits.nbdStringLengthMax,
              let name = reader.string(Int(nameLength)), let count = reader.u16(),
              count <= Limits.nbdInfoRequestsMax, reader.remaining == Int(count) * 2
        else {
            return .send(Self.reply(code, NBD.Reply.errInvalid, message: "malformed \(option) option"))
        }
        var requests: [UInt16] = []
        for _ in 0..<count { requests.append(reader.u16()!) }
        guard let export = export(named: name) else {
            return .send(Self.reply(code, NBD.Reply.errUnknown, message: "unknown export"))
        }
        let session = makeSession(export, requestedName: name)
        var out: [UInt8] = []
        var info: [UInt8] = []
        info.appendBE(NBD.Info.export)
        info.appendBE(export.size)
        info.appendBE(session.transmissionFlags)
        out += Self.reply(code, NBD.Reply.info, info)
        // Unknown information requests are ignored, as the spec asks.
        if requests.contains(NBD.Info.name) {
            var payload: [UInt8] = []
            payload.appendBE(NBD.Info.name)
            payload.append(contentsOf: export.name.utf8)
            out += Self.reply(code, NBD.Reply.info, payload)
        }
        if requests.contains(NBD.Info.description), !export.description.isEmpty {
            var payload: [UInt8] = []
            payload.appendBE(NBD.Info.description)
            payload.append(contentsOf: export.description.utf8)
            out += Self.reply(code, NBD.Reply.info, payload)
        }
        // Block sizes are always sent: the minimum matters with O_DIRECT.
        var sizes: [UInt8] = []
        sizes.appendBE(NBD.Info.blockSize)
        sizes.appendBE(export.blockSizeMin)
        sizes.appendBE(export.blockSizePreferred)
        sizes.appendBE(export.blockSizeMax)
        out += Self.reply(code, NBD.Reply.info, sizes)
        out += Self.reply(code, NBD.Reply.ack)
        if option == .info { return .send(out) }
        state = .done
        return .enterTransmission(send: out, session: session)
    }

    private mutating func metaContext(_ option: NBD.Option, _ data: UnsafeRawBufferPointer) -> Action {
        let code = option.rawValue
        if option == .setMetaContext {
            // A SET replaces the selection even when it fails (proto.md, SET_META_CONTEXT).
            metaContextExport = nil
            selectedContexts = []
            if !structuredReplies { return .send(Self.reply(code, NBD.Reply.errInvalid, message: "structured replies first")) }
        }
        var reader = ByteReader(data)
        guard let nameLength = reader.u32(), nameLength <= Limits.nbdStringLengthMax,
              let name = reader.string(Int(nameLength)), let count = reader.u32()
        else {
            return .send(Self.reply(code, NBD.Reply.errInvalid, message: "malformed \(option) option"))
        }
        guard count <= Limits.nbdMetaContextQueriesMax else {
            return .send(Self.reply(code, NBD.Reply.errTooBig, message: "too many queries"))
        }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = reader.u32(), length <= Limits.nbdStringLengthMax,
                  let query = reader.string(Int(length))
            else {
                return .send(Self.reply(code, NBD.Reply.errInvalid, message: "malformed query"))
            }
            queries.append(query)
        }
        guard reader.remaining == 0 else {
            return .send(Self.reply(code, NBD.Reply.errInvalid, message: "trailing bytes"))
        }
        guard let export = export(named: name) else {
            return .send(Self.reply(code, NBD.Reply.errUnknown, message: "unknown export"))
        }
        var out: [UInt8] = []
        if option == .listMetaContext {
            // The id in a LIST reply is reserved: zero (proto.md, LIST_META_CONTEXT).
            var listed: [String] = []
            for query in queries.isEmpty ? [""] : queries {
                for context in Self.contexts(listing: query, of: export) where !listed.contains(context) {
                    listed.append(context)
                    out += Self.contextReply(code, id: 0, name: context)
                }
            }
        } else {
            var selected: [NBDMetaContext] = []
            var bitmaps: UInt32 = 0
            for query in queries where !selected.contains(where: { $0.name == query }) {
                guard let kind = Self.context(named: query, of: export) else { continue }
                var id = NBD.baseAllocationContextID
                if kind != .baseAllocation {
                    bitmaps += 1
                    id = NBD.baseAllocationContextID + bitmaps
                }
                selected.append(NBDMetaContext(id: id, name: query, kind: kind))
                out += Self.contextReply(code, id: id, name: query)
            }
            metaContextExport = name
            selectedContexts = selected
        }
        out += Self.reply(code, NBD.Reply.ack)
        return .send(out)
    }

    /// The context a SET query selects: an exact name the export offers, or nil (ignored, as
    /// the spec asks of unknown names and wildcards).
    static func context(named name: String, of export: NBDExport) -> NBDMetaContext.Kind? {
        if name == NBD.baseAllocationName { return .baseAllocation }
        guard name.hasPrefix(NBD.dirtyBitmapPrefix) else { return nil }
        let leaf = name.dropFirst(NBD.dirtyBitmapPrefix.count)
        return export.dirtyBitmaps.first { $0.name == leaf }.map { .dirtyBitmap(key: $0.key) }
    }

    /// The context names a LIST query matches: an exact name, or the wildcards qemu-nbd also
    /// answers: `base:`, `qemu:` and `qemu:dirty-bitmap:`; "" (no query at all) lists everything.
    static func contexts(listing query: String, of export: NBDExport) -> [String] {
        let bitmaps = export.dirtyBitmaps.map { NBD.dirtyBitmapPrefix + $0.name }
        switch query {
        case "": return [NBD.baseAllocationName] + bitmaps
        case "base:": return [NBD.baseAllocationName]
        case "qemu:", NBD.dirtyBitmapPrefix: return bitmaps
        default: return context(named: query, of: export) == nil ? [] : [query]
        }
    }

    private static func contextReply(_ option: UInt32, id: UInt32, name: String) -> [UInt8] {
        var payload: [UInt8] = []
        payload.appendBE(id)
        payload.append(contentsOf: name.utf8)
        return reply(option, NBD.Reply.metaContext, payload)
    }

    /// One option reply: magic, option, reply type, length, data.
    public static func reply(_ option: UInt32, _ type: UInt32, _ data: [UInt8] = []) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(20 + data.count)
        out.appendBE(NBD.optionReplyMagic)
        out.appendBE(option)
        out.appendBE(type)
        out.appendBE(UInt32(data.count))
        out += data
        return out
    }

    /// An error reply with a human-readable message (the spec allows UTF-8 text as data).
    public static func reply(_ option: UInt32, _ type: UInt32, message: String) -> [UInt8] {
        reply(option, type, Array(message.utf8))
    }
}
