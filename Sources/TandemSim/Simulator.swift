import TandemCore

/// Deterministic simulation of a replicated pair: two `ReplicaCore`s (the production code,
/// unchanged) with the duties `ReplicatedNode` carries out around them, on simulated disks, a
/// simulated network and a simulated clock, driven by a workload and faults, all from one seed.
///
/// `run(seed:)` returns a report; a broken invariant comes back as a `SimFailure` with the seed
/// and the last events. DEVELOPERS.md ("Simulator") lists what is modelled and checked.
public enum Simulator {
    public static func run(seed: UInt64, options: SimOptions = SimOptions()) -> SimReport {
        SimCrashReporter.begin(seed: seed, slot: options.slot)
        defer { SimCrashReporter.end(slot: options.slot) }
        let world = World(seed: seed, options: options)
        world.run()
        return world.report
    }
}

// MARK: - Timing (nanoseconds of simulated time)

enum SimTime {
    static let ms: UInt64 = 1_000_000
    static let us: UInt64 = 1_000
    static let tick = 100 * ms
    /// Ping timeout: a silent peer is declared gone after this (scaled down from 15 s).
    static let peerTimeout = 1500 * ms
    static let healDeadline = 60_000 * ms
    static let eventsMax = 2_000_000
}

final class World {
    let seed: UInt64
    let options: SimOptions
    var rng: SplitMix64
    /// Which rollbacks restore slowly (`--witness --barriers`): a stream of its own, so the choice
    /// moves no other event of a seed.
    var rollbackPace: SplitMix64
    var now: UInt64 = 0
    var queue = EventQueue()
    var nodes: [SimNode]
    var conns: [Connection] = []
    var partitionUntil: UInt64 = 0
    var connectScheduled = false
    /// The node clients write to.
    var primaryNode: Int

    // Workload.
    var opsTotal: Int
    var opsIssued = 0
    var inFlightMax: Int
    var pending: [ClientOp] = []
    var nextSeq: UInt64 = 1
    var nextKey = 1

    // Faults.
    var healing = false
    var healStarted: UInt64 = 0
    var lastNudge: UInt64 = 0
    /// A primary the operator demoted because its peer held newer data: promoted again once it
    /// has resynced from the peer.
    var promoteAfterResync: Int?
    var verifiedAfterCorruption = false
    var corruptionInjected = false
    var lastCrash: UInt64?
    /// A planned switchover in progress.
    var switchover: Switchover?
    // The witness (`--witness`).
    var witness = SimWitness()
    var witnessConns: [WitnessConnection] = []
    /// Until when each node is cut off from its peer and the witness.
    var isolatedUntil: [UInt64] = [0, 0]
    /// Requests the client sent to a primary it then left (the witness promoted the other
    /// node): by workload key, answered or not.
    var orphans: [Int: ClientOp] = [:]
    /// The secondary failed a replicated write, or the transfer log overflowed: the primary then
    /// keeps blocks out of sync on an established link until the next connect.
    var peerWriteFailed = false
    // Barriers (`--barriers`).
    var nextBarrierID: UInt64 = 1
    /// Each barrier's image: the value of every block in the stream cut where it was created.
    var barrierImages: [UInt64: [UInt64]] = [:]
    /// The barrier a switchover in progress rolls the secondary back to, instead of promoting it.
    var rollbackBarrier: UInt64?

    // The model of what the device must return (see `Checker` below).
    var floor: [UInt64]
    var exact: [Bool]
    /// The newest write whose outcome on the block is unknown (it failed, or was lost in a
    /// crash): an older write acknowledged later does not make the block exact again.
    var unsettledSeq: [UInt64]
    var stable: [UInt64]
    var maxSeq: [UInt64]
    /// Per node, blocks whose acknowledged value no flush had covered when the node lost power
    /// (its disk may have dropped it): if the other node's disk then detaches, the pair goes on
    /// with this node's copy.
    var lostAtPowerLoss: [[Bool]]
    var ackLog: [(first: Int, count: Int, seq: UInt64)] = []
    var stabilized = 0

    // Trace and outcome.
    var trace: [(UInt64, TraceEvent)?]
    var traceNext = 0
    var report: SimReport
    var done = false

