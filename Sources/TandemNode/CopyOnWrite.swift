import Glibc
import Logging
import TandemCore
import TandemIO

/// Copy-on-write for a node that keeps barriers: carries out `CopyOnWriteQueue`'s actions. The
/// chunks a write overwrites first are read on the I/O engine (one read per run of chunks, into
/// a pool buffer), their records appended to the newest undo segment (buffered writes, on the
/// loop), the segment synced on the engine once for every record appended meanwhile (group
/// commit), and only then the write goes to the device (`release`). The loop never waits for
/// the disk here.
///
/// The undo store failing (a read, an append or a sync) is never the write's failure: `failed`
/// drops the barriers and the writes go on unprotected (Protocol/barriers.md "Retention").
final class CopyOnWrite: IOHandler {
    private static let tagSync: UInt32 = 0
    /// Largest read for one run of chunks (a run of longer chunks is one chunk).
    static let readBytesMax = 1 << 20

    let loop: IOLoop
    let device: BackingDevice
    let undo: UndoStore
    let logger: Logger
    private(set) var id: UInt32 = 0
    private var queue: CopyOnWriteQueue
    private var actions: [CopyOnWriteQueue.Action] = []
    private var performing = false
    private var writes: [UInt64: LocalIO] = [:]
    private var nextTicket: UInt64 = 1
    private var reads: [UInt32: (buffer: PoolBuffer, firstChunk: UInt64, chunkCount: Int, bytes: Int)] = [:]
    /// The duplicate of the newest segment's descriptor a sync runs on (the store may close the
    /// original meanwhile, when retention drops the barrier), and what that sync covers.
    private var syncFD: Int32 = -1
    private var idleWaiters: [() -> Void] = []
    /// A write that may go to the device now.
    var release: (LocalIO) -> Void = { _ in }
    /// The undo store failed: drop every barrier (the message is for the log).
    var failed: (String) -> Void = { _ in }
    /// Barriers retention dropped while records were appended, for the log.
    var dropped: ([(BarrierInfo, BarrierRetention.Reason)]) -> Void = { _ in }

    init(loop: IOLoop, device: BackingDevice, undo: UndoStore, logger: Logger) {
        self.loop = loop
        self.device = device
        self.undo = undo
        self.logger = logger
        queue = CopyOnWriteQueue(readChunksMax: max(1, Self.readBytesMax / undo.geometry.chunkBytes))
        id = loop.register(self)
    }

    /// Nothing read, appended or held: the device has every write given so far, the store every
    /// record durable.
    var isIdle: Bool { queue.isIdle }

    /// Runs `body` once nothing is pending (at once if nothing is).
    func whenIdle(_ body: @escaping () -> Void) {
        if queue.isIdle { return body() }
        idleWaiters.append(body)
    }

    /// A write, trim or write-zeroes for the device: released at once when every chunk it
    /// touches is saved and durable, otherwise after its chunks are.
    func write(_ io: LocalIO) {
        let chunks = undo.geometry.chunks(offset: io.offset, length: UInt64(io.length))
        if queue.isIdle && !chunks.contains(where: { undo.index.needsSave(chunk: $0) }) { return release(io) }
        let ticket = nextTicket
        nextTicket += 1
        writes[ticket] = io
        let index = undo.index
        queue.write(ticket: ticket, chunks: chunks, needsSave: { index.needsSave(chunk: $0) }, into: &actions)
        perform()
    }

    private func perform() {
        guard !performing else { return }
        performing = true
        var i = 0
        while i < actions.count {
            let action = actions[i]
            i += 1
            switch action {
            case .release(let ticket):
                release(writes.removeValue(forKey: ticket)!)
            case .read(let readID, let firstChunk, let chunkCount):
                startRead(readID, firstChunk: firstChunk, chunkCount: chunkCount)
            case .sync(let through):
                startSync(through)
            }
        }
        actions.removeAll(keepingCapacity: true)
        performing = false
        if queue.isIdle && !idleWaiters.isEmpty {
            let waiters = idleWaiters
            idleWaiters.removeAll()
            for body in waiters { body() }
        }
    }

    // MARK: Reads

