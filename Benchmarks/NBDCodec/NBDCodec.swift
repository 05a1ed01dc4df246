import Benchmark
import TandemCore
import TandemNBD

/// The per-request CPU work of the NBD layer: decode a request header, validate it against the
/// session, encode the reply header. None of it may allocate (every benchmark counts mallocs).
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal], scalingFactor: .kilo, maxDuration: .seconds(2))

    // NBDSession has no public initializer: it comes out of the handshake, so the benchmark gets
    // one the way the server does (structured replies and base:allocation negotiated).
    let export = NBDExport(name: "b", size: 1 << 30, readOnly: false, blockSizeMin: 512, blockSizeMax: 32 << 20)
    let session = negotiatedSession(export)

    let readRequest = requestBytes(command: .read, cookie: 7, offset: 1 << 20, length: 4096)
    let writeRequest = requestBytes(command: .write, cookie: 8, offset: 1 << 20, length: 4096)

    Benchmark("NBD read request: decode + validate + read chunk header") { benchmark in
        let out = UnsafeMutableRawPointer.allocate(byteCount: NBDTransmission.replyHeaderBytesMax, alignment: 8)
        defer { out.deallocate() }
        benchmark.startMeasurement()
        readRequest.withUnsafeBytes { bytes in
            for _ in benchmark.scaledIterations {
                guard case .request(let r) = NBDTransmission.decode(bytes) else { fatalError("decode") }
                let error = NBDTransmission.validate(r, session)
                guard error == .ok else { fatalError("validate: \(error)") }
                blackHole(NBDTransmission.encodeReadChunkHeader(cookie: r.cookie, offset: r.offset, dataLength: Int(r.length), into: out))
            }
        }
        benchmark.stopMeasurement()
    }

    Benchmark("NBD write request: decode + validate + simple reply") { benchmark in
        let out = UnsafeMutableRawPointer.allocate(byteCount: NBDTransmission.replyHeaderBytesMax, alignment: 8)
        defer { out.deallocate() }
        benchmark.startMeasurement()
        writeRequest.withUnsafeBytes { bytes in
            for _ in benchmark.scaledIterations {
                guard case .request(let r) = NBDTransmission.decode(bytes) else { fatalError("decode") }
                let error = NBDTransmission.validate(r, session)
                guard error == .ok else { fatalError("validate: \(error)") }
                blackHole(NBDTransmission.encodeStatusReply(r, error: error, session: session, into: out))
            }
        }
        benchmark.stopMeasurement()
    }

    // Every other benchmark here must show 0 mallocs, which proves nothing unless the counter
    // counts: this one allocates one array per iteration and must show exactly 1 (1000 with
    // `--scale`). If it shows 0, the malloc interposer is not loaded and the zeros are meaningless.
    Benchmark("Harness check: one Array allocation per iteration (must show 1 malloc)") { benchmark in
        for i in benchmark.scaledIterations {
            blackHole([UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 64))
        }
    }
}

/// A 28-byte request header as a client sends it.
func requestBytes(command: NBD.Command, cookie: UInt64, offset: UInt64, length: UInt32) -> [UInt8] {
    var request: [UInt8] = []
    request.appendBE(NBD.requestMagic)
    request.appendBE(UInt16(0))
    request.appendBE(command.rawValue)
    request.appendBE(cookie)
    request.appendBE(offset)
    request.appendBE(length)
    precondition(request.count == NBD.requestHeaderBytes)
    return request
}

/// Runs the handshake as a client would (fixed newstyle, STRUCTURED_REPLY, SET_META_CONTEXT
/// base:allocation, GO) and returns the session it settles.
func negotiatedSession(_ export: NBDExport) -> NBDSession {
    func option(_ option: NBD.Option, _ data: [UInt8] = []) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(NBD.optionMagic)
        out.appendBE(option.rawValue)
        out.appendBE(UInt32(data.count))
        return out + data
    }
    func string(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(UInt32(s.utf8.count))
        return out + Array(s.utf8)
    }
    var meta = string(export.name)
    meta.appendBE(UInt32(1))
    meta += string(NBD.baseAllocationName)
    var go = string(export.name)
    go.appendBE(UInt16(0))

    var client: [UInt8] = []
    client.appendBE(NBD.ClientFlag.fixedNewstyle | NBD.ClientFlag.noZeroes)
    client += option(.structuredReply) + option(.setMetaContext, meta) + option(.go, go)

    var handshake = NBDHandshake(exports: [export], tlsMode: .none)
    var at = 0
    while true {
        let (consumed, action) = client[at...].withUnsafeBytes { handshake.receive($0) }
        at += consumed
        switch action {
        case .enterTransmission(_, let session):
            precondition(session.structuredReplies && session.contexts.map(\.kind) == [.baseAllocation], "handshake settled \(session)")
            return session
        case .needMore where consumed > 0, .send:
            continue
        default:
            fatalError("handshake: \(action)")
        }
    }
}