    init(seed: UInt64, options: SimOptions) {
        self.seed = seed
        self.options = options
        rng = SplitMix64(seed: seed)
        rollbackPace = SplitMix64(seed: ~seed)
        report = SimReport(seed: seed)
        trace = Array(repeating: nil, count: max(1, options.traceEvents))
        let uuids = GenerationUUIDs(current: 0x5EED_0000 | (seed & 0xFFFF) << 1, bitmap: 0, history0: 0, history1: 0)
        let meta = SimMetadata(uuids: uuids, flags: [.consistent])
        nodes = [SimNode(id: 0, meta: meta), SimNode(id: 1, meta: meta)]
        primaryNode = 0
        opsTotal = 0
        inFlightMax = 1
        floor = Array(repeating: 0, count: SimLayout.blocks)
        lostAtPowerLoss = Array(repeating: Array(repeating: false, count: SimLayout.blocks), count: 2)
        exact = Array(repeating: true, count: SimLayout.blocks)
        unsettledSeq = Array(repeating: 0, count: SimLayout.blocks)
        stable = floor
        maxSeq = floor
        primaryNode = rng.below(2)
        opsTotal = 60 + rng.below(340)
        inFlightMax = 1 + rng.below(8)
        // Barriers: longer runs, so that barriers are kept and rolled back to, several times.
        if options.barriers { opsTotal += 400 }
    }

    // MARK: Running

    func run() {
        for i in 0..<2 { restart(i) }
        queue.push(now, .clientIssue)
        queue.push(now + rng.between(10 * SimTime.ms, 200 * SimTime.ms), .fault)
        for i in 0..<2 { queue.push(now + rng.between(1, 50) * SimTime.ms, .writeback(node: i)) }
        while !done, let (time, event) = queue.pop() {
            precondition(time >= now, "sim: time went backwards")
            now = time
            report.events += 1
            if report.events > SimTime.eventsMax { fail("no end after \(SimTime.eventsMax) events (livelock?)") }
            handle(event)
        }
        if !done && report.failure == nil { fail("the event queue ran dry before the run ended") }
        report.simNanos = now
        report.clientOps = opsIssued
    }

    func count(_ what: String) { report.counts[what, default: 0] += 1 }

    func record(_ event: TraceEvent) {
        if options.verbose { print(event.text(now)) }
        trace[traceNext % trace.count] = (now, event)
        traceNext += 1
    }

    func fail(_ message: String) {
        guard report.failure == nil else { return }
        var lines: [String] = []
        for i in 0..<trace.count {
            if let (t, e) = trace[(traceNext + i) % trace.count] { lines.append(e.text(t)) }
        }
        report.failure = SimFailure(seed: seed, nanos: now, message: message, trace: lines)
        done = true
    }

