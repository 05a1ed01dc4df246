import CTandem
import Glibc
import Logging
import TandemCore
import Testing
@testable import TandemIO

/// Collects completions by tag.
final class Recorder: IOHandler {
    var results: [UInt32: Int32] = [:]
    func ioCompleted(tag: UInt32, result: Int32) { results[tag] = result }
}

func run(_ loop: IOLoop, until done: () -> Bool) {
    for _ in 0..<10_000 where !done() { loop.runOnce(timeoutNanos: 100_000_000) }
}

func tempFile(size: Int) -> (String, Int32) {
    var template = Array("/tmp/tandem-engine-XXXXXX".utf8CString)
    let fd = mkstemp(&template)
    precondition(fd >= 0)
    ftruncate(fd, off_t(size))
    return (String(nulTerminated: template), fd)
}

/// Runs `body` on a new thread (the engine's loop stays on the test's thread).
private final class ThreadBody: ThreadMain, Sendable {
    let run: @Sendable () -> Void
    init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    func threadMain() { run() }
}

func startThread(_ body: @escaping @Sendable () -> Void) throws -> pthread_t {
    try TandemIO.startThread(ThreadBody(body))
}

func joinThread(_ thread: pthread_t) {
    pthread_join(thread, nil)
}

/// An engine with its loop, pool and a recorder, and a 1 MiB temporary file (removed on deinit).
final class DiskRig {
    let engine: any IOEngine
    let pool = BufferPool()
    let loop: IOLoop
    let recorder = Recorder()
    let id: UInt32
    let path: String
    let fd: Int32

    init(_ engine: any IOEngine) {
        self.engine = engine
        loop = IOLoop(engine: engine, pool: pool, logger: Logger(label: "test"))
        id = loop.register(recorder)
        (path, fd) = tempFile(size: 1 << 20)
    }

    deinit {
        close(fd)
        unlink(path)
    }
}

@Suite(.serialized) struct EngineTests {
    static let kinds: [IOEngineKind] = IOEngineKind.allCases

    @Test(arguments: kinds)
    func diskReadWriteSyncAndZero(kind: IOEngineKind) throws {
        let rig = DiskRig(try IOEngineFactory.make(kind))
        let (engine, pool, loop, recorder, id, fd) = (rig.engine, rig.pool, rig.loop, rig.recorder, rig.id, rig.fd)
        #expect(engine.kind == kind)
        let buffer = pool.take(65536)!
        memset(buffer.pointer, 0x5a, 65536)
        engine.write(fd: fd, buffer: buffer.pointer, length: 65536, offset: 4096, fixedIndex: buffer.fixedIndex, fua: true, offload: false, userData: IOLoop.userData(id, 1))
        run(loop) { recorder.results[1] != nil }
        #expect(recorder.results[1] == 65536)
        engine.fsync(fd: fd, datasync: true, userData: IOLoop.userData(id, 2))
        run(loop) { recorder.results[2] != nil }
        #expect(recorder.results[2] == 0)
        memset(buffer.pointer, 0, 65536)
        engine.read(fd: fd, buffer: buffer.pointer, length: 65536, offset: 4096, fixedIndex: buffer.fixedIndex, userData: IOLoop.userData(id, 3))
        run(loop) { recorder.results[3] != nil }
        #expect(recorder.results[3] == 65536)
        #expect(UnsafeRawBufferPointer(start: buffer.pointer, count: 65536).allSatisfy { $0 == 0x5a })
        // The same read offloaded (a kernel worker or the engine's threads copy it).
        memset(buffer.pointer, 0, 65536)
        engine.read(fd: fd, buffer: buffer.pointer, length: 65536, offset: 4096, fixedIndex: buffer.fixedIndex, offload: true, userData: IOLoop.userData(id, 5))
        run(loop) { recorder.results[5] != nil }
        #expect(recorder.results[5] == 65536)
        #expect(UnsafeRawBufferPointer(start: buffer.pointer, count: 65536).allSatisfy { $0 == 0x5a })
        engine.fallocate(fd: fd, mode: ctandem_FALLOC_FL_PUNCH_HOLE | ctandem_FALLOC_FL_KEEP_SIZE, offset: 4096, length: 8192, userData: IOLoop.userData(id, 4))
        run(loop) { recorder.results[4] != nil }
        #expect(recorder.results[4] == 0)
        var check = [UInt8](repeating: 1, count: 8192)
        #expect(pread(fd, &check, 8192, 4096) == 8192)
        #expect(check.allSatisfy { $0 == 0 }, "punched range reads as zeros")
        pool.release(buffer)
    }

