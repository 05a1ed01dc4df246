import TandemCore

/// What a run may do besides the default fault mix.
public struct SimOptions: Sendable {
    /// After a primary crash, the operator promotes the survivor (`ReplicaCore.promote`, retried
    /// until the core agrees); the old primary comes back as secondary.
    public var failover = false
    /// Let the client send writes that overlap writes still in flight (NBD leaves their order
    /// undefined; Tandem applies them in arrival order on both disks, and the model expects
    /// that; the read-back at each answer is not checked, a newer write may be on the disk).
    public var overlappingClientWrites = false
    /// Inject disk errors on the primary too (by default only the secondary's disk fails). One
    /// disk fails at a time: with both detached no copy is consistent.
    public var primaryDiskErrors = false
    /// Crash a node while the other is down or has not yet noticed an earlier crash (by default
    /// faults are single: the issue's invariants are about surviving one node's loss).
    public var doubleFaults = false
    /// Planned switchovers during load: the primary demotes (clients drained, both sides
    /// flushed, `ReplicaCore.demote`), the secondary is promoted once it sees the demotion.
    public var switchover = false
    /// A witness: quorum, fencing before writing without the peer, automatic failover (the
    /// client follows the new primary), deposing; faults cut a node off from its peer and the
    /// witness, and restart the witness (it forgets what it recorded).
    public var witness = false
    /// Point-in-time barriers and rollback: the primary creates barriers under load, each node
    /// keeps an undo store and saves chunks before overwriting them, and an operator rolls the
    /// secondary back to a barrier (the primary demoted first); a rollback must yield exactly the
    /// barrier's image, on both nodes after the resync that follows.
    public var barriers = false
    /// Print every event as it happens (for replaying one seed).
    public var verbose = false
    /// Events kept for the trace printed on failure.
    public var traceEvents = 48
    /// Runs in parallel pass different slots, so a trap names every seed in flight.
    public var slot = 0

    public init(failover: Bool = false, overlappingClientWrites: Bool = false, primaryDiskErrors: Bool = false, doubleFaults: Bool = false,
                switchover: Bool = false, witness: Bool = false, barriers: Bool = false, verbose: Bool = false, traceEvents: Int = 48, slot: Int = 0) {
        self.slot = slot
        self.barriers = barriers
        self.witness = witness
        self.switchover = switchover
        self.primaryDiskErrors = primaryDiskErrors
        self.doubleFaults = doubleFaults
        self.failover = failover
        self.overlappingClientWrites = overlappingClientWrites
        self.verbose = verbose
        self.traceEvents = traceEvents
    }
}

/// A broken invariant, with the seed that replays it.
public struct SimFailure: Sendable, CustomStringConvertible {
    public var seed: UInt64
    public var nanos: UInt64
    public var message: String
    /// The last events before the failure, oldest first.
    public var trace: [String]

    public var description: String {
        var lines = ["seed \(seed) failed at \(SimFormat.time(nanos)): \(message)", "last \(trace.count) events:"]
        lines += trace.map { "  \($0)" }
        lines.append("replay: tandem sim --seed \(seed) --verbose")
        return lines.joined(separator: "\n")
    }
}

/// The outcome of one seed.
public struct SimReport: Sendable {
    public var seed: UInt64
    public var failure: SimFailure?
    public var events = 0
    public var clientOps = 0
    public var simNanos: UInt64 = 0
    /// Faults and notable transitions, by name (for coverage: did the seed do anything?).
    public var counts: [String: Int] = [:]
}

enum SimFormat {
    static func time(_ nanos: UInt64) -> String {
        let micros = nanos / 1000
        let s = micros / 1_000_000, us = micros % 1_000_000
        let frac = String(us)
        return "\(s).\(String(repeating: "0", count: 6 - frac.count))\(frac)s"
    }
}

/// What travels on a simulated connection. Data is carried as block values, not bytes.
enum Wire {
    case hello(PeerHello)
    case message(PeerMessage)
    /// A replicated write and the value its blocks get.
    case write(PeerWrite, WriteKind, value: UInt64)
    case resync(PeerResyncData, values: [UInt64])
}

/// One TCP connection: in order per direction, everything in flight lost when it dies.
struct Connection {
    var alive = true
    /// Messages towards node 0 and node 1.
    var queues: [[Wire]] = [[], []]
    var heads = [0, 0]
    var lastDelivery: [UInt64] = [0, 0]

    var isDrained: Bool { heads[0] == queues[0].count && heads[1] == queues[1].count }
}

