import TandemCore

/// A node's undo store as `UndoStore` keeps it in files (Protocol/barriers.md "Undo store"): one
/// segment per retained barrier, its records appended in order, and the rollback marker. This is
/// what survives a crash; the node's in-memory `UndoIndex` is rebuilt from it at every start.
///
/// - A segment exists once created (header and directory synced before the barrier counts).
/// - A record is appended (`durable` false) and made durable by a sync of the newest segment;
///   the previous segments' records were synced when the next barrier was created.
/// - A process crash keeps appended records (the page cache survives); a power loss keeps a
///   prefix of the unsynced ones (recovery cuts a torn tail).
/// - The marker names a rollback that began and has not finished.
/// - At start the newest segment is synced (`UndoStore.init`): every record read back is durable
///   before a write relies on it (seed 40506: a record a power loss spared stayed unsynced, a
///   resync write that needed no save overwrote its chunk durably, and a second power loss
///   took the record).
struct SimUndoStore {
    struct Record {
        var chunk: UInt64
        /// The chunk's blocks as saved.
        var values: [UInt64]
        var durable: Bool
    }

    struct Segment {
        var info: BarrierInfo
        var records: [Record]
    }

    static let geometry = try! UndoGeometry(deviceBytes: SimLayout.deviceBytes, chunkBytes: SimLayout.chunkBytes)
    static var blocksPerChunk: Int { SimLayout.chunkBytes / SimLayout.blockBytes }

    var segments: [Segment] = []
    var pendingRollback: UInt64?

    var ids: [UInt64] { segments.map(\.info.id) }

    /// The index `UndoStore.init` recovers: a record's `dataOffset` is its position in the segment.
    func index() -> UndoIndex {
        var index = UndoIndex(geometry: Self.geometry)
        for segment in segments {
            try! index.addBarrier(segment.info)
            for (n, record) in segment.records.enumerated() { index.addRecord(Self.location(record.chunk, n)) }
        }
        return index
    }

    static func location(_ chunk: UInt64, _ n: Int) -> UndoRecordLocation {
        UndoRecordLocation(chunk: chunk, dataOffset: UInt64(n), dataBytes: geometry.length(ofChunk: chunk), dataChecksum: 0)
    }

    func values(of restore: RollbackPlan.Restore) -> [UInt64] {
        values(of: restore.record, in: restore.barrierID)
    }

    func values(of location: UndoRecordLocation, in barrierID: UInt64) -> [UInt64] {
        let segment = segments.first { $0.info.id == barrierID }!
        let record = segment.records[Int(location.dataOffset)]
        precondition(record.chunk == location.chunk, "sim: undo record out of place")
        return record.values
    }

    /// `UndoStore.sync`: every appended record is durable.
    mutating func sync() {
        guard !segments.isEmpty else { return }
        for k in segments[segments.count - 1].records.indices { segments[segments.count - 1].records[k].durable = true }
    }

    mutating func powerLoss(rng: inout SplitMix64) {
        guard let last = segments.indices.last else { return }
        let records = segments[last].records
        guard let firstUnsynced = records.firstIndex(where: { !$0.durable }) else { return }
        let kept = firstUnsynced + rng.below(records.count - firstUnsynced + 1)
        segments[last].records.removeLast(records.count - kept)
    }
}

/// Barriers and rollback (`--barriers`): the primary creates point-in-time barriers under load;
/// each node keeps an undo store (`SimUndoStore`) and saves chunks before overwriting them
/// (`CopyOnWriteQueue`, as `CopyOnWrite` carries it out); the secondary records a barrier when
/// the core asks (`ReplicatedNode.recordBarrier`); an operator rolls the secondary back to a
/// barrier after demoting the primary (`ReplicatedNode.rollback`, `stepRollback`), crashes
/// included. The model: each barrier's image, the exact stream cut at its creation.
extension World {
    // MARK: Creating barriers (the primary's `tandem barrier create`)

