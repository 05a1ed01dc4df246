import CTandem
import Glibc
import TandemCore
import TandemIO

/// `tandem diff` and `tandem apply`: making an incremental stream between two barriers of an undo
/// store, and applying one to a file or block device (Protocol/barriers.md "Incremental stream").
/// Synchronous file I/O: these are tools, not the replication path.
public enum BarrierStream {
    public struct MadeSummary: Sendable {
        public var chunks: UInt64
        public var dataBytes: UInt64
        public var streamBytes: UInt64
    }

    public struct AppliedSummary: Sendable {
        public var header: DiffStreamHeader
        /// Chunks written.
        public var written: UInt64
        /// Chunks the target already held in their new content (an earlier run stopped part way).
        public var alreadyApplied: UInt64
        public var dataBytes: UInt64
    }

    /// Writes the stream that turns the image at barrier `from` into the image at `to`, to
    /// `output` (through `output.partial`, renamed once complete and synced, so a stream under its
    /// final name is always whole).
    ///
    /// - `from` nil: a full stream, every chunk of the image at `to`.
    /// - `to` nil: the device as it is now (offline: nothing may write it meanwhile).
    /// - `store` may be nil only for a full stream of the device as it is.
    /// Chunks whose bytes did not change (rewritten with the same data) are left out.
    /// `progress`, if given, is called after each chunk with the bytes of the image looked at so
    /// far and in all.
    public static func make(store: UndoStore?, deviceFD: Int32, deviceBytes: UInt64, from: UInt64?, to: UInt64?,
                            output: String, nowUnixSeconds: Int64,
                            progress: ((_ doneBytes: UInt64, _ totalBytes: UInt64) -> Void)? = nil) throws -> MadeSummary {
        let maker = try DiffMaker(store: store, deviceBytes: deviceBytes, from: from, to: to, output: output, nowUnixSeconds: nowUnixSeconds) { offset, buffer in
            try BlockFile.read(deviceFD, into: buffer, at: offset, "the device")
        }
        do {
            while try !maker.step(chunksMax: 64) { progress?(maker.doneBytes, maker.totalBytes) }
            progress?(maker.doneBytes, maker.totalBytes)
            try maker.writeTrailer()
            return try maker.commit(synced: false)
        } catch {
            maker.abandon()
            throw error
        }
    }