    func handle(_ event: Event) {
        switch event {
        case .clientIssue:
            clientIssue()
        case .fault:
            guard !healing else { return }
            injectFault()
            checkContinuously()
            queue.push(now + rng.between(20, 400) * SimTime.ms, .fault)
        case .diskDone(let i, let life, let op):
            guard nodes[i].up, nodes[i].life == life else { return }
            diskCompleted(i, op)
        case .deliver(let c, let to):
            deliver(c, to: to)
        case .linkNotice(let i, let c):
            linkNotice(i, c)
        case .closedAfterSending(let c):
            kill(c, noticeDelay: [0, 0])
        case .connect:
            connectScheduled = false
            connect()
        case .tick(let i, let life):
            guard nodes[i].up, nodes[i].life == life else { return }
            tick(i)
            queue.push(now + SimTime.tick, .tick(node: i, life: life))
        case .restart(let i, let life):
            guard !nodes[i].up, nodes[i].life == life else { return }
            restart(i)
        case .promote(let i, let life, let tries):
            guard nodes[i].up, nodes[i].life == life, nodes[i].core.role == .secondary, i == primaryNode else { return }
            switch switchover {
            case .rollingBack, .askingRollback, .restoring, .afterRollback: return  // the rollback promotes when it is done
            case .promoting:
                // The switchover promotes, once both are connected and the node has seen the
                // demotion, or gives up and promotes the old primary. A promotion left over from
                // an earlier turn as primaryNode (queued at a restart 1.5 s before) must not
                // promote it alone: the demoted peer holds writes it lacks
                // (`--barriers --primary-disk-errors --switchover --overlapping-writes` 101116884).
                return
            default: break
            }
            if options.witness && nodes[i].core.link != .connected && nodes[i].core.link != .handshaking {
                // `tandem primary` with a witness and no peer: the witness must agree first.
                if !nodes[i].promotionRequested {
                    var state = witnessState(i)
                    state.role = .primary
                    if witnessRequest(i, state, .promotion) { nodes[i].promotionRequested = true }
                }
                queue.push(now + (tries < 50 ? 100 : 500) * SimTime.ms, .promote(node: i, life: life, tries: tries + 1))
                return
            }
            var refusal: RoleChangeRefusal?
            let fresh = freshUUID()
            call(i) { core, a in refusal = core.promote(force: false, freshUUID: fresh, nowMillis: now / SimTime.ms, into: &a) }
            if refusal == .noUsableData {
                // Its disk is detached and no UpToDate peer serves: the operator attaches it again
                // (a restart); it comes back Inconsistent and is promoted once resynced.
                record(.fault("operator: n\(i) has a detached disk and cannot be promoted: restart it"))
                count("promote refused: detached disk")
                stop(i)
                queue.push(now + 50 * SimTime.ms, .restart(node: i, life: nodes[i].life))
            } else if let refusal {
                // Retried until the core agrees (the peer noticed, a resync into it ended).
                record(.note("promote n\(i) refused: \(refusal)"))
                queue.push(now + (tries < 50 ? 100 : 500) * SimTime.ms, .promote(node: i, life: life, tries: tries + 1))
            } else {
                record(.fault("failover: n\(i) promoted"))
                nodes[i].superblockFlags.insert(.wasPrimary)
                persistMetadata(i)
            }
        case .diskHealthy(let i):
            nodes[i].disk.errorPermille = 0
        case .writeback(let i):
            nodes[i].disk.writeback(rng: &rng)
            queue.push(now + rng.between(1, 50) * SimTime.ms, .writeback(node: i))
        case .partitionTimeout(let c):
            guard conns[c].alive else { return }
            record(.fault("ping timeout on c\(c)"))
            kill(c, noticeDelay: [rng.between(0, 200) * SimTime.ms, rng.between(0, 200) * SimTime.ms])
        case .healCheck:
            healCheck()
        case .switchoverStep:
            switchoverStep()
        case .witnessDial(let i, let life):
            guard nodes[i].up, nodes[i].life == life else { return }
            witnessDial(i)
        case .witnessDeliver(let w, let toWitness):
            witnessDeliver(w, toWitness: toWitness)
        case .witnessNotice(let w, let atWitness):
            witnessNotice(w, atWitness: atWitness)
        case .witnessTimeout(let w):
            guard witnessConns[w].alive else { return }
            record(.fault("witness link w\(w) times out"))
            killWitnessLink(w, nodeDelay: rng.between(0, 200) * SimTime.ms, witnessDelay: rng.between(0, 200) * SimTime.ms)
        case .witnessStart(let life):
            startWitness(life: life)
        case .demotionStep(let i, let life):
            guard nodes[i].up, nodes[i].life == life else { return }
            demotionStep(i)
        case .barrierRecord(let i, let life):
            guard nodes[i].up, nodes[i].life == life else { return }
            recordBarrier(i)
        case .cowRead(let i, let life, let id, let firstChunk, let chunkCount):
            guard nodes[i].up, nodes[i].life == life else { return }
            cowReadDone(i, id: id, firstChunk: firstChunk, chunkCount: chunkCount)
        case .cowSync(let i, let life, let through):
            guard nodes[i].up, nodes[i].life == life else { return }
            cowSyncDone(i, through: through)
        case .rollbackStep(let i, let life):
            guard nodes[i].up, nodes[i].life == life else { return }
            stepRollback(i)
        case .rollbackDone(let i, let life):
            guard nodes[i].up, nodes[i].life == life else { return }
            rollbackDone(i)
        case .rollbackNoticeAnswered(let i, let life):
            guard nodes[i].up, nodes[i].life == life else { return }
            rollbackNoticeAnswered(i)
        case .rollbackCrash(let i, let life):
            guard nodes[i].up, nodes[i].life == life, nodes[other(i)].up || options.doubleFaults else { return }
            lastCrash = now
            crash(i, powerLoss: rng.below(2) == 0)
        }
    }

    func other(_ i: Int) -> Int { 1 - i }

    // MARK: The node's duties (ReplicatedNode, one method per duty)

    /// Calls the core and carries out what it returns, re-entrantly as `ReplicatedNode.perform`
    /// does: actions of a core call made while carrying out others join the same batch.
    func call(_ i: Int, _ body: (inout ReplicaCore, inout [ReplicaCore.Action]) -> Void) {
        var batch: [ReplicaCore.Action] = []
        body(&nodes[i].core, &batch)
        // A full transfer log after a call: its oldest entry may have gone to the bitmap.
        if nodes[i].core.status.transferLogEntries >= SimLayout.transferLogEntriesMax { peerWriteFailed = true }
        nodes[i].actions.append(contentsOf: Self.canonicalOrder(batch))
        guard !nodes[i].performing else { return }
        nodes[i].performing = true
        var k = 0
        while k < nodes[i].actions.count, nodes[i].up {
            let action = nodes[i].actions[k]
            k += 1
            carry(i, action)
        }
        nodes[i].actions.removeAll(keepingCapacity: true)
        nodes[i].performing = false
    }