    func createBarrier() {
        let p = primaryNode
        guard nodes[p].up, nodes[p].core.role == .primary, nodes[p].core.disk == .upToDate else { return }
        let info = BarrierInfo(id: nextBarrierID, createdUnixSeconds: Int64(now / 1_000_000_000), label: "sim")
        var sent = false
        call(p) { core, a in sent = core.createBarrier(info, into: &a) }
        guard sent else { return }
        nextBarrierID += 1
        // The cut: every write sent so far, and none after. The primary's disk holds the writes
        // done; those still in flight were sent before the snapshot and are in the image too.
        var image = nodes[p].disk.cache
        for key in nodes[p].clients.values {
            guard let op = pending.first(where: { $0.key == key }), op.isWrite else { continue }
            for b in op.first..<op.first + op.count where inFlightNewer(op, than: image[b], at: b, on: p) { image[b] = op.seq }
        }
        barrierImages[info.id] = image
        record(.fault("n\(p) creates barrier \(info.id)"))
        count("barrier created")
    }

    /// Overlapping writes in flight: the newest sent is the one the image keeps.
    private func inFlightNewer(_ op: ClientOp, than value: UInt64, at b: Int, on p: Int) -> Bool {
        for key in nodes[p].clients.values where key != op.key {
            if let other = pending.first(where: { $0.key == key }), other.isWrite, other.seq > op.seq, other.first <= b, b < other.first + other.count {
                return false
            }
        }
        return true
    }

    // MARK: Recording barriers (the secondary: `.recordBarrier`)

    /// The core asks to record a barrier: once copy-on-write is idle, after the time the store's
    /// syncs take (a crash meanwhile loses it).
    func recordBarrierRequested(_ i: Int, _ info: BarrierInfo) {
        precondition(nodes[i].barrierToRecord == nil, "sim: two barriers recording at once")
        nodes[i].barrierToRecord = info
        if nodes[i].cow.isIdle { scheduleBarrierRecord(i) }
    }

    func scheduleBarrierRecord(_ i: Int) {
        queue.push(now + rng.between(100, 5000) * SimTime.us, .barrierRecord(node: i, life: nodes[i].life))
    }

    /// `ReplicatedNode.recordBarrier`: the device synced; `UndoStore.createBarrier`: the previous records synced, retention for one more barrier,
    /// the segment created durably; then `barrierRecorded`.
    func recordBarrier(_ i: Int) {
        guard let info = nodes[i].barrierToRecord else { return }
        guard nodes[i].cow.isIdle else { return }  // scheduled again when it is
        nodes[i].barrierToRecord = nil
        // ReplicatedNode.recordBarrier: the writes before it durable on the device first.
        nodes[i].disk.flushNow()
        nodes[i].undo.sync()
        while nodes[i].undo.segments.count + 1 > SimLayout.barriersKept {
            nodes[i].undo.segments.removeFirst()
            nodes[i].undoIndex.dropOldest()
        }
        nodes[i].undo.segments.append(SimUndoStore.Segment(info: info, records: []))
        try! nodes[i].undoIndex.addBarrier(info)
        record(.note("n\(i) records barrier \(info.id) (kept: \(nodes[i].undo.ids))"))
        count("barrier recorded")
        call(i) { core, a in core.barrierRecorded(into: &a) }
    }

    // MARK: Copy-on-write (`CopyOnWrite`)

    /// A write for the device: released at once when every chunk it touches is saved and
    /// durable, else after its chunks are.
    func copyOnWrite(_ i: Int, _ op: SimDisk.Op) {
        let geometry = SimUndoStore.geometry
        let chunks = geometry.chunks(offset: UInt64(op.first * SimLayout.blockBytes), length: UInt64(op.count * SimLayout.blockBytes))
        if nodes[i].cow.isIdle && !chunks.contains(where: { nodes[i].undoIndex.needsSave(chunk: $0) }) { return submitNow(i, op) }
        let ticket = nodes[i].nextTicket
        nodes[i].nextTicket += 1
        nodes[i].cowWrites[ticket] = op
        let index = nodes[i].undoIndex
        var actions: [CopyOnWriteQueue.Action] = []
        nodes[i].cow.write(ticket: ticket, chunks: chunks, needsSave: { index.needsSave(chunk: $0) }, into: &actions)
        performCopyOnWrite(i, actions)
    }