    /// io_uring: an offloaded page-cache write goes to the ring (its io-wq worker for the file)
    /// unless it has FUA, which goes to the engine's threads; both land.
    @Test func uringOffloadedWritesTakeTheRingUnlessFUA() throws {
        let engine = try UringEngine(reason: "test")
        let rig = DiskRig(engine)
        let (pool, loop, recorder, id, fd) = (rig.pool, rig.loop, rig.recorder, rig.id, rig.fd)
        let buffer = pool.take(1 << 18)!
        defer { pool.release(buffer) }
        memset(buffer.pointer, 0x33, 1 << 18)
        engine.write(fd: fd, buffer: buffer.pointer, length: 1 << 18, offset: 0, fixedIndex: -1, fua: false, offload: true, userData: IOLoop.userData(id, 1))
        run(loop) { recorder.results[1] != nil }
        #expect(recorder.results[1] == 1 << 18)
        #expect(!engine.offloadPoolStarted)
        memset(buffer.pointer, 0x44, 1 << 18)
        engine.write(fd: fd, buffer: buffer.pointer, length: 1 << 18, offset: 1 << 18, fixedIndex: -1, fua: true, offload: true, userData: IOLoop.userData(id, 2))
        run(loop) { recorder.results[2] != nil }
        #expect(recorder.results[2] == 1 << 18)
        #expect(engine.offloadPoolStarted)
        var check = [UInt8](repeating: 0, count: 1 << 19)
        #expect(pread(fd, &check, 1 << 19, 0) == 1 << 19)
        #expect(check[0..<(1 << 18)].allSatisfy { $0 == 0x33 })
        #expect(check[(1 << 18)...].allSatisfy { $0 == 0x44 })
    }

    /// A large page-cache write without FUA is written in pieces, so the page cache holds no
    /// folio larger than a piece, and completes once with all its bytes; a failed piece fails it.
    @Test(arguments: kinds)
    func largePageCacheWritesGoInPieces(kind: IOEngineKind) throws {
        let rig = DiskRig(try IOEngineFactory.make(kind))
        let (engine, pool, loop, recorder, id, fd) = (rig.engine, rig.pool, rig.loop, rig.recorder, rig.id, rig.fd)
        let length = 1 << 20
        let buffer = pool.take(length)!
        defer { pool.release(buffer) }
        for i in 0..<length { buffer.pointer.storeBytes(of: UInt8(truncatingIfNeeded: i / 4096 &+ i), toByteOffset: i, as: UInt8.self) }
        engine.write(fd: fd, buffer: buffer.pointer, length: length, offset: 0, fixedIndex: -1, fua: false, offload: true, userData: IOLoop.userData(id, 1))
        run(loop) { recorder.results[1] != nil }
        #expect(recorder.results[1] == Int32(length))
        var check = [UInt8](repeating: 0, count: length)
        #expect(pread(fd, &check, length, 0) == length)
        #expect(check.withUnsafeBytes { memcmp($0.baseAddress!, buffer.pointer, length) } == 0)
        if let largest = largestCachedFolio(fd: fd, length: length) {
            #expect(largest <= Limits.pageCacheWritePieceBytes, "a folio of \(largest) bytes")
        }
        // Every piece fails on a descriptor not open for writing: one completion, the error.
        let readOnly = open(rig.path, O_RDONLY)
        defer { close(readOnly) }
        engine.write(fd: readOnly, buffer: buffer.pointer, length: length, offset: 0, fixedIndex: -1, fua: false, offload: true, userData: IOLoop.userData(id, 2))
        run(loop) { recorder.results[2] != nil }
        #expect(recorder.results[2] == -EBADF)
        recorder.results[2] = nil
        loop.runOnce(timeoutNanos: 10_000_000)
        #expect(recorder.results[2] == nil, "a second completion for the failed write")
    }