    /// The core answers requests it finishes together (link loss) by walking a dictionary, in
    /// an order that differs between processes. Any order is one the node could see; sorting
    /// each run of answers by id keeps a seed's replay exact.
    static func canonicalOrder(_ batch: [ReplicaCore.Action]) -> [ReplicaCore.Action] {
        func key(_ a: ReplicaCore.Action) -> (Int, UInt64)? {
            switch a {
            case .completeClient(let id, _): (0, id)
            case .completeClientFlush(let id, _): (1, id)
            default: nil
            }
        }
        var out = batch
        var i = 0
        while i < out.count {
            guard key(out[i]) != nil else { i += 1; continue }
            var j = i
            while j < out.count, key(out[j]) != nil { j += 1 }
            if j - i > 1 { out[i..<j].sort { key($0)! < key($1)! } }
            i = j
        }
        return out
    }

    func carry(_ i: Int, _ action: ReplicaCore.Action) {
        switch action {
        case .submitLocal(let io):
            if case .client = io.tag, io.operation != .flush, !nodes[i].core.replicating { nodes[i].submittedAlone = true }
            submit(i, io)
        case .send(let message):
            send(i, .message(message))
        case .sendWrite(let write, let kind, _):
            guard let key = nodes[i].clients[write.id], let op = pending.first(where: { $0.key == key }) else {
                return fail("n\(i) core sent write \(write.id), which no client asked for")
            }
            send(i, .write(write, kind, value: op.seq))
        case .sendResync(let data, let buffer):
            guard case .resync(let slot) = buffer, let values = nodes[i].resyncOut.removeValue(forKey: slot) else {
                return fail("n\(i) core sent resync data from \(buffer), which holds no read")
            }
            send(i, .resync(data, values: values))
        case .completeClientFlush(let id, let result) where id == nodes[i].demotionFlushID:
            nodes[i].demotionFlushID = nil
            if nodes[i].demotion != nil { demoteDeposed(i, flushResult: result) } else { demoteAfterFlush(i, result: result) }
        case .completeClient(let id, let result) where mustHold(i), .completeClientFlush(let id, let result) where mustHold(i):
            if hasQuorum(i) {
                nodes[i].held.append((id, result))
            } else {
                nodes[i].held.append((id, -5))
                releaseHeld(i, error: -5)
            }
        case .completeClient(let id, let result), .completeClientFlush(let id, let result):
            guard let key = nodes[i].clients.removeValue(forKey: id) else {
                return fail("n\(i) core answered client request \(id) twice or never asked")
            }
            clientCompleted(i, key: key, clientID: id, result: result)
        case .writeSettled(let offset, let length):
            if nodes[i].activityLog.endWrite(offset: offset, length: UInt64(length)) { admitWaitingWrites(i) }
        case .rollbackNoticeAnswered(let accepted):
            if nodes[i].rollbackAsking?.viaPeer == true {
                nodes[i].rollbackAsking!.peerAnswer = accepted
                queue.push(now, .rollbackNoticeAnswered(node: i, life: nodes[i].life))
            }
        case .dropLink(let reason):
            record(.dropLink(node: i, reason))
            count("core drops link")
            if reason == .administrative, let c = nodes[i].connection, conns[c].alive {
                // `closeAfterSending`, as the node: the disconnect message (what makes the peer
                // outdate itself) reaches the peer, then the close. This side reads nothing more.
                let to = other(i)
                nodes[i].connection = nil
                record(.linkDown(node: i, conn: c))
                queue.push(max(now, conns[c].lastDelivery[to]) + rng.between(10, 500) * SimTime.us, .closedAfterSending(conn: c))
            } else if let c = nodes[i].connection, conns[c].alive {
                var delays = [UInt64(0), UInt64(0)]
                delays[other(i)] = rng.between(10, 500) * SimTime.us
                kill(c, noticeDelay: delays)
            }
        case .recordBarrier(let info):
            guard options.barriers else {
                // Without `--barriers` no barrier is created; were one, it would count at once.
                return call(i) { core, a in core.barrierRecorded(into: &a) }
            }
            recordBarrierRequested(i, info)
        case .stateChanged(let status):
            record(.state(node: i, status))
            if status.disk == .failed && status.role == .primary && !nodes[i].logMarkedAtDetach {
                // As the node (`ReplicaCore.markLogExtentsOfDetachedDisk`).
                nodes[i].logMarkedAtDetach = true
                nodes[i].core.markLogExtentsOfDetachedDisk(nodes[i].activityLog)
                // The model: the peer's copy is the pair's now. A write it acknowledged but lost
                // in a power loss before any flush covered it (the primary had not noticed yet,
                // so it still counted the peer as a full copy) is gone with this disk: by NBD's
                // rules an unflushed write may be lost, and the flush after it fails
                // (`--witness --barriers --switchover --primary-disk-errors` 303937).
                let s = other(i)
                for b in 0..<SimLayout.blocks where lostAtPowerLoss[s][b] && floor[b] > stable[b] && nodes[s].disk.cache[b] != floor[b] {
                    floor[b] = max(stable[b], min(floor[b], nodes[s].disk.cache[b]))
                    uncertain(b, upTo: maxSeq[b])
                }
            }
            persistMetadata(i)
            // As the node: a fresh UUID always ready for the first write without the peer.
            if nodes[i].core.spareUUID == nil { nodes[i].core.spareUUID = freshUUID() }
            let core = nodes[i].core!
            if core.link == .connected && core.sync == .established && core.peerDisk == .upToDate && core.disk == .upToDate
                && core.bitmap.setBitCount == 0 {
                nodes[i].forgetDivergence()
                // In sync again: what its power loss took was resynced (marked by the peer).
                lostAtPowerLoss[i] = Array(repeating: false, count: SimLayout.blocks)
            }
            if options.witness {
                if core.replicating || core.role != .primary { nodes[i].fenced = false }
                if nodes[i].rollbackRecord && nodes[i].rollbackRun == nil && nodes[i].rollbackAsking == nil
                    && (core.role == .primary || (core.link == .connected && core.sync == .established && core.peerDisk == .upToDate
                                                 && core.bitmap.setBitCount == 0)) {
                    // As the node: the peer resynced from the rolled-back node (or it was
                    // promoted); the witness's record ends with the announcement below.
                    nodes[i].rollbackRecord = false
                }
                if !nodes[i].held.isEmpty && core.role == .primary && peerHoldsHeldWrites(i) { releaseHeld(i, error: nil) }
                announceToWitness(i)
            }
        }
    }