    func performCopyOnWrite(_ i: Int, _ actions: [CopyOnWriteQueue.Action]) {
        for action in actions {
            guard nodes[i].up else { return }
            switch action {
            case .release(let ticket):
                submitNow(i, nodes[i].cowWrites.removeValue(forKey: ticket)!)
            case .read(let id, let firstChunk, let chunkCount):
                let latency = rng.chance(30) ? rng.between(5, 60) * SimTime.ms : rng.between(20, 1500) * SimTime.us
                nodes[i].cowReads[id] = (firstChunk, chunkCount)
                queue.push(now + latency, .cowRead(node: i, life: nodes[i].life, id: id, firstChunk: firstChunk, chunkCount: chunkCount))
            case .sync(let through):
                nodes[i].cowSyncRecords = nodes[i].undo.segments.last?.records.count ?? 0
                nodes[i].cowSync = through
                queue.push(now + rng.between(100, 3000) * SimTime.us, .cowSync(node: i, life: nodes[i].life, through: through))
            }
        }
        if nodes[i].up, nodes[i].cow.isIdle, nodes[i].barrierToRecord != nil { scheduleBarrierRecord(i) }
    }

    /// A read of chunks to save is done: append a record for each chunk the store still needs.
    /// A failed read fails the undo store: every barrier is dropped and writes go on unprotected.
    func cowReadDone(_ i: Int, id: UInt32, firstChunk: UInt64, chunkCount: Int) {
        guard nodes[i].cowReads.removeValue(forKey: id) != nil else { return }
        var appended = false
        if nodes[i].disk.errorPermille > 0 && rng.below(1000) < nodes[i].disk.errorPermille {
            record(.note("n\(i) copy-on-write read fails: every barrier dropped"))
            count("undo store failed")
            nodes[i].undo.segments.removeAll()
            nodes[i].undoIndex = nodes[i].undo.index()
        } else {
            let per = SimUndoStore.blocksPerChunk
            for chunk in firstChunk..<firstChunk + UInt64(chunkCount) where nodes[i].undoIndex.needsSave(chunk: chunk) {
                let first = Int(chunk) * per
                let values = Array(nodes[i].disk.cache[first..<first + per])
                let n = nodes[i].undo.segments[nodes[i].undo.segments.count - 1].records.count
                nodes[i].undo.segments[nodes[i].undo.segments.count - 1].records.append(SimUndoStore.Record(chunk: chunk, values: values, durable: false))
                nodes[i].undoIndex.addRecord(SimUndoStore.location(chunk, n))
                appended = true
            }
            if appended { count("undo records saved") }
        }
        var actions: [CopyOnWriteQueue.Action] = []
        nodes[i].cow.readDone(id: id, appendedRecords: appended, into: &actions)
        performCopyOnWrite(i, actions)
    }

    /// The sync of the newest segment is done: the records appended before it started are durable.
    func cowSyncDone(_ i: Int, through: UInt64) {
        guard nodes[i].cowSync == through else { return }
        nodes[i].cowSync = nil
        if let last = nodes[i].undo.segments.indices.last {
            let covered = min(nodes[i].cowSyncRecords, nodes[i].undo.segments[last].records.count)
            for k in 0..<covered { nodes[i].undo.segments[last].records[k].durable = true }
        }
        var actions: [CopyOnWriteQueue.Action] = []
        nodes[i].cow.syncDone(through: through, into: &actions)
        performCopyOnWrite(i, actions)
    }

    /// A clean stop drains the clients first (`NBDServer.beginShutdown`), so the writes
    /// copy-on-write holds are saved and reach the device before the node stops.
    func drainCopyOnWrite(_ i: Int) {
        while nodes[i].up && !nodes[i].cow.isIdle {
            if let (id, read) = nodes[i].cowReads.min(by: { $0.key < $1.key }) {
                cowReadDone(i, id: id, firstChunk: read.firstChunk, chunkCount: read.chunkCount)
            } else if let through = nodes[i].cowSync {
                cowSyncDone(i, through: through)
            } else {
                preconditionFailure("sim: copy-on-write busy with nothing in flight")
            }
        }
    }

    // MARK: The invariant at every fault

    /// Every barrier a node keeps reads back (`UndoIndex.readPlan`'s rule: the record with the
    /// smallest tag at or after it, else the device) as exactly its image, at any moment: a
    /// chunk is saved, durably, before it is overwritten, and what was on the device at the
    /// barrier was durable there. Not while a rollback rewrites the device.
    func checkBarrierImages() {
        for n in 0..<2 where nodes[n].up && nodes[n].undo.pendingRollback == nil && nodes[n].rollbackRun == nil {
            let index = nodes[n].undoIndex
            let per = SimUndoStore.blocksPerChunk
            for id in nodes[n].undo.ids {
                guard let image = barrierImages[id] else { continue }
                for chunk in 0..<SimUndoStore.geometry.chunkCount {
                    let first = Int(chunk) * per
                    let values: [UInt64]
                    if let (barrierID, record) = index.location(chunk: chunk, at: id) {
                        values = nodes[n].undo.values(of: record, in: barrierID)
                    } else {
                        values = Array(nodes[n].disk.cache[first..<first + per])
                    }
                    for k in 0..<per where values[k] != image[first + k] {
                        return fail("n\(n) keeps barrier \(id), whose image has \(image[first + k]) at block \(first + k), but it reads \(values[k]) there")
                    }
                }
            }
        }
    }