    /// The largest folio among the file's cached pages in `0..<length`, from the page flags
    /// (`/proc/kpageflags`); nil where page frames are not readable (not root).
    func largestCachedFolio(fd: Int32, length: Int) -> Int? {
        guard let map = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0), map != MAP_FAILED else { return nil }
        defer { munmap(map, length) }
        let pages = length / 4096
        var resident = [UInt8](repeating: 0, count: pages)
        guard mincore(map, length, &resident) == 0 else { return nil }
        let pagemap = open("/proc/self/pagemap", O_RDONLY), flags = open("/proc/kpageflags", O_RDONLY)
        defer { close(pagemap); close(flags) }
        guard pagemap >= 0, flags >= 0 else { return nil }
        var largest = 0, run = 0
        for page in 0..<pages where resident[page] & 1 != 0 {
            _ = map.load(fromByteOffset: page * 4096, as: UInt8.self)
            var entry: UInt64 = 0, pageFlags: UInt64 = 0
            guard pread(pagemap, &entry, 8, off_t((UInt(bitPattern: map) / 4096 + UInt(page)) * 8)) == 8 else { return nil }
            let frame = entry & ((1 << 55) - 1)
            guard entry >> 63 == 1, frame != 0, pread(flags, &pageFlags, 8, off_t(frame * 8)) == 8 else { return nil }
            run = pageFlags >> 16 & 1 == 1 ? run + 1 : 1  // KPF_COMPOUND_TAIL continues a folio
            largest = max(largest, run * 4096)
        }
        return largest
    }

    /// An engine and loop with a connected socket pair: `fds[0]` adopted by the engine, `fds[1]`
    /// the test's end; `incoming` receives 64 bytes.
    final class SocketRig {
        let engine: any IOEngine
        let loop: IOLoop
        let recorder = Recorder()
        let id: UInt32
        var fds: [Int32] = [-1, -1]
        let incoming = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 8)

        init(_ kind: IOEngineKind, pollNanos: UInt64 = 0, busyLoops: BusyLoops? = nil) throws {
            engine = try IOEngineFactory.make(kind, pollNanos: pollNanos, busyLoops: busyLoops)
            loop = IOLoop(engine: engine, pool: BufferPool(), logger: Logger(label: "test"))
            id = loop.register(recorder)
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw SystemError("socketpair", errno: errno) }
            engine.adoptSocket(fds[0])
        }

        deinit {
            close(fds[0])
            close(fds[1])
            incoming.deallocate()
        }

        func recv(tag: UInt32) {
            engine.recv(fd: fds[0], buffer: incoming, length: 64, waitAll: false, userData: IOLoop.userData(id, tag))
        }
    }

    @Test(arguments: kinds)
    func socketsRecvSendAccept(kind: IOEngineKind) throws {
        let rig = try SocketRig(kind)
        let (engine, loop, recorder, id, fds, incoming) = (rig.engine, rig.loop, rig.recorder, rig.id, rig.fds, rig.incoming)
        // The receive is posted before any data exists: it must wait, then complete.
        engine.recv(fd: fds[0], buffer: incoming, length: 64, waitAll: false, userData: IOLoop.userData(id, 1))
        loop.runOnce(timeoutNanos: 10_000_000)
        #expect(recorder.results[1] == nil)
        #expect(write(fds[1], "hello", 5) == 5)
        run(loop) { recorder.results[1] != nil }
        #expect(recorder.results[1] == 5)
        #expect(String(decoding: UnsafeRawBufferPointer(start: incoming, count: 5), as: UTF8.self) == "hello")
        // Gathered send of two pieces.
        let a = Array("tan".utf8), b = Array("dem".utf8)
        a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                var iov = [iovec(iov_base: UnsafeMutableRawPointer(mutating: pa.baseAddress), iov_len: 3),
                           iovec(iov_base: UnsafeMutableRawPointer(mutating: pb.baseAddress), iov_len: 3)]
                iov.withUnsafeMutableBufferPointer { iovs in
                    var msg = msghdr()
                    msg.msg_iov = iovs.baseAddress
                    msg.msg_iovlen = 2
                    withUnsafePointer(to: &msg) { engine.sendmsg(fd: fds[0], message: $0, userData: IOLoop.userData(id, 2)) }
                    run(loop) { recorder.results[2] != nil }
                }
            }
        }
        #expect(recorder.results[2] == 6)
        var out = [UInt8](repeating: 0, count: 6)
        #expect(read(fds[1], &out, 6) == 6)
        #expect(String(decoding: out, as: UTF8.self) == "tandem")
        // Peer closes: a posted receive completes with 0.
        engine.recv(fd: fds[0], buffer: incoming, length: 64, waitAll: false, userData: IOLoop.userData(id, 3))
        shutdown(fds[1], Int32(SHUT_WR))
        run(loop) { recorder.results[3] != nil }
        #expect(recorder.results[3] == 0)
    }

    /// With polling on, a completion that comes while the wait polls is taken without sleeping
    /// (a hit), and a wait with a timeout shorter than the budget still returns at its timeout.
    @Test(arguments: kinds)
    func pollingTakesCompletionsAndKeepsTimeouts(kind: IOEngineKind) throws {
        let budget: UInt64 = 2_000_000_000
        let rig = try SocketRig(kind, pollNanos: budget)
        rig.recv(tag: 1)
        // The data comes from another thread 2 ms into the wait, well within the budget.
        let writer = rig.fds[1]
        let thread = try startThread {
            usleep(2000)
            _ = write(writer, "polled", 6)
        }
        rig.loop.runOnce(timeoutNanos: nil)
        joinThread(thread)
        #expect(rig.recorder.results[1] == 6)
        #expect(String(decoding: UnsafeRawBufferPointer(start: rig.incoming, count: 6), as: UTF8.self) == "polled")
        #expect(rig.engine.pollStats.hits == 1)
        #expect(rig.engine.pollStats.misses == 0)
        #expect(rig.engine.pollStats.pollNanos > 0)
        // Nothing comes: a 10 ms timeout ends the poll long before its 2 s budget. A new
        // engine, because the writer thread may have preempted the first poll, which backs off.
        let idle = try SocketRig(kind, pollNanos: budget)
        idle.recv(tag: 2)
        let start = monotonicNanos()
        idle.loop.runOnce(timeoutNanos: 10_000_000)
        let waited = monotonicNanos() - start
        #expect(idle.recorder.results[2] == nil)
        #expect(waited < budget / 2, "waited \(waited) ns: the poll ignored the timeout")
        #expect(idle.engine.pollStats.misses == 1)
        #expect(idle.engine.pollStats.hits == 0)
        // After the miss the next wait sleeps; the receive still completes.
        #expect(write(idle.fds[1], "x", 1) == 1)
        run(idle.loop) { idle.recorder.results[2] != nil }
        #expect(idle.recorder.results[2] == 1)
    }

    /// While every CPU has a busy loop, a wait sleeps at once instead of polling; once a loop
    /// goes idle, waits poll again.
    @Test(arguments: kinds)
    func noPollingWhileEveryCPUHasABusyLoop(kind: IOEngineKind) throws {
        let busy = BusyLoops(cpus: 2)
        busy.add(1)
        busy.add(1)
        let rig = try SocketRig(kind, pollNanos: 2_000_000_000, busyLoops: busy)
        rig.recv(tag: 1)
        // Nothing comes: a poll would take the whole 10 ms timeout and count a miss.
        rig.loop.runOnce(timeoutNanos: 10_000_000)
        #expect(rig.recorder.results[1] == nil)
        #expect(rig.engine.pollStats.skipped == 1)
        #expect(rig.engine.pollStats.misses == 0 && rig.engine.pollStats.hits == 0 && rig.engine.pollStats.pollNanos == 0)
        #expect(write(rig.fds[1], "x", 1) == 1)
        run(rig.loop) { rig.recorder.results[1] != nil }
        #expect(rig.recorder.results[1] == 1)
        #expect(rig.engine.pollStats.pollNanos == 0)
        // One loop loses its last connection: a CPU is spare, and the next wait polls.
        let skipped = rig.engine.pollStats.skipped
        busy.add(-1)
        rig.recv(tag: 2)
        rig.loop.runOnce(timeoutNanos: 10_000_000)
        #expect(rig.engine.pollStats.misses == 1)
        #expect(rig.engine.pollStats.skipped == skipped)
    }

    @Test func timersFire() throws {
        let loop = IOLoop(engine: try IOEngineFactory.make(.threads), pool: BufferPool(), logger: Logger(label: "test"))
        let recorder = Recorder()
        let id = loop.register(recorder)
        loop.addTimer(id: id, tag: 9, afterNanos: 5_000_000)
        loop.addTimer(id: id, tag: 10, afterNanos: 5_000_000)
        loop.cancelTimers(id: id, tag: 10)
        run(loop) { recorder.results[9] != nil }
        #expect(recorder.results[9] == -ETIME)
        #expect(recorder.results[10] == nil)
    }
}