    /// `ReplicatedNode.persistMetadata`: UUIDs, flags, dirty bitmap pages.
    func persistMetadata(_ i: Int) {
        guard let core = nodes[i].core else { return }
        nodes[i].meta.uuids = core.uuids
        let keep = nodes[i].superblockFlags.intersection([.wasPrimary])
        var flags = core.localFlags.union(keep)
        flags.remove(.newZeroed)
        if core.disk == .upToDate { flags.insert(.consistent) }
        nodes[i].superblockFlags = flags
        nodes[i].meta.flags = flags
        var page = 0
        while let next = core.bitmap.nextDirtyPage(from: page) {
            core.bitmap.withPageBytes(next) { nodes[i].meta.bitmap.loadPage(next, from: $0) }
            page = next + 1
            if page >= core.bitmap.pageCount { break }
        }
        nodes[i].core.bitmapPersisted()
    }

    /// `ReplicatedNode.init` + `start`: attach the metadata, mark a crashed primary's hot
    /// extents, build the core.
    func restart(_ i: Int) {
        // The node meant to be primary comes back as primary if it was primary when it went
        // down (or at the start); a survivor promoted while the other was away and then
        // restarted comes back secondary and is promoted again by the operator.
        var role: PeerRole = i == primaryNode && (nodes[i].lastRole ?? .primary) == .primary ? .primary : .secondary
        var node = nodes[i]
        // As the node at attach: what a killed process left in the volatile cache is made
        // durable first (a crashed primary is the source of its hot extents).
        node.disk.flushNow()
        let recovery = node.meta.recover()
        var flags = node.meta.flags
        var bitmap = node.meta.bitmap
        bitmap.markAllPagesPersisted()
        if flags.contains(.wasPrimary) || flags.contains(.crashedPrimary) {
            if recovery.isComplete {
                for range in recovery.hotByteRanges(deviceBytes: SimLayout.deviceBytes) {
                    bitmap.setRange(offset: range.lowerBound, length: range.upperBound - range.lowerBound)
                }
            } else {
                bitmap.setAll()
            }
            flags.insert(.crashedPrimary)
        }
        node.activityLog = SimLayout.activityLog(nextSequence: recovery.nextSequence)
        node.logMarkedAtDetach = false
        var disk: PeerDiskState = flags.contains(.resyncTarget) || !flags.contains(.consistent) ? .inconsistent : .upToDate
        if disk == .upToDate && flags.contains(.outdated) { disk = .outdated }
        if disk == .upToDate && role == .secondary && options.witness {
            // As the node with fencing: attached Consistent until a connect finds it current.
            disk = .consistent
        }
        if role == .primary && flags.contains(.resyncTarget) {
            // As the node: a disk that needs a resync (detached, or an unfinished target) starts
            // secondary; the operator promotes it once it is UpToDate.
            role = .secondary
        }
        if i == primaryNode && role == .secondary {
            queue.push(now + SimTime.peerTimeout + rng.between(10, 300) * SimTime.ms, .promote(node: i, life: nodes[i].life, tries: 0))
        }
        if role == .primary && disk == .inconsistent && !flags.contains(.resyncTarget) {
            flags.insert(.consistent)
            disk = .upToDate
        }
        node.superblockFlags = flags
        node.core = ReplicaCore(configuration: SimLayout.configuration(nodeID: UInt8(i), fencing: options.witness), role: role, disk: disk,
                                uuids: node.meta.uuids, bitmap: bitmap, flags: flags)
        node.core.spareUUID = freshUUID()
        node.up = true
        // `UndoStore.init`: the records read back count as saved, so the newest segment is
        // synced before any write (after a killed process they may be in the page cache only).
        node.undo.sync()
        node.undoIndex = node.undo.index()
        nodes[i] = node
        if options.barriers { finishPendingRollback(i) }
        record(.note("n\(i) starts as \(role), disk \(disk), \(bitmap.setBitCount) blocks out of sync, flags \(flags.rawValue)"))
        if role == .primary {
            nodes[i].superblockFlags.insert(.wasPrimary)
            persistMetadata(i)
        } else if flags.contains(.wasPrimary) || flags.contains(.crashedPrimary) {
            // As the node: a secondary keeps `crashedPrimary` (the core clears it when a resync
            // copied the hot extents), never `wasPrimary` (seeds 1393, 3952).
            nodes[i].superblockFlags.remove(.wasPrimary)
            persistMetadata(i)
        }
        queue.push(now + rng.between(0, 100) * SimTime.ms, .tick(node: i, life: nodes[i].life))
        if options.witness { queue.push(now + rng.between(0, 50) * SimTime.ms, .witnessDial(node: i, life: nodes[i].life)) }
        scheduleConnect()
    }