    // MARK: Rollback (the operator: demote the primary, `tandem rollback ID` on the secondary)

    /// Starts a rollback of the secondary to one of the barriers it keeps, as a switchover does:
    /// the primary's clients drained, both sides flushed, the primary demoted.
    func startRollback() {
        let p = primaryNode, s = other(p)
        guard switchover == nil, nodes[p].up, nodes[s].up, nodes[p].core.role == .primary, nodes[p].core.replicating,
              nodes[p].core.peerDisk == .upToDate, nodes[s].undo.pendingRollback == nil
        else { return }
        let kept = nodes[s].undo.ids.filter { barrierImages[$0] != nil }
        guard !kept.isEmpty else { return }
        let id = kept[rng.below(kept.count)]
        record(.fault("rollback: n\(p) demotes, then n\(s) rolls back to barrier \(id)"))
        count("rollback")
        rollbackBarrier = id
        switchover = .draining(from: p, life: nodes[p].life)
        queue.push(now + SimTime.ms, .switchoverStep)
    }

    /// A rollback is between the demotion and the promotion of the rolled-back node.
    var rollingBack: Bool {
        switch switchover {
        case .rollingBack, .askingRollback, .restoring, .afterRollback: true
        default: rollbackBarrier != nil
        }
    }

    /// The step of a rollback after the demotion (`switchoverStep`).
    func rollbackStep(_ step: Switchover) {
        switch step {
        case .rollingBack(let s, let id, let tries):
            // `tandem rollback` once the secondary sees the demoted peer, in sync, nothing pending.
            let o = other(s)
            if nodes[s].up, nodes[s].core.role == .primary {
                // The witness let it take over while it waited (its link was down): it serves.
                return abandonRollback(s, "n\(s) was promoted meanwhile")
            }
            if nodes[s].up, nodes[o].up, let core = nodes[s].core, core.role == .secondary, core.link == .connected,
               core.sync == .established, core.disk == .upToDate, core.peerDisk == .upToDate, core.peerRole == .secondary,
               core.bitmap.setBitCount == 0, nodes[o].core.bitmap.setBitCount == 0, nodes[s].cow.isIdle, nodes[s].barrierToRecord == nil {
                guard nodes[s].undoIndex.contains(id) else { return abandonRollback(s, "barrier \(id) is no longer kept") }
                // With a witness, one rollback in three is slow (a large one on a slow disk:
                // seconds), and for half of those the link between the data nodes breaks as it
                // starts (the case seeds 37 and 232 found): its notice is lost, and the peer, once
                // it noticed, asks the witness to take over mid-restore. Drawn from a stream of
                // their own, so no other event of the seed moves.
                nodes[s].rollbackSlow = options.witness && rollbackPace.below(3) == 0
                if nodes[s].rollbackSlow && rollbackPace.below(2) == 0 {
                    let duration = UInt64(2000 + rollbackPace.below(3000)) * SimTime.ms
                    partitionUntil = max(partitionUntil, now + duration)
                    record(.fault("partition for \(duration / SimTime.ms) ms as n\(s) starts its rollback"))
                    count("fault partition at a rollback")
                    if let c = liveConnection() {
                        queue.push(now + SimTime.peerTimeout + UInt64(rollbackPace.below(200)) * SimTime.ms, .partitionTimeout(conn: c))
                    }
                }
                if options.witness { return askToRollBack(s, id) }
                beginRollback(s, id)
                break
            }
            guard tries < 100 else { return abandonRollback(s, "n\(s) did not get connected and in sync with the demoted n\(o)") }
            switchover = .rollingBack(to: s, barrier: id, tries: tries + 1)
        case .askingRollback(let s, let id, let life, let tries):
            // The answer moves it on (`rollbackRecorded`, `rollbackNotRecorded`).
            guard nodes[s].up, nodes[s].life == life else { return abandonRollback(s, "n\(s) stopped before its rollback was recorded") }
            guard tries < 1000 else {
                rollbackNotRecorded(s, "no answer in 20 s")
                return
            }
            switchover = .askingRollback(node: s, barrier: id, life: life, tries: tries + 1)
        case .restoring:
            // The node restores a step at a time, or finishes after a crash when it starts.
            break
        case .afterRollback(let s, let id, let tries):
            let o = other(s)
            if nodes[s].up, nodes[o].up, let c = nodes[s].connection, conns[c].alive, nodes[o].connection == c, let core = nodes[s].core,
               core.link == .connected, core.sync == .established, core.disk == .upToDate, core.peerDisk == .upToDate,
               core.bitmap.setBitCount == 0, nodes[o].core.bitmap.setBitCount == 0, nodes[o].core.disk == .upToDate,
               nodes[o].core.sync == .established, !nodes[o].disk.hasInFlight, !nodes[s].disk.hasInFlight {
                // The resync after the rollback is done: both replicas are the barrier's image.
                let image = barrierImages[id]!
                for n in [s, o] {
                    for b in 0..<SimLayout.blocks where nodes[n].disk.cache[b] != image[b] {
                        return fail("after the rollback of n\(s) to barrier \(id) and the resync, n\(n) block \(b) holds \(nodes[n].disk.cache[b]), the barrier's image \(image[b])")
                    }
                }
                count("rollback resynced")
                record(.note("rollback: both nodes hold barrier \(id)'s image; n\(s) is promoted"))
                switchover = .promoting(to: s, tries: 0)
                break
            }
            guard tries < 500 else {
                // The peer stays away: the operator promotes the rolled-back node anyway.
                record(.note("rollback: n\(o) does not resync in time; n\(s) is promoted"))
                count("rollback promoted before the resync")
                switchover = nil
                queue.push(now + 10 * SimTime.ms, .promote(node: s, life: nodes[s].life, tries: 0))
                return
            }
            switchover = .afterRollback(node: s, barrier: id, tries: tries + 1)
        default:
            preconditionFailure("sim: not a rollback step")
        }
        queue.push(now + 20 * SimTime.ms, .switchoverStep)
    }