    private func startRead(_ readID: UInt32, firstChunk: UInt64, chunkCount: Int) {
        let geometry = undo.geometry
        let last = firstChunk + UInt64(chunkCount) - 1
        let offset = geometry.offset(ofChunk: firstChunk)
        let bytes = Int(geometry.offset(ofChunk: last) + UInt64(geometry.length(ofChunk: last)) - offset)
        guard let buffer = loop.pool.take(bytes) else {
            // No buffer free: read on the loop, as before, rather than wait for one.
            let scratch = allocateAligned(bytes)
            defer { freeAligned(scratch, bytes) }
            let data = UnsafeMutableRawBufferPointer(start: scratch, count: bytes)
            do {
                try BlockFile.read(device, into: data, at: offset)
                return queue.readDone(id: readID, appendedRecords: append(UnsafeRawBufferPointer(data), firstChunk: firstChunk, chunkCount: chunkCount), into: &actions)
            } catch {
                failed("copy-on-write: \(error)")
                return queue.readDone(id: readID, appendedRecords: false, into: &actions)
            }
        }
        reads[readID] = (buffer, firstChunk, chunkCount, bytes)
        loop.engine.read(fd: device.fd, buffer: buffer.pointer, length: bytes, offset: offset, fixedIndex: buffer.fixedIndex,
                         userData: IOLoop.userData(id, readID))
    }

    private func readCompleted(_ readID: UInt32, _ result: Int32) {
        guard let read = reads[readID] else { preconditionFailure("copy-on-write read \(readID) is not in flight") }
        if result == -EINTR || result == -EAGAIN {
            return loop.engine.read(fd: device.fd, buffer: read.buffer.pointer, length: read.bytes,
                                    offset: undo.geometry.offset(ofChunk: read.firstChunk), fixedIndex: read.buffer.fixedIndex,
                                    userData: IOLoop.userData(id, readID))
        }
        reads[readID] = nil
        defer { loop.pool.release(read.buffer) }
        let data = UnsafeMutableRawBufferPointer(start: read.buffer.pointer, count: read.bytes)
        var appended = false
        do {
            if result < 0 { throw UndoStoreError("cannot read \(device.path): \(SystemError.text(-result))", errno: -result) }
            if Int(result) < read.bytes {
                // A short read: the rest on the loop (rare: only at the end of a file).
                let rest = UnsafeMutableRawBufferPointer(rebasing: data[Int(result)...])
                try BlockFile.read(device, into: rest, at: undo.geometry.offset(ofChunk: read.firstChunk) + UInt64(result))
            }
            appended = append(UnsafeRawBufferPointer(data), firstChunk: read.firstChunk, chunkCount: read.chunkCount)
        } catch {
            failed("copy-on-write: \(error)")
        }
        queue.readDone(id: readID, appendedRecords: appended, into: &actions)
        perform()
    }

    /// Appends a record for each chunk of the run the store still needs; true when it appended
    /// any (then a sync must come before the writes).
    private func append(_ data: UnsafeRawBufferPointer, firstChunk: UInt64, chunkCount: Int) -> Bool {
        let geometry = undo.geometry
        var appended = false
        var at = 0
        do {
            for chunk in firstChunk..<(firstChunk + UInt64(chunkCount)) {
                let length = geometry.length(ofChunk: chunk)
                defer { at += length }
                guard undo.index.needsSave(chunk: chunk) else { continue }
                let dropped = try undo.append(chunk: chunk, data: UnsafeRawBufferPointer(rebasing: data[at..<at + length]),
                                              nowUnixSeconds: ReplicatedNode.unixSeconds())
                if !dropped.isEmpty { self.dropped(dropped) }
                appended = true
            }
        } catch {
            failed("copy-on-write: \(error)")
        }
        return appended
    }

    // MARK: Group commit

    private var syncing: UInt64 = 0

    private func startSync(_ through: UInt64) {
        syncing = through
        guard let fd = undo.newestSegmentDescriptor else {
            // No barrier left (dropped meanwhile): nothing needs to be durable.
            return queue.syncDone(through: through, into: &actions)
        }
        syncFD = dup(fd)
        guard syncFD >= 0 else {
            do { try undo.sync() } catch { failed("copy-on-write: \(error)") }
            return queue.syncDone(through: through, into: &actions)
        }
        loop.engine.fsync(fd: syncFD, datasync: true, userData: IOLoop.userData(id, Self.tagSync))
    }

    private func syncCompleted(_ result: Int32) {
        if result == -EINTR || result == -EAGAIN {
            return loop.engine.fsync(fd: syncFD, datasync: true, userData: IOLoop.userData(id, Self.tagSync))
        }
        closeDescriptor(syncFD)
        syncFD = -1
        if result < 0 { failed("copy-on-write: cannot sync the undo store: \(SystemError.text(-result))") }
        queue.syncDone(through: syncing, into: &actions)
        perform()
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        if tag == Self.tagSync { syncCompleted(result) } else { readCompleted(tag, result) }
    }
}