    func tick(_ i: Int) {
        call(i) { core, a in core.tick(nowNanos: now, into: &a) }
        nodes[i].ticks += 1
        if nodes[i].up {
            considerAutomaticFailover(i)
            retryFencing(i)
        }
        if nodes[i].up, nodes[i].core.sync != .established, nodes[i].ticks % 10 == 0 {
            // The resync checkpoint: data synced, then the bitmap that says it is in sync.
            nodes[i].disk.flushNow()
            persistMetadata(i)
        }
    }

    // MARK: Disk

    func submit(_ i: Int, _ io: LocalIO) {
        record(.submit(node: i, io: io))
        let first = Int(io.offset / UInt64(SimLayout.blockBytes))
        let count = Int((UInt64(io.length) + UInt64(SimLayout.blockBytes) - 1) / UInt64(SimLayout.blockBytes))
        let kind: SimDisk.Kind
        switch io.operation {
        case .read:
            kind = .read
        case .flush:
            kind = .flush([])
        case .write(_, let fua):
            let payload: SimDisk.Payload
            switch io.tag {
            case .client(let id):
                guard let key = nodes[i].clients[id], let op = pending.first(where: { $0.key == key }) else {
                    return fail("n\(i) core wrote for client request \(id), which is not in flight")
                }
                payload = .fill(op.seq)
            case .peerWrite(let id):
                guard let value = nodes[i].peerValues[id] else { return fail("n\(i) core wrote peer write \(id), which holds no data") }
                payload = .fill(value)
            case .resyncWrite(let key):
                if io.buffer == nil {
                    payload = .fill(0)
                } else {
                    guard let values = nodes[i].resyncIn[key], values.count == count else {
                        return fail("n\(i) core wrote resync data \(key), which holds no data of that size")
                    }
                    payload = .values(values)
                }
            default:
                return fail("n\(i) core submitted a write with tag \(io.tag)")
            }
            kind = .write(payload, fua: fua)
        }
        let op = SimDisk.Op(tag: io.tag, kind: kind, first: first, count: count)
        // Copy-on-write: the chunks the barriers need are saved and durable before a write
        // reaches the device (ReplicatedNode.submit).
        if options.barriers, case .write = kind { return copyOnWrite(i, op) }
        submitNow(i, op)
    }