    // MARK: The rollback's record (with a witness)

    /// `ReplicatedNode.rollback` with a witness: before anything is restored, the witness must
    /// record the rollback (it promotes the peer no more), or else the peer acknowledge the
    /// notice over the link (it outdated itself); neither, the rollback is refused.
    func askToRollBack(_ s: Int, _ id: UInt64) {
        nodes[s].rollbackAsking = (id, false, nil)
        nodes[s].rollbackRecord = true
        switchover = .askingRollback(node: s, barrier: id, life: nodes[s].life, tries: 0)
        queue.push(now + 20 * SimTime.ms, .switchoverStep)
        if witnessRequest(s, witnessState(s), .rollback(id)) {
            record(.note("rollback: n\(s) asks the witness to record its rollback to barrier \(id)"))
        } else {
            askPeerForRollback(s, why: "the witness is unreachable")
        }
    }

    func rollbackWitnessAnswered(_ s: Int, _ id: UInt64, _ answer: SimWitnessAnswer) {
        guard let asking = nodes[s].rollbackAsking, asking.id == id, !asking.viaPeer else { return }
        switch answer {
        case .recorded:
            record(.note("rollback: the witness recorded n\(s)'s rollback"))
            count("rollback recorded by the witness")
            rollbackRecorded(s)
        case .refused:
            rollbackNotRecorded(s, "the witness refused to record it")
        case .unreachable:
            askPeerForRollback(s, why: "the witness link went down before it answered")
        }
    }

    /// `ReplicatedNode.askPeerForRollback`.
    func askPeerForRollback(_ s: Int, why: String) {
        guard nodes[s].rollbackAsking != nil else { return }
        var sent = false
        call(s) { core, a in sent = core.role == .secondary && core.noticeRollback(into: &a) }
        guard sent else { return rollbackNotRecorded(s, "\(why), and the peer is not connected") }
        nodes[s].rollbackAsking!.viaPeer = true
        record(.note("rollback: n\(s): \(why); asks its peer over the link"))
    }