/// Asks for `ioBatchEnded` again from inside it, `rounds` times in all.
final class ChainedBatchEnd: IOHandler {
    let loop: IOLoop
    var id: UInt32 = 0
    var batchEnds = 0
    let rounds: Int
    var timersFired: [UInt32] = []

    init(loop: IOLoop, rounds: Int) {
        self.loop = loop
        self.rounds = rounds
        id = loop.register(self)
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        timersFired.append(tag)
        if tag == 1 { loop.callAtBatchEnd(id) }
    }

    func ioBatchEnded() {
        batchEnds += 1
        if batchEnds < rounds { loop.callAtBatchEnd(id) }
    }
}

@Suite struct IOLoopTests {
    /// A loop runs a few rounds of batch-end calls per iteration; what is asked for after the
    /// last runs in the next one, and that one must not sleep first: nothing may be in flight to
    /// wake it (a server's resumed connection sending the replies its clients wait for).
    @Test func batchEndsLeftOverDoNotWaitForACompletion() throws {
        let loop = IOLoop(engine: try IOEngineFactory.make(.threads), pool: BufferPool(), logger: Logger(label: "test"))
        let handler = ChainedBatchEnd(loop: loop, rounds: 10)
        loop.addTimer(id: handler.id, tag: 1, afterNanos: 0)
        // A sleeping iteration would end when this timer fires (or after the 1 s bound): the
        // timer must not fire before every batch-end call ran.
        loop.addTimer(id: handler.id, tag: 2, afterNanos: 500_000_000)
        for _ in 0..<10 where handler.batchEnds < 10 { loop.runOnce(timeoutNanos: 1_000_000_000) }
        #expect(handler.batchEnds == 10)
        #expect(handler.timersFired == [1], "the loop slept until the next timer with batch-end calls pending")
    }
}