    /// Applies the stream in `path` to the file or block device `target`, all or nothing as far
    /// as checks go: the whole stream is read and checked first (every checksum, the device size),
    /// and every chunk's current content on the target must be the stream's base (or already its
    /// new content, from a run that stopped part way). Only then is anything written, then synced.
    /// A full stream may create a missing regular file of the right size when `create`.
    /// `progress`, if given, is called as the stream is read, once per pass: `writing` false
    /// while it is checked, true while it is written.
    public static func apply(stream path: String, to target: String, create: Bool = false,
                             progress: ((_ writing: Bool, _ doneBytes: UInt64, _ totalBytes: UInt64) -> Void)? = nil) throws -> AppliedSummary {
        let sfd = open(path, O_RDONLY | O_CLOEXEC)
        guard sfd >= 0 else { throw UndoStoreError("cannot open stream \(path): \(SystemError.text(errno))", errno: errno) }
        defer { close(sfd) }
        let streamBytes = try BlockFile.size(sfd, path)

        // The header first: it says how big the target must be.
        var probe = DiffStreamReader()
        let headerBytes = UnsafeMutableRawBufferPointer.allocate(byteCount: DiffStreamHeader.encodedBytes, alignment: 8)
        defer { headerBytes.deallocate() }
        guard streamBytes >= UInt64(DiffStreamHeader.encodedBytes) else { throw UndoStoreError("\(path) is not a Tandem stream (too short)") }
        try BlockFile.read(sfd, into: headerBytes, at: 0, path)
        guard case .header(let header) = try streamError(path, { () throws(DiffStreamError) in try probe.feed(UnsafeRawBufferPointer(headerBytes)) }) else {
            preconditionFailure("the first event is the header")
        }

        let device: BackingDevice
        if access(target, F_OK) != 0 && errno == ENOENT && create && header.isFull {
            let fd = open(target, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw UndoStoreError("cannot create \(target): \(SystemError.text(errno))", errno: errno) }
            let sized = ftruncate(fd, off_t(header.geometry.deviceBytes)) == 0
            close(fd)
            guard sized else { throw UndoStoreError("cannot size \(target): \(SystemError.text(errno))", errno: errno) }
        }
        do {
            device = try BackingDevice.open(path: target, readOnly: false, cache: .page)
        } catch {
            throw UndoStoreError(error.message)
        }
        guard device.size == header.geometry.deviceBytes else {
            throw UndoStoreError("\(path) is for a device of \(header.geometry.deviceBytes) bytes; \(target) has \(device.size) (nothing written)")
        }

        let chunkBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: header.geometry.chunkBytes, alignment: 4096)
        let targetBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: header.geometry.chunkBytes, alignment: 4096)
        defer {
            chunkBuffer.deallocate()
            targetBuffer.deallocate()
        }
        var summary = AppliedSummary(header: header, written: 0, alreadyApplied: 0, dataBytes: 0)

        // Pass 1 checks everything and writes nothing; pass 2 writes, checking again as it goes
        // (the stream file or the target could change in between).
        for writing in [false, true] {
            var reader = DiffStreamReader()
            var at: UInt64 = 0
            var pending: DiffChunkHeader?
            var decision = DiffStreamReader.ApplyDecision.write
            summary.written = 0
            summary.alreadyApplied = 0
            while let want = reader.next {
                guard at + UInt64(want) <= streamBytes else {
                    throw UndoStoreError("\(path) is incomplete: it ends at byte \(streamBytes) inside a chunk or before its trailer (nothing written)")
                }
                let piece = UnsafeMutableRawBufferPointer(rebasing: chunkBuffer[0..<want])
                try BlockFile.read(sfd, into: piece, at: at, path)
                at += UInt64(want)
                let event = try streamError(path, { () throws(DiffStreamError) in try reader.feed(UnsafeRawBufferPointer(piece)) }, written: writing)
                switch event {
                case .header(let again):
                    guard again == header else { throw UndoStoreError("\(path) changed while being applied") }
                case .chunkHeader(let entry):
                    let current = UnsafeMutableRawBufferPointer(rebasing: targetBuffer[0..<entry.length])
                    try BlockFile.read(device.fd, into: current, at: entry.offset, target)
                    decision = DiffStreamReader.decide(entry, full: header.isFull, targetChecksum: CRC32C.checksum(UnsafeRawBufferPointer(current)))
                    if decision == .wrongBase {
                        let base = header.from.map { "barrier \($0.id)\($0.label.isEmpty ? "" : " (\($0.label))")" } ?? "?"
                        throw UndoStoreError("refused: \(target) does not hold the base of \(path) (\(base)): the chunk at offset \(entry.offset) differs\(writing ? "; it changed during the apply, \(summary.written) chunks were written" : " (nothing written)")")
                    }
                    pending = entry
                case .chunkData(let entry):
                    precondition(pending == entry)
                    if decision == .alreadyApplied {
                        summary.alreadyApplied += 1
                    } else {
                        summary.written += 1
                        if writing { try BlockFile.write(device.fd, UnsafeRawBufferPointer(piece), at: entry.offset, target) }
                    }
                case .end(let trailer):
                    summary.dataBytes = trailer.dataBytes
                }
                progress?(writing, at, streamBytes)
            }
            guard at == streamBytes else {
                throw UndoStoreError("\(path) has \(streamBytes - at) bytes after its trailer (damaged or not one stream)\(writing ? "" : " (nothing written)")")
            }
        }
        guard fsync(device.fd) == 0 else { throw UndoStoreError("cannot sync \(target): \(SystemError.text(errno))", errno: errno) }
        return summary
    }

    /// Runs one reader step, turning a damaged stream into one operator line.
    private static func streamError<T>(_ path: String, _ body: () throws(DiffStreamError) -> T, written: Bool = false) throws -> T {
        do {
            return try body()
        } catch {
            throw UndoStoreError("\(path) is damaged at \(error)\(written ? "" : " (nothing written)")")
        }
    }
}

/// One `tandem diff` being written, a step at a time: the offline tool runs the steps in a loop,
/// a running node a few at a time between its other work (`tandem diff` on a running node).
///
/// The chunks are those changed between the barriers, fixed when it starts: records tagged
/// `from ≤ t < to` only ever gain company under newer tags. A node reads every chunk on its loop,
/// where the image at a barrier is always whole (copy-on-write holds a chunk's writes until its
/// record is in the index); it must stop the stream if either barrier goes (`step` then throws).
public final class DiffMaker {
    public let output: String
    public let partial: String
    public let from: UInt64?
    public let to: UInt64?
    public let totalBytes: UInt64
    public private(set) var doneBytes: UInt64 = 0
    private let store: UndoStore?
    private let geometry: UndoGeometry
    private let readDevice: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void
    private let chunks: [UInt64]
    private var next = 0
    private var writer: DiffStreamWriter
    private var fd: Int32
    private var at: UInt64 = 0
    private let base: UnsafeMutableRawBufferPointer
    private let new: UnsafeMutableRawBufferPointer
    private var finished = false