    func submitNow(_ i: Int, _ op: SimDisk.Op) {
        let number = nodes[i].disk.submit(op)
        // Latencies are drawn per operation, so completions come back out of order.
        let latency = rng.chance(30) ? rng.between(5, 60) * SimTime.ms : rng.between(20, 1500) * SimTime.us
        queue.push(now + latency, .diskDone(node: i, life: nodes[i].life, op: number))
    }

    /// `ReplicatedNode.localCompleted`: buffers go back, then the core hears the result.
    func diskCompleted(_ i: Int, _ number: Int) {
        guard let (op, result, read) = nodes[i].disk.complete(number, rng: &rng) else { return }
        record(.diskDone(node: i, tag: op.tag, result: result))
        switch op.tag {
        case .peerWrite, .peerFlush: if result < 0 { peerWriteFailed = true }
        default: break
        }
        switch op.tag {
        case .peerWrite(let id): nodes[i].peerValues[id] = nil
        case .resyncWrite(let key): nodes[i].resyncIn[key] = nil
        case .resyncRead(let slot): if let read { nodes[i].resyncOut[slot] = read }
        default: break
        }
        call(i) { core, a in core.localCompleted(op.tag, result: result, into: &a) }
        if case .resyncRead(let slot) = op.tag, nodes[i].up {
            // A read the core dropped as stale: its buffer is not needed (a sent one was taken).
            nodes[i].resyncOut[slot] = nil
        }
    }

    // MARK: Network

    func send(_ i: Int, _ wire: Wire) {
        guard let c = nodes[i].connection, conns[c].alive else { return }
        let to = other(i)
        var at = now + rng.between(20, 600) * SimTime.us
        if rng.chance(10) { at += rng.between(1, 30) * SimTime.ms }  // a slow stretch of the path
        if partitionUntil > now { at = max(at, partitionUntil + rng.between(20, 600) * SimTime.us) }
        let cut = max(isolatedUntil[i], isolatedUntil[to])
        if cut > now { at = max(at, cut + rng.between(20, 600) * SimTime.us) }
        at = max(at, conns[c].lastDelivery[to])  // TCP: in order
        conns[c].lastDelivery[to] = at
        conns[c].queues[to].append(wire)
        queue.push(at, .deliver(conn: c, to: to))
    }

    func deliver(_ c: Int, to: Int) {
        guard conns[c].alive else { return }
        let wire = conns[c].queues[to][conns[c].heads[to]]
        conns[c].heads[to] += 1
        guard nodes[to].up, nodes[to].connection == c else { return }
        switch wire {
        case .hello(let hello):
            record(.deliver(to: to, conn: c, "hello role \(hello.role) disk \(hello.diskState) flags \(hello.flags) uuids \(ReplicaCore.uuids(of: hello))"))
            // Writes answered in the same call come after the decision (those the core held
            // while its hello was out): the decision could not see them.
            let bothWroteAlone = nodes[0].wroteAlone && nodes[1].wroteAlone
            call(to) { core, a in core.linkUp(peer: hello, freshUUID: freshUUID(), into: &a) }
            guard nodes[to].up, let decision = nodes[to].core.lastDecision else { return }
            record(.linkUp(node: to, conn: c, decision: "\(decision.decision) (\(decision.rule)) uuids \(nodes[to].core.uuids)"))
            count(decision.rule == .detachedDisk ? "connect with a detached disk" : "decision \(decision.decision)")
            // A detached disk merges nothing: the decision comes when it is attached again.
            if bothWroteAlone && decision.decision != .splitBrain && decision.rule != .detachedDisk {
                fail("split brain not detected: both nodes acknowledged writes the other lacks, n\(to) decided \(decision.decision) by rule \(decision.rule)")
            }
        case .write(let write, let kind, let value):
            record(.deliver(to: to, conn: c, "\(kind) id \(write.id) blocks \(write.offset / 4096)+\(write.length / 4096) epoch \(write.epoch) value \(value)"))
            nodes[to].peerValues[write.id] = value
            call(to) { core, a in
                switch kind {
                case .write: core.peerWrite(write, kind: .write, into: &a)
                case .trim: core.peerMessage(.trim(write), into: &a)
                case .zeroes: core.peerMessage(.zeroes(write), into: &a)
                }
            }
        case .resync(let data, let values):
            record(.deliver(to: to, conn: c, "resyncData id \(data.id) blocks \(data.offset / 4096)+\(data.length / 4096) result \(data.result)"))
            if nodes[to].core.role == .primary {
                // ReplicatedNode: a primary is never a resync target; this must answer a read.
                record(.note("n\(to) node: unexpected resyncData on a primary, closing"))
                count("resyncData to a primary")
                return kill(c, noticeDelay: [0, 0].map { _ in rng.between(0, 500) * SimTime.us })
            }
            if !values.isEmpty { nodes[to].resyncIn[Int(data.id)] = values }
            call(to) { core, a in core.peerMessage(.resyncData(data, payload: []), into: &a) }
        case .message(let message):
            record(.deliver(to: to, conn: c, "\(Self.brief(message))"))
            if case .writeAck(let id, 0) = message { nodes[to].peerAcked[id] = c }
            call(to) { core, a in core.peerMessage(message, into: &a) }
        }
    }