@Suite struct BufferPoolTests {
    @Test func takesTheSmallestFittingClassAndRunsOut() {
        let pool = BufferPool(classes: [.init(bytes: 4096, count: 2), .init(bytes: 32 << 20, count: 1)])
        let a = pool.take(100)!
        #expect(a.capacity == 4096)
        #expect(Int(bitPattern: a.pointer) % 4096 == 0, "page aligned for O_DIRECT")
        let b = pool.take(4096)!
        let c = pool.take(1)!
        #expect(c.capacity == 32 << 20, "falls back to a larger class")
        #expect(pool.take(1) == nil, "empty pool is back-pressure, not an allocation")
        pool.release(b)
        #expect(pool.take(10) == b)
        pool.release(a)
        pool.release(b)
        pool.release(c)
        #expect(pool.freeCounts == [2, 1])
    }
}

@Suite(.serialized) struct ConnectTests {
    @Test(arguments: [IOEngineKind.threads])
    func connectsToAListener(kind: IOEngineKind) throws {
        let engine = try IOEngineFactory.make(kind)
        let loop = IOLoop(engine: engine, pool: BufferPool(classes: [.init(bytes: 4096, count: 1), .init(bytes: 32 << 20, count: 1)]), logger: Logger(label: "test"))
        let recorder = Recorder()
        let id = loop.register(recorder)
        let (listener, bound) = try Sockets.listen(host: "127.0.0.1", port: 0)
        defer { close(listener) }
        engine.adoptSocket(listener)
        engine.accept(fd: listener, userData: IOLoop.userData(id, 1))
        let client = try Sockets.stream(family: bound.family)
        defer { close(client) }
        engine.adoptSocket(client)
        // The engine reads the address when it submits, so it must outlive this call.
        let address = UnsafeMutablePointer<SocketAddress>.allocate(capacity: 2)
        defer { address.deallocate() }
        address.initialize(to: bound)
        engine.connect(fd: client, address: SocketAddress.sockaddrPointer(address), length: bound.length, userData: IOLoop.userData(id, 2))
        run(loop) { recorder.results[1] != nil && recorder.results[2] != nil }
        #expect(recorder.results[2] == 0)
        let accepted = recorder.results[1]!
        #expect(accepted >= 0)
        close(accepted)
        // Nobody listens on the port any more after closing: connecting is refused.
        let (other, otherAddress) = try Sockets.listen(host: "127.0.0.1", port: 0)
        close(other)
        let refused = try Sockets.stream(family: otherAddress.family)
        defer { close(refused) }
        engine.adoptSocket(refused)
        (address + 1).initialize(to: otherAddress)
        engine.connect(fd: refused, address: SocketAddress.sockaddrPointer(address + 1), length: otherAddress.length, userData: IOLoop.userData(id, 3))
        run(loop) { recorder.results[3] != nil }
        #expect(recorder.results[3] == -ECONNREFUSED)
    }