    /// Opens `output.partial` and writes the header. `readDevice` reads the device's current
    /// bytes (the image's pieces that no record holds).
    public init(store: UndoStore?, deviceBytes: UInt64, from: UInt64?, to: UInt64?, output: String, nowUnixSeconds: Int64,
                readDevice: @escaping (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        let geometry = try store?.geometry ?? UndoGeometry(deviceBytes: deviceBytes)
        precondition(geometry.deviceBytes == deviceBytes)
        func barrier(_ id: UInt64) throws -> BarrierInfo {
            guard let store, let info = store.index.barrier(id) else {
                throw UndoStoreError("no barrier \(id) is retained\(store.map { " in \($0.directory)" } ?? "")")
            }
            return info
        }
        let fromInfo = try from.map(barrier)
        let toInfo = try to.map(barrier) ?? BarrierInfo(id: 0, createdUnixSeconds: nowUnixSeconds, label: "")
        if let fromInfo, toInfo.id != 0, fromInfo.id >= toInfo.id {
            throw UndoStoreError("the stream must go from an older barrier to a newer one (\(fromInfo.id) → \(toInfo.id))")
        }
        chunks = try from.map { try store!.index.changedChunks(from: $0, to: to) } ?? Array(0..<geometry.chunkCount)
        self.store = store
        self.geometry = geometry
        self.readDevice = readDevice
        self.from = from
        self.to = to
        self.output = output
        partial = output + ".partial"
        totalBytes = chunks.reduce(UInt64(0)) { $0 + UInt64(geometry.length(ofChunk: $1)) }
        writer = DiffStreamWriter(header: DiffStreamHeader(geometry: geometry, from: fromInfo, to: toInfo))
        fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw UndoStoreError("cannot create \(partial): \(SystemError.text(errno))", errno: errno) }
        base = .allocate(byteCount: geometry.chunkBytes, alignment: 4096)
        new = .allocate(byteCount: geometry.chunkBytes, alignment: 4096)
        do {
            try writer.headerBytes().withUnsafeBytes { try emit($0) }
        } catch {
            abandon()
            throw error
        }
    }

    deinit {
        abandon()
        base.deallocate()
        new.deallocate()
    }

    /// Chunks in the stream so far, and bytes of their data.
    public var chunkCount: UInt64 { writer.chunkCount }

    /// The stream file being written (to sync it elsewhere before `commit(synced: true)`).
    public var descriptor: Int32 { fd }

    private func emit(_ bytes: UnsafeRawBufferPointer) throws {
        try BlockFile.write(fd, bytes, at: at, partial)
        at += UInt64(bytes.count)
    }

    private func readImage(_ id: UInt64?, _ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws {
        if let id { try store!.readImage(at: id, offset: offset, into: buffer, readDevice: readDevice) } else { try readDevice(offset, buffer) }
    }

    /// Looks at up to `chunksMax` more chunks and writes those that differ. True when every chunk
    /// has been looked at.
    public func step(chunksMax: Int) throws -> Bool {
        precondition(!finished, "step after the trailer")
        let end = min(next + chunksMax, chunks.count)
        while next < end {
            let chunk = chunks[next]
            next += 1
            let offset = geometry.offset(ofChunk: chunk)
            let length = geometry.length(ofChunk: chunk)
            let newBytes = UnsafeMutableRawBufferPointer(rebasing: new[0..<length])
            try readImage(to, offset, newBytes)
            var baseChecksum: UInt32 = 0
            doneBytes += UInt64(length)
            if let from {
                let baseBytes = UnsafeMutableRawBufferPointer(rebasing: base[0..<length])
                try readImage(from, offset, baseBytes)
                if memcmp(baseBytes.baseAddress!, newBytes.baseAddress!, length) == 0 { continue }
                baseChecksum = CRC32C.checksum(UnsafeRawBufferPointer(baseBytes))
            }
            try writer.chunkHeader(offset: offset, data: UnsafeRawBufferPointer(newBytes), baseChecksum: baseChecksum).withUnsafeBytes { try emit($0) }
            try emit(UnsafeRawBufferPointer(newBytes))
        }
        return next == chunks.count
    }

    /// Writes the trailer, after the last step.
    public func writeTrailer() throws {
        precondition(next == chunks.count && !finished)
        finished = true
        try writer.trailerBytes().withUnsafeBytes { try emit($0) }
    }

    /// Syncs the stream (unless the caller did, `synced`) and renames it to its final name.
    public func commit(synced: Bool) throws -> BarrierStream.MadeSummary {
        precondition(finished && fd >= 0)
        if !synced { try BlockFile.dataSync(fd, partial) }
        close(fd)
        fd = -1
        guard rename(partial, output) == 0 else {
            let err = errno
            unlink(partial)
            throw UndoStoreError("cannot rename \(partial) to \(output): \(SystemError.text(err))", errno: err)
        }
        return BarrierStream.MadeSummary(chunks: writer.chunkCount, dataBytes: writer.dataBytes, streamBytes: at)
    }

    /// Stops: the partial file goes.
    public func abandon() {
        guard fd >= 0 else { return }
        close(fd)
        fd = -1
        unlink(partial)
    }
}