    /// `ReplicatedNode.rollbackNoticeAnswered`, after the batch the answer came in.
    func rollbackNoticeAnswered(_ s: Int) {
        guard let asking = nodes[s].rollbackAsking, asking.viaPeer, let accepted = asking.peerAnswer else { return }
        if accepted {
            record(.note("rollback: n\(s)'s peer outdated itself"))
            count("rollback recorded by the peer")
            return rollbackRecorded(s)
        }
        rollbackNotRecorded(s, "the witness is unreachable and the peer did not acknowledge")
    }

    /// `ReplicatedNode.rollbackRecorded`: the checks again (things moved while it asked), then
    /// the rollback.
    func rollbackRecorded(_ s: Int) {
        guard let asking = nodes[s].rollbackAsking else { return }
        nodes[s].rollbackAsking = nil
        let core = nodes[s].core!
        guard case .askingRollback(s, asking.id, _, _) = switchover, core.role == .secondary, core.peerRole != .primary,
              nodes[s].undoIndex.contains(asking.id), nodes[s].cow.isIdle, nodes[s].barrierToRecord == nil
        else {
            nodes[s].rollbackRecord = false
            announceToWitness(s)
            if case .askingRollback(s, _, _, _) = switchover { abandonRollback(s, "n\(s) can no longer roll back to barrier \(asking.id)") }
            return
        }
        beginRollback(s, asking.id)
    }

    /// `ReplicatedNode.rollbackNotRecorded`: refused; a record the witness may hold (its answer
    /// lost with the link) ends with the state announced.
    func rollbackNotRecorded(_ s: Int, _ why: String) {
        guard nodes[s].rollbackAsking != nil else { return }
        nodes[s].rollbackAsking = nil
        nodes[s].rollbackRecord = false
        announceToWitness(s)
        count("rollback refused: not recorded")
        if case .askingRollback(s, _, _, _) = switchover { abandonRollback(s, "n\(s)'s rollback is not recorded: \(why)") }
    }

    func abandonRollback(_ s: Int, _ why: String) {
        record(.note("rollback abandoned: \(why)"))
        count("rollback abandoned")
        switchover = nil
        if nodes[s].up && nodes[s].core.role == .primary {
            // The witness let it take over meanwhile (the client followed it): it goes on serving.
            primaryNode = s
            return
        }
        let p = other(s)
        primaryNode = p
        if nodes[p].up { queue.push(now + 10 * SimTime.ms, .promote(node: p, life: nodes[p].life, tries: 0)) }
    }

    /// `ReplicatedNode.rollback`: disconnect, the marker durable (`beginRollback`), the plan.
    /// From here the outcome is the barrier's image: the model forgets every later write.
    func beginRollback(_ s: Int, _ id: UInt64) {
        nodes[s].rollbackRecord = options.witness
        call(s) { core, a in core.disconnect(freshUUID: freshUUID(), forRollback: true, into: &a) }
        nodes[s].undo.sync()
        nodes[s].undo.pendingRollback = id
        let plan = try! nodes[s].undoIndex.rollbackPlan(to: id)
        nodes[s].rollbackRun = (id, plan, 0)
        record(.fault("rollback: n\(s) rolls back to barrier \(id): \(plan.restores.count) chunks to restore"))
        let image = barrierImages[id]!
        for b in 0..<SimLayout.blocks {
            floor[b] = image[b]
            stable[b] = image[b]
            exact[b] = true
            unsettledSeq[b] = 0
        }
        stabilized = ackLog.count
        for i in nodes.indices { nodes[i].forgetDivergence() }
        switchover = .restoring(node: s, barrier: id)
        if nodes[s].rollbackSlow { count("rollback slow") }
        queue.push(now + rollbackStepNanos(s), .rollbackStep(node: s, life: nodes[s].life))
        // Half the rollbacks crash part way (between restores, before or after the sync).
        if rng.below(2) == 0 { queue.push(now + rng.between(1, 60) * SimTime.ms, .rollbackCrash(node: s, life: nodes[s].life)) }
    }