    /// What Benchmarks/IOUring times: a no-op completes with 0 and its own userData, and a batch
    /// larger than the completion array is reaped over several waits.
    @Test func uringNopsCompleteWithTheirUserData() throws {
        let engine = try UringEngine(reason: "test", entries: 64)
        let out = UnsafeMutableBufferPointer<ctandem_cqe>.allocate(capacity: 16)
        defer { out.deallocate() }
        for i in 0..<40 { engine.nop(userData: UInt64(1000 + i)) }
        var seen = Set<UInt64>()
        for _ in 0..<100 where seen.count < 40 {
            let n = engine.wait(into: out, timeoutNanos: 100_000_000)
            for c in out.prefix(n) {
                #expect(c.res == 0)
                seen.insert(c.user_data)
            }
        }
        #expect(seen == Set((0..<40).map { UInt64(1000 + $0) }))
    }

    /// The read window's test (NBDConnection.largeReadIsCached): cachestat counts the pages of a
    /// range the page cache holds, none once they are dropped.
    @Test func cachedPagesCountsWhatThePageCacheHolds() throws {
        let (path, fd) = tempFile(size: 0)
        defer { close(fd); unlink(path) }
        let bytes = 1 << 20
        let data = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
        defer { data.deallocate() }
        memset(data, 0x5a, bytes)
        #expect(pwrite(fd, data, bytes, 0) == bytes)
        let pages = ctandem_cached_pages(fd, 0, UInt64(bytes))
        try #require(pages != -Int64(ENOSYS), "cachestat needs Linux 6.5")
        #expect(pages == Int64(bytes / 4096))
        // Partly: a range starting mid-page counts each page it touches.
        #expect(ctandem_cached_pages(fd, 100, 8192) == 3)
        #expect(fdatasync(fd) == 0)
        #expect(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        #expect(ctandem_cached_pages(fd, 0, UInt64(bytes)) == 0)
        #expect(ctandem_cached_pages(-1, 0, 4096) == -Int64(EBADF))
    }

    @Test func listenReportsPortInUse() throws {
        let (fd, bound) = try Sockets.listen(host: "127.0.0.1", port: 0)
        defer { close(fd) }
        let port = UInt16(bound.description.split(separator: ":").last!)!
        #expect(throws: SystemError.self) { try Sockets.listen(host: "127.0.0.1", port: port) }
    }
}