    static func brief(_ m: PeerMessage) -> String {
        switch m {
        case .bitmapChunk(let chunk): "bitmapChunk bits \(chunk.firstBit)+\(chunk.bitCount) set \(chunk.words.reduce(0) { $0 + $1.nonzeroBitCount })"
        default: "\(m)"
        }
    }

    func freshUUID() -> UInt64 {
        while true {
            let v = rng.next() & ~1
            if v != 0 && v != GenerationUUIDs.initialCurrent { return v }
        }
    }

    /// The connection dies; each side notices after its delay (a reset at once, a silent
    /// peer at the ping timeout).
    func kill(_ c: Int, noticeDelay: [UInt64]) {
        guard conns[c].alive else { return }
        conns[c].alive = false
        for i in 0..<2 where nodes[i].connection == c {
            queue.push(now + noticeDelay[i], .linkNotice(node: i, conn: c))
        }
    }

    /// `ReplicatedNode.peerConnectionDown`.
    func linkNotice(_ i: Int, _ c: Int) {
        guard nodes[i].up, nodes[i].connection == c else { return }
        nodes[i].connection = nil
        record(.linkDown(node: i, conn: c))
        call(i) { core, a in core.linkDown(.peerClosed, freshUUID: freshUUID(), into: &a) }
        persistMetadata(i)
        scheduleConnect()
    }

    func scheduleConnect() {
        guard !connectScheduled else { return }
        connectScheduled = true
        queue.push(now + rng.between(20, 300) * SimTime.ms, .connect)
    }

    /// The dialer reaches the listener: both sides send their hello first (peerConnectionUp).
    func connect() {
        guard nodes[0].up, nodes[1].up else { return }
        guard nodes[0].connection == nil, nodes[1].connection == nil else { return }
        // A node rolling back stands alone (it neither dials nor accepts) until it is done.
        guard nodes[0].rollbackRun == nil, nodes[1].rollbackRun == nil else { return scheduleConnect() }
        guard partitionUntil <= now, isolatedUntil[0] <= now, isolatedUntil[1] <= now else { return scheduleConnect() }
        let c = conns.count
        conns.append(Connection())
        record(.connect(conn: c))
        count("connect")
        for i in 0..<2 { nodes[i].connection = c }
        for i in 0..<2 {
            send(i, .hello(hello(of: i)))
            nodes[i].core.helloSent()
        }
    }

    func hello(of i: Int) -> PeerHello {
        let core = nodes[i].core!
        var flags: UInt16 = 0
        if core.localFlags.contains(.newZeroed) { flags |= PeerFlags.Hello.newZeroed }
        if core.localFlags.contains(.crashedPrimary) { flags |= PeerFlags.Hello.crashedPrimary }
        return PeerHello(nodeID: UInt8(i), role: core.role, diskState: core.disk, flags: flags, resourceName: SimLayout.resourceName,
                         deviceSizeBytes: SimLayout.deviceBytes, bitmapGranularityBytes: UInt32(SimLayout.blockBytes), uuids: ReplicaCore.wire(core.uuids),
                         outOfSyncBits: UInt64(core.bitmap.setBitCount), primarySinceMillis: core.primarySinceMillis)
    }
}
