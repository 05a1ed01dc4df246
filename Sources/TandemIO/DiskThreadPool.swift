import CTandem
import Glibc

/// A few threads doing blocking disk calls (pread, pwritev2, fdatasync, fallocate) for the
/// epoll engine. Jobs and results sit in two fixed-capacity arrays under one mutex; a finished job
/// signals the engine's eventfd. The capacity is every request the node can have in flight, so
/// `submit` never waits for room.
final class DiskThreadPool: ThreadMain, @unchecked Sendable {
    enum Op: UInt8 { case read, write, fsync, fdatasync, fallocate }

    struct Job {
        var op: Op
        var fd: Int32
        var buffer: UnsafeMutableRawPointer? = nil
        var length: Int = 0
        var offset: UInt64 = 0
        /// RWF_* flags for writes, the mode for fallocate.
        var flags: Int32 = 0
        /// A write larger than this (if not 0) is written in pieces of this size
        /// (`Limits.pageCacheWritePieceBytes`).
        var pieceBytes = 0
        var userData: UInt64
    }

    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var jobs: [Job] = []
    private var jobsHead = 0
    private var results: [ctandem_cqe] = []
    private let capacity: Int
    private let eventFD: Int32
    private var stopping = false
    private var threads: [pthread_t] = []
    private let threadCount: Int
    private var started = false

    init(threads: Int, capacity: Int, eventFD: Int32) {
        self.capacity = capacity
        self.eventFD = eventFD
        self.threadCount = threads
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
        jobs.reserveCapacity(capacity)
        results.reserveCapacity(capacity)
    }

    deinit {
        stop()
        pthread_mutex_destroy(mutex)
        pthread_cond_destroy(cond)
        mutex.deallocate()
        cond.deallocate()
    }

    /// Threads start on first use, so an aio engine that never needs them costs nothing.
    private func startThreads() {
        started = true
        for _ in 0..<threadCount {
            do {
                threads.append(try startThread(self))
            } catch {
                preconditionFailure("disk thread: \(error)")
            }
        }
    }

    func submit(_ job: Job) {
        pthread_mutex_lock(mutex)
        if !started { startThreads() }
        precondition(jobs.count - jobsHead + results.count < capacity, "disk queue over its bound")
        jobs.append(job)
        pthread_cond_signal(cond)
        pthread_mutex_unlock(mutex)
    }

    func reap(_ body: (ctandem_cqe) -> Void) {
        pthread_mutex_lock(mutex)
        let done = results
        results.removeAll(keepingCapacity: true)
        pthread_mutex_unlock(mutex)
        for r in done { body(r) }
    }

    func stop() {
        pthread_mutex_lock(mutex)
        if stopping {
            pthread_mutex_unlock(mutex)
            return
        }
        stopping = true
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
        for t in threads { pthread_join(t, nil) }
        threads.removeAll()
    }

    func threadMain() {
        while true {
            pthread_mutex_lock(mutex)
            while jobsHead == jobs.count && !stopping { pthread_cond_wait(cond, mutex) }
            if jobsHead == jobs.count && stopping {
                pthread_mutex_unlock(mutex)
                return
            }
            let job = jobs[jobsHead]
            jobsHead += 1
            if jobsHead == jobs.count {
                jobs.removeAll(keepingCapacity: true)
                jobsHead = 0
            }
            pthread_mutex_unlock(mutex)
            let result = run(job)
            pthread_mutex_lock(mutex)
            results.append(ctandem_cqe(user_data: job.userData, res: result, flags: 0))
            pthread_mutex_unlock(mutex)
            ctandem_eventfd_signal(eventFD)
        }
    }

    private func run(_ job: Job) -> Int32 {
        switch job.op {
        case .read:
            return Int32(ctandem_pread(job.fd, job.buffer, job.length, job.offset))
        case .write where job.pieceBytes > 0 && job.length > job.pieceBytes:
            var done = 0
            while done < job.length {
                let n = min(job.pieceBytes, job.length - done)
                let rc = ctandem_pwrite_flags(job.fd, job.buffer! + done, n, job.offset + UInt64(done), job.flags)
                if rc < 0 { return Int32(rc) }
                done += rc
                if rc < n { break }
            }
            return Int32(done)
        case .write:
            return Int32(ctandem_pwrite_flags(job.fd, job.buffer, job.length, job.offset, job.flags))
        case .fsync, .fdatasync:
            while true {
                let rc = job.op == .fsync ? Glibc.fsync(job.fd) : Glibc.fdatasync(job.fd)
                if rc == 0 { return 0 }
                if errno != EINTR { return -errno }
            }
        case .fallocate:
            return ctandem_fallocate(job.fd, job.flags, job.offset, UInt64(job.length))
        }
    }
}