    /// `ReplicatedNode.stepRollback`: a few chunks per step; at the end the device synced, the
    /// restored chunks marked out of sync and a new generation persisted; then (`rollbackDone`)
    /// the rollback finished in the store and the link back.
    func stepRollback(_ s: Int) {
        guard let run = nodes[s].rollbackRun else { return }
        let end = min(run.next + SimLayout.rollbackChunksPerStep, run.plan.restores.count)
        for restore in run.plan.restores[run.next..<end] { restoreChunk(s, restore) }
        nodes[s].rollbackRun!.next = end
        if end < run.plan.restores.count {
            queue.push(now + rollbackStepNanos(s), .rollbackStep(node: s, life: nodes[s].life))
            return
        }
        nodes[s].disk.flushNow()
        markRestored(s, run.plan)
        call(s) { core, a in core.startGenerationAfterRollback(freshUUID: freshUUID(), into: &a) }
        persistMetadata(s)
        // The store's syncs that follow take time: a crash may fall in between.
        let delay = rng.between(10, 2000) * SimTime.us
        queue.push(now + delay, .rollbackDone(node: s, life: nodes[s].life))
        if rng.below(8) == 0 { queue.push(now + delay / 2, .rollbackCrash(node: s, life: nodes[s].life)) }
    }

    /// The time one step of restores takes (one draw of `rng` either way).
    func rollbackStepNanos(_ s: Int) -> UInt64 {
        let fast = rng.between(5, 50)
        return (nodes[s].rollbackSlow ? fast * 20 : fast) * SimTime.ms
    }

    func restoreChunk(_ s: Int, _ restore: RollbackPlan.Restore) {
        let values = nodes[s].undo.values(of: restore)
        let first = Int(restore.chunk) * SimUndoStore.blocksPerChunk
        for (k, v) in values.enumerated() { nodes[s].disk.writeNow(first + k, v) }
    }

    /// `UndoStore.finishRollback`: newer barriers dropped, the target's records cleared, the
    /// marker removed (all durable).
    func finishRollbackInStore(_ s: Int, _ id: UInt64) {
        while let last = nodes[s].undo.segments.last, last.info.id > id { nodes[s].undo.segments.removeLast() }
        nodes[s].undo.segments[nodes[s].undo.segments.count - 1].records.removeAll()
        nodes[s].undo.pendingRollback = nil
        nodes[s].undoIndex = nodes[s].undo.index()
    }

    func markRestored(_ s: Int, _ plan: RollbackPlan) {
        let geometry = SimUndoStore.geometry
        for restore in plan.restores {
            nodes[s].core.markOutOfSync(offset: geometry.offset(ofChunk: restore.chunk), length: UInt64(geometry.length(ofChunk: restore.chunk)))
        }
    }

    /// The rest of `stepRollback`: the rollback finished in the store, the link back; the device
    /// must now be the barrier's image.
    func rollbackDone(_ s: Int) {
        guard let run = nodes[s].rollbackRun else { return }
        finishRollbackInStore(s, run.id)
        nodes[s].rollbackRun = nil
        call(s) { core, a in core.connect(discardMyData: false, into: &a) }
        rolledBack(s, run.id, restored: run.plan.restores.count)
    }

    /// At start (`ReplicatedNode.init` and `start`): a rollback a crash interrupted is run again
    /// from the start, the restored chunks marked and a new generation persisted, then finished.
    func finishPendingRollback(_ s: Int) {
        guard let id = nodes[s].undo.pendingRollback else { return }
        record(.note("n\(s) finishes the rollback to barrier \(id) a crash interrupted"))
        count("rollback finished at start")
        let plan = try! nodes[s].undoIndex.rollbackPlan(to: id)
        for restore in plan.restores { restoreChunk(s, restore) }
        nodes[s].disk.flushNow()
        markRestored(s, plan)
        var ignored: [ReplicaCore.Action] = []
        nodes[s].core.startGenerationAfterRollback(freshUUID: freshUUID(), into: &ignored)
        persistMetadata(s)
        finishRollbackInStore(s, id)
        // As the node: with a witness, the record holds until the peer resynced from here.
        nodes[s].rollbackRecord = options.witness
        rolledBack(s, id, restored: plan.restores.count)
    }

    /// The rollback is done: the device is exactly the barrier's image.
    func rolledBack(_ s: Int, _ id: UInt64, restored: Int) {
        record(.note("n\(s) rolled back to barrier \(id): \(restored) chunks restored"))
        count("rollback done")
        let image = barrierImages[id]!
        for b in 0..<SimLayout.blocks where nodes[s].disk.cache[b] != image[b] {
            return fail("n\(s) rolled back to barrier \(id), but block \(b) holds \(nodes[s].disk.cache[b]), the barrier's image \(image[b])")
        }
        if case .restoring(s, id) = switchover { switchover = .afterRollback(node: s, barrier: id, tries: 0) }
        scheduleConnect()
    }
}
