/// The order of copy-on-write on a node that keeps barriers (Protocol/barriers.md "Write
/// ordering", rule 2), as a state machine with no I/O: writes come in, and it says which chunk
/// reads to start, when to sync the undo store, and when each write may go to the device.
///
/// A write to chunks that must be saved first (`needsSave`: not yet saved under the newest
/// barrier) starts one read per contiguous run of them, of at most `readChunksMax` chunks. When a
/// read is done the node appends its records (`readDone`); a sync of the undo store then makes
/// every record appended so far durable at once (group commit: while one sync runs, the records
/// of the next reads gather for the following one). A write goes to the device once every chunk it
/// touches is durably saved: the reads it waits for are appended and a sync that started after
/// them has completed. A write whose chunks are saved and synced goes at once.
///
/// Chunks being read are not saved again by a second write (it waits for the first's read), and
/// a chunk's device content cannot change while its read runs: every write to it is held. So an
/// image read at any moment (an export, `tandem diff`) is right: a chunk without a record in the
/// index has its barrier content on the device.
///
/// ```
/// write A (chunk 3)  -> read 1 of chunk 3        write B (chunk 3) -> waits for read 1
/// read 1 done: append, sync 1 starts             write C (chunk 9) -> read 2
/// read 2 done: append (sync 1 running)           sync 1 done: release A, B; sync 2 starts
/// sync 2 done: release C
/// ```
public struct CopyOnWriteQueue: Sendable {
    public enum Action: Equatable, Sendable {
        /// Read chunks `[firstChunk, firstChunk + chunkCount)` from the device and append their
        /// records (the node skips any the store no longer needs), then call `readDone(id:)`.
        case read(id: UInt32, firstChunk: UInt64, chunkCount: Int)
        /// Sync the undo store (every record appended so far), then call `syncDone(through:)`.
        case sync(through: UInt64)
        /// The write may go to the device now.
        case release(ticket: UInt64)
    }

    private struct Read {
        var firstChunk: UInt64
        var chunkCount: Int
        var waiters: [UInt64]
    }

    private struct Held {
        var reads: Int
        /// The append sequence that must be durable first.
        var appendedThrough: UInt64
    }

    public let readChunksMax: Int
    private var nextReadID: UInt32 = 1
    private var reads: [UInt32: Read] = [:]
    private var readingChunks: [UInt64: UInt32] = [:]
    /// Chunks appended and not yet durable, with the append sequence that holds them.
    private var unsyncedChunks: [UInt64: UInt64] = [:]
    private var appended: UInt64 = 0
    private var durable: UInt64 = 0
    private var syncing: UInt64?
    private var held: [UInt64: Held] = [:]

    public init(readChunksMax: Int) {
        precondition(readChunksMax >= 1)
        self.readChunksMax = readChunksMax
    }

    /// Nothing is being read, synced or held: the device holds every write given so far (or has
    /// it in flight), and the store has every record durable.
    public var isIdle: Bool { held.isEmpty && reads.isEmpty && syncing == nil && appended == durable }

    /// Writes held now, and reads in flight (for status and tests).
    public var heldCount: Int { held.count }
    public var readCount: Int { reads.count }

    /// A write `ticket` (unique among those held) to the chunks `chunks`; `needsSave(chunk)` asks
    /// the store whether a chunk still needs saving under its newest barrier.
    public mutating func write(ticket: UInt64, chunks: Range<UInt64>, needsSave: (UInt64) -> Bool, into actions: inout [Action]) {
        precondition(held[ticket] == nil, "ticket \(ticket) is already held")
        var wait = Held(reads: 0, appendedThrough: 0)
        // New reads first, one per run of chunks that need saving and nobody reads yet.
        var runStart: UInt64?
        for chunk in chunks.lowerBound...chunks.upperBound {
            let starts = chunk < chunks.upperBound && readingChunks[chunk] == nil && needsSave(chunk)
            if starts && runStart == nil { runStart = chunk }
            if let first = runStart, !starts || chunk - first == UInt64(readChunksMax) {
                startRead(first..<chunk, into: &actions)
                runStart = starts ? chunk : nil
            }
        }
        for chunk in chunks {
            if let id = readingChunks[chunk], !reads[id]!.waiters.contains(ticket) {
                reads[id]!.waiters.append(ticket)
                wait.reads += 1
            }
            if let sequence = unsyncedChunks[chunk] { wait.appendedThrough = max(wait.appendedThrough, sequence) }
        }
        if wait.reads == 0 && wait.appendedThrough <= durable {
            actions.append(.release(ticket: ticket))
        } else {
            held[ticket] = wait
        }
    }

    private mutating func startRead(_ run: Range<UInt64>, into actions: inout [Action]) {
        let id = nextReadID
        repeat { nextReadID = nextReadID &+ 1 } while nextReadID == 0 || reads[nextReadID] != nil
        reads[id] = Read(firstChunk: run.lowerBound, chunkCount: run.count, waiters: [])
        for chunk in run { readingChunks[chunk] = id }
        actions.append(.read(id: id, firstChunk: run.lowerBound, chunkCount: run.count))
    }

    /// Read `id` is done and its records are appended (`appendedRecords` false: nothing was, the
    /// store dropped its barriers or failed, and there is nothing to wait for).
    public mutating func readDone(id: UInt32, appendedRecords: Bool, into actions: inout [Action]) {
        guard let read = reads.removeValue(forKey: id) else { preconditionFailure("read \(id) is not in flight") }
        let chunks = read.firstChunk..<(read.firstChunk + UInt64(read.chunkCount))
        for chunk in chunks { readingChunks[chunk] = nil }
        if appendedRecords {
            appended += 1
            for chunk in chunks { unsyncedChunks[chunk] = appended }
        }
        for ticket in read.waiters {
            held[ticket]!.reads -= 1
            if appendedRecords { held[ticket]!.appendedThrough = max(held[ticket]!.appendedThrough, appended) }
        }
        startSyncIfNeeded(into: &actions)
        releaseReady(read.waiters, into: &actions)
    }

    /// The sync that covers appends through `through` is done (or failed and the node dropped the
    /// barriers: the writes go on either way).
    public mutating func syncDone(through: UInt64, into actions: inout [Action]) {
        precondition(syncing == through, "sync through \(through) was not started")
        syncing = nil
        durable = through
        unsyncedChunks = unsyncedChunks.filter { $0.value > through }
        releaseReady(Array(held.keys).sorted(), into: &actions)
        startSyncIfNeeded(into: &actions)
    }

    private mutating func startSyncIfNeeded(into actions: inout [Action]) {
        guard syncing == nil, appended > durable else { return }
        syncing = appended
        actions.append(.sync(through: appended))
    }

    private mutating func releaseReady(_ tickets: [UInt64], into actions: inout [Action]) {
        for ticket in tickets {
            guard let wait = held[ticket], wait.reads == 0, wait.appendedThrough <= durable else { continue }
            held[ticket] = nil
            actions.append(.release(ticket: ticket))
        }
    }
}
