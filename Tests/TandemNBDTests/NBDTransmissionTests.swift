import Testing
import TandemCore
@testable import TandemNBD

@Suite struct NBDTransmissionTests {
    let size: UInt64 = 1 << 20

    func session(readOnly: Bool = false, structured: Bool = true, contexts: Bool = true, min: UInt32 = 512) -> NBDSession {
        let export = NBDExport(name: "d", size: size, readOnly: readOnly, blockSizeMin: min, blockSizeMax: 32 << 20)
        return NBDSession(export: export, structuredReplies: structured, contexts: contexts ? [NBDMetaContext(id: 1, name: NBD.baseAllocationName, kind: .baseAllocation)] : [], transmissionFlags: export.transmissionFlags(structuredReplies: structured))
    }

    func request(_ command: NBD.Command, offset: UInt64 = 0, length: UInt32 = 4096, flags: UInt16 = 0) -> NBDRequest {
        NBDRequest(flags: flags, type: command.rawValue, cookie: 0xfeed, offset: offset, length: length)
    }

    @Test func decodesAHeaderAndRefusesBadMagic() {
        var bytes: [UInt8] = []
        bytes.appendBE(NBD.requestMagic)
        bytes.appendBE(UInt16(1))
        bytes.appendBE(UInt16(1))
        bytes.appendBE(UInt64(42))
        bytes.appendBE(UInt64(8192))
        bytes.appendBE(UInt32(4096))
        let decoded = bytes.withUnsafeBytes { NBDTransmission.decode($0) }
        #expect(decoded == .request(NBDRequest(flags: 1, type: 1, cookie: 42, offset: 8192, length: 4096)))
        #expect(bytes.dropLast().withUnsafeBytes { NBDTransmission.decode($0) } == .needMore)
        bytes[0] = 0
        guard case .invalid = bytes.withUnsafeBytes({ NBDTransmission.decode($0) }) else { Issue.record("bad magic accepted"); return }
    }

    @Test func errorsAsTheSpecSays() {
        let s = session()
        #expect(NBDTransmission.validate(request(.read, offset: size - 4096), s) == .ok)
        #expect(NBDTransmission.validate(request(.read, offset: size), s) == .inval)
        #expect(NBDTransmission.validate(request(.write, offset: size), s) == .nospc)
        #expect(NBDTransmission.validate(request(.writeZeroes, offset: size - 512, length: 1024), s) == .nospc)
        #expect(NBDTransmission.validate(request(.trim, offset: size), s) == .inval)
        #expect(NBDTransmission.validate(request(.blockStatus, offset: size), s) == .inval)
        #expect(NBDTransmission.validate(request(.read, offset: UInt64.max - 100), s) == .inval, "offset overflow")
        #expect(NBDTransmission.validate(request(.read, offset: 100), s) == .inval, "unaligned")
        #expect(NBDTransmission.validate(request(.read, length: 33 << 20), s) == .inval, "over the maximum")
        #expect(NBDTransmission.validate(request(.read, length: 0), s) == .inval)
        #expect(NBDTransmission.validate(NBDRequest(flags: 0, type: 99, cookie: 1, offset: 0, length: 0), s) == .inval)
        #expect(NBDTransmission.validate(request(.write, flags: 1 << 9), s) == .inval, "unknown flag")
        #expect(NBDTransmission.validate(request(.write, flags: NBD.CommandFlag.noHole), s) == .inval, "NO_HOLE only on WRITE_ZEROES")
        #expect(NBDTransmission.validate(request(.flush, length: 1), s) == .inval)
        #expect(NBDTransmission.validate(request(.flush, length: 0), s) == .ok)
        #expect(NBDTransmission.validate(request(.write, flags: NBD.CommandFlag.fua), s) == .ok)
        #expect(NBDTransmission.validate(request(.writeZeroes, flags: NBD.CommandFlag.noHole | NBD.CommandFlag.fastZero), s) == .ok)
        #expect(NBDTransmission.validate(request(.blockStatus, flags: NBD.CommandFlag.reqOne), s) == .ok)
    }

    @Test func readOnlyRefusesWritesWithEPERM() {
        let s = session(readOnly: true)
        for command in [NBD.Command.write, .trim, .writeZeroes] {
            #expect(NBDTransmission.validate(request(command), s) == .perm)
        }
        #expect(NBDTransmission.validate(request(.read), s) == .ok)
    }

    @Test func dontFragmentAndBlockStatusNeedNegotiation() {
        let simple = session(structured: false, contexts: false)
        #expect(NBDTransmission.validate(request(.read, flags: NBD.CommandFlag.dontFragment), simple) == .inval)
        #expect(NBDTransmission.validate(request(.blockStatus), simple) == .inval)
        #expect(NBDTransmission.validate(request(.read, flags: NBD.CommandFlag.dontFragment), session()) == .ok)
    }

    @Test func replyEncodings() {
        let p = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 8)
        defer { p.deallocate() }
        let raw = { (n: Int) in Array(UnsafeRawBufferPointer(start: p, count: n)) }
        #expect(NBDTransmission.encodeSimpleReply(cookie: 7, error: .nospc, into: p) == 16)
        #expect(raw(16) == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 7])
        #expect(NBDTransmission.encodeReadChunkHeader(cookie: 9, offset: 4096, dataLength: 512, into: p) == 28)
        #expect(raw(28) == [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 2, 8, 0, 0, 0, 0, 0, 0, 0x10, 0])
        let readError = NBDTransmission.encodeStatusReply(request(.read), error: .io, session: session(), into: p)
        #expect(readError == 26)
        #expect(raw(8) == [0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 0x01], "structured ERROR chunk with DONE")
        #expect(NBDTransmission.encodeStatusReply(request(.write), error: .ok, session: session(), into: p) == 16)
        let extents: [(length: UInt32, flags: UInt32)] = [(4096, 0), (8192, 3)]
        let n = extents.withUnsafeBufferPointer { NBDTransmission.encodeBlockStatus(cookie: 1, extents: $0, into: p) }
        #expect(n == 24 + 16)
        #expect(Array(raw(n)[20...]) == [0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 3])
        // A chunk for another context that is not the reply's last: its id, no DONE flag.
        let m = extents.withUnsafeBufferPointer { NBDTransmission.encodeBlockStatus(cookie: 1, contextID: 7, last: false, extents: $0, into: p) }
        #expect(m == 24 + 16 && raw(8)[4...5] == [0, 0] && Array(raw(24)[20...]) == [0, 0, 0, 7])
    }

    @Test func errnoMapping() {
        #expect(NBD.Errno(localErrno: 28) == .nospc)
        #expect(NBD.Errno(localErrno: 122) == .nospc)
        #expect(NBD.Errno(localErrno: 30) == .perm)
        #expect(NBD.Errno(localErrno: 5) == .io)
        #expect(NBD.Errno(localErrno: 9999) == .io)
        #expect(NBD.Errno(localErrno: 95) == .notsup)
    }
}