enum Event {
    case clientIssue
    case fault
    case diskDone(node: Int, life: Int, op: Int)
    case deliver(conn: Int, to: Int)
    /// A node learns its connection is gone (reset, close, or its ping timeout).
    case linkNotice(node: Int, conn: Int)
    /// A connection one side closed after sending (`closeAfterSending`): its messages are all
    /// delivered, now it goes down for the other side too.
    case closedAfterSending(conn: Int)
    case connect
    case tick(node: Int, life: Int)
    case restart(node: Int, life: Int)
    /// The operator promotes the survivor (`tandem primary`), retried until the core agrees.
    case promote(node: Int, life: Int, tries: Int)
    case diskHealthy(node: Int)
    case writeback(node: Int)
    case partitionTimeout(conn: Int)
    case healCheck
    /// The next step of a planned switchover (`Switchover`).
    case switchoverStep
    /// The witness (`World+Witness.swift`).
    case witnessDial(node: Int, life: Int)
    case witnessDeliver(conn: Int, toWitness: Bool)
    case witnessNotice(conn: Int, atWitness: Bool)
    case witnessTimeout(conn: Int)
    case witnessStart(life: Int)
    /// The next step of a node's own demotion (`Demotion`).
    case demotionStep(node: Int, life: Int)
    /// Barriers (`World+Barriers.swift`): the secondary records one; copy-on-write's read of
    /// chunks to save and sync of the undo store; a rollback's next restores and its end.
    case barrierRecord(node: Int, life: Int)
    case cowRead(node: Int, life: Int, id: UInt32, firstChunk: UInt64, chunkCount: Int)
    case cowSync(node: Int, life: Int, through: UInt64)
    case rollbackStep(node: Int, life: Int)
    case rollbackDone(node: Int, life: Int)
    /// A crash aimed at a rollback in progress (the windows are short for the random faults).
    case rollbackCrash(node: Int, life: Int)
    /// The peer answered a rollback's notice: acted on after the batch it came in, as the node.
    case rollbackNoticeAnswered(node: Int, life: Int)
}

/// A min-heap of events by time, ties in scheduling order (so a run is a function of the seed).
struct EventQueue {
    private var heap: [(time: UInt64, order: UInt64, event: Event)] = []
    private var order: UInt64 = 0

    var isEmpty: Bool { heap.isEmpty }

    mutating func push(_ time: UInt64, _ event: Event) {
        order += 1
        heap.append((time, order, event))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(i, parent) else { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    mutating func pop() -> (time: UInt64, event: Event)? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count && less(l, m) { m = l }
            if r < heap.count && less(r, m) { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
        return (top.time, top.event)
    }

    private func less(_ a: Int, _ b: Int) -> Bool {
        heap[a].time != heap[b].time ? heap[a].time < heap[b].time : heap[a].order < heap[b].order
    }
}

/// One line of the trace, formatted only when a run fails (or with `verbose`).
enum TraceEvent {
    case issue(node: Int, op: ClientOp)
    case complete(node: Int, op: ClientOp, result: Int32)
    case submit(node: Int, io: LocalIO)
    case diskDone(node: Int, tag: LocalIO.Tag, result: Int32)
    case deliver(to: Int, conn: Int, String)
    case linkUp(node: Int, conn: Int, decision: String)
    case linkDown(node: Int, conn: Int)
    case dropLink(node: Int, LinkDownReason)
    case connect(conn: Int)
    case fault(String)
    case state(node: Int, ReplicaStatus)
    case note(String)

    func text(_ nanos: UInt64) -> String {
        let t = SimFormat.time(nanos)
        switch self {
        case .issue(let n, let op): return "\(t) n\(n) client issues \(op)"
        case .complete(let n, let op, let r): return "\(t) n\(n) client gets \(r) for \(op)"
        case .submit(let n, let io): return "\(t) n\(n) disk submit \(io.tag) \(io.operation) blocks \(io.offset / 4096)+\((UInt64(io.length) + 4095) / 4096)"
        case .diskDone(let n, let tag, let r): return "\(t) n\(n) disk done \(tag) -> \(r)"
        case .deliver(let n, let c, let what): return "\(t) n\(n) receives on c\(c): \(what)"
        case .linkUp(let n, let c, let d): return "\(t) n\(n) link up c\(c): \(d)"
        case .linkDown(let n, let c): return "\(t) n\(n) link down c\(c)"
        case .dropLink(let n, let r): return "\(t) n\(n) core drops link: \(r)"
        case .connect(let c): return "\(t) connection c\(c) established"
        case .fault(let what): return "\(t) FAULT \(what)"
        case .state(let n, let s): return "\(t) n\(n) state \(s.role) disk \(s.disk) peer \(s.peerDisk.map { "\($0)" } ?? "-") link \(s.link) \(s.sync) oos \(s.outOfSyncBytes / 4096) blocks"
        case .note(let what): return "\(t) \(what)"
        }
    }
}

/// A client request as the workload generated it.
struct ClientOp: CustomStringConvertible {
    enum Kind: Equatable {
        case write, trim, zeroes(noHole: Bool), flush
    }

    var key: Int
    var kind: Kind
    var first: Int
    var count: Int
    var fua: Bool
    /// The value the blocks get (the op's sequence number).
    var seq: UInt64
    /// For a flush: acknowledged writes it covers (entries of the ack log).
    var flushMark: Int = 0

    var isWrite: Bool { kind != .flush }

    var description: String {
        kind == .flush ? "flush#\(key)" : "\(kind)\(fua ? "+fua" : "")#\(key) blocks \(first)+\(count) value \(seq)"
    }
}

extension SplitMix64 {
    /// A value in lo...hi.
    mutating func between(_ lo: UInt64, _ hi: UInt64) -> UInt64 {
        lo + next() % (hi - lo + 1)
    }

    /// True with probability permille / 1000.
    mutating func chance(_ permille: Int) -> Bool {
        below(1000) < permille
    }
}
