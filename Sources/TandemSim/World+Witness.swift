import TandemCore

/// The witness and quorum (`--witness`): the witness's decisions are the production
/// `WitnessArbiter`, fed as `WitnessNode` feeds it; each data node's link to it and the node's
/// duties around it are `WitnessClient` and `ReplicatedNode` (MARK: Witness and quorum): quorum
/// is the peer or the witness; client requests fail without it; a primary that writes without
/// its peer holds its answers until the witness has recorded the peer as outdated (fencing,
/// `ReplicaCore` with `fencing`, then `startGenerationWithoutPeer`); a secondary that lost its
/// primary asks the witness to take over (automatic failover), and the client follows it; a
/// primary the witness deposed demotes.
///
/// Faults: a node cut off from both its peer and the witness, and the witness restarting (it
/// forgets what it knew). Invariants: no node answers a write without quorum, and never do both
/// nodes hold acknowledged writes the other lacks (no split brain where quorum is configured).
struct SimWitness {
    static let names: [(id: UInt8, name: String)] = [(0, "n0"), (1, "n1")]

    var arbiter = WitnessArbiter(dataNodes: names)
    var up = true
    /// Bumped at every restart: events of an earlier life are ignored.
    var life = 0
}

/// One node's link to the witness: in order per direction, lost as a whole.
struct WitnessConnection {
    let node: Int
    var alive = true
    /// Messages towards the node (0) and the witness (1).
    var queues: [[PeerMessage]] = [[], []]
    var heads = [0, 0]
    var lastDelivery: [UInt64] = [0, 0]
    /// The witness read the node's hello (`WitnessNode`: the link's node id).
    var identified = false
}

/// What a request to the witness was for (`WitnessClient.request`'s callback).
enum WitnessRequest {
    case announce(fencing: Bool)
    case promotion
    /// Record the rollback to this barrier before it restores anything.
    case rollback(UInt64)
}

/// `WitnessAnswer`: recorded or granted, refused (because the other node rolls back, or not),
/// or no answer (the link went down first).
enum SimWitnessAnswer: Equatable {
    case recorded
    case refused(peerRollsBack: Bool)
    case unreachable
}

extension World {
    // MARK: Links

    /// `WitnessClient.dial`: a data node keeps one link to the witness, redialing after a loss.
    func witnessDial(_ i: Int) {
        guard options.witness, nodes[i].up, nodes[i].witnessConn == nil else { return }
        guard witness.up, isolatedUntil[i] <= now else {
            queue.push(now + rng.between(100, 300) * SimTime.ms, .witnessDial(node: i, life: nodes[i].life))
            return
        }
        let w = witnessConns.count
        witnessConns.append(WitnessConnection(node: i))
        nodes[i].witnessConn = w
        record(.note("n\(i) witness link w\(w) established"))
        // Both sides say hello first: the node its state, the witness that it is there.
        let state = witnessState(i)
        witnessSend(w, toWitness: true, .hello(PeerHello(
            nodeID: UInt8(i), role: state.role, diskState: state.diskState,
            flags: state.flags & PeerFlags.State.rollingBack != 0 ? PeerFlags.Hello.rollingBack : 0, resourceName: SimLayout.resourceName,
            deviceSizeBytes: 0, bitmapGranularityBytes: UInt32(SimLayout.blockBytes), uuids: state.uuids)))
        witnessSend(w, toWitness: false, .hello(PeerHello(
            nodeID: 2, role: .secondary, diskState: .diskless, flags: 0, resourceName: SimLayout.resourceName, deviceSizeBytes: 0,
            bitmapGranularityBytes: UInt32(SimLayout.blockBytes), uuids: PeerGenerationUUIDs(current: 0, bitmap: 0, history: [0, 0, 0, 0]))))
    }

    func witnessSend(_ w: Int, toWitness: Bool, _ message: PeerMessage) {
        guard witnessConns[w].alive else { return }
        let to = toWitness ? 1 : 0
        var at = now + rng.between(20, 600) * SimTime.us
        let cut = isolatedUntil[witnessConns[w].node]
        if cut > now { at = max(at, cut + rng.between(20, 600) * SimTime.us) }
        at = max(at, witnessConns[w].lastDelivery[to])
        witnessConns[w].lastDelivery[to] = at
        witnessConns[w].queues[to].append(message)
        queue.push(at, .witnessDeliver(conn: w, toWitness: toWitness))
    }

    /// The link dies; the node and the witness each notice after their delay.
    func killWitnessLink(_ w: Int, nodeDelay: UInt64, witnessDelay: UInt64) {
        guard witnessConns[w].alive else { return }
        witnessConns[w].alive = false
        queue.push(now + nodeDelay, .witnessNotice(conn: w, atWitness: false))
        queue.push(now + witnessDelay, .witnessNotice(conn: w, atWitness: true))
    }

    func witnessDeliver(_ w: Int, toWitness: Bool) {
        guard witnessConns[w].alive else { return }
        let to = toWitness ? 1 : 0
        let message = witnessConns[w].queues[to][witnessConns[w].heads[to]]
        witnessConns[w].heads[to] += 1
        let i = witnessConns[w].node
        if toWitness {
            guard witness.up else { return }
            witnessReceived(message, on: w, from: i)
        } else {
            guard nodes[i].up, nodes[i].witnessConn == w else { return }
            nodeReceivedFromWitness(message, node: i)
        }
    }

    /// `WitnessClient.peerConnectionDown` (node side) or `WitnessNode.peerConnectionDown`.
    func witnessNotice(_ w: Int, atWitness: Bool) {
        let i = witnessConns[w].node
        if atWitness {
            if witness.up && witnessConns[w].identified && !witnessConns.contains(where: { $0.alive && $0.node == i && $0.identified }) {
                witness.arbiter.disconnected(UInt8(i))
            }
            return
        }
        guard nodes[i].up, nodes[i].witnessConn == w else { return }
        nodes[i].witnessConn = nil
        let wasUp = nodes[i].witnessUp
        nodes[i].witnessUp = false
        record(.note("n\(i) witness link w\(w) down"))
        let waiting = nodes[i].witnessRequests.keys.sorted()
        for id in waiting { witnessReplied(i, id: id, .unreachable) }
        if wasUp { quorumMayHaveChanged(i) }
        queue.push(now + rng.between(100, 300) * SimTime.ms, .witnessDial(node: i, life: nodes[i].life))
    }

    // MARK: The witness (WitnessNode)

    func witnessReceived(_ message: PeerMessage, on w: Int, from i: Int) {
        switch message {
        case .hello(let hello):
            witnessConns[w].identified = true
            if let deposed = witness.arbiter.connected(UInt8(i), role: hello.role, disk: hello.diskState, uuids: hello.uuids,
                                                       rollingBack: hello.flags & PeerFlags.Hello.rollingBack != 0) {
                record(.note("witness: \(deposed)"))
                witnessSend(w, toWitness: false, .disconnect(reason: .roleConflict, text: deposed))
            }
        case .stateChange(let change):
            let node = UInt8(i)
            if change.role == .primary && witness.arbiter.nodes[node]?.role != .primary && change.id != 0 && change.flags & PeerFlags.State.peerOutdated == 0 {
                let verdict = witness.arbiter.requestPrimary(node, disk: change.diskState, uuids: change.uuids)
                if case .refused(let why) = verdict { record(.note("witness refuses n\(i) as primary: \(why)")) } else { record(.note("witness: n\(i) may become primary")) }
                witnessReply(w, to: change, refused: verdict != .granted,
                             flags: verdict != .granted && witness.arbiter.rollsBack(UInt8(other(i))) ? PeerFlags.State.rollingBack : 0)
            } else {
                let o = UInt8(other(i))
                let otherDeposed = witness.arbiter.nodes[o]?.deposed ?? false
                let recorded = witness.arbiter.rollsBack(node)
                let verdict = witness.arbiter.announced(node, role: change.role, disk: change.diskState, writesWithoutPeer: change.flags & PeerFlags.State.peerOutdated != 0,
                                                        uuids: change.uuids, rollingBack: change.flags & PeerFlags.State.rollingBack != 0)
                if witness.arbiter.rollsBack(node) != recorded {
                    record(.note(recorded ? "witness: n\(i) no longer rolls back" : "witness: n\(i) rolls back: n\(o) is not promoted"))
                }
                if witness.arbiter.nodes[o]?.deposed == true && !otherDeposed {
                    // As WitnessNode: the other node, still primary with older data, must demote now.
                    for v in witnessConns.indices where witnessConns[v].alive && witnessConns[v].node == Int(o) && witnessConns[v].identified {
                        witnessSend(v, toWitness: false, .disconnect(reason: .roleConflict, text: "n\(i) holds newer data"))
                    }
                }
                if case .refused(let why) = verdict { record(.note("witness refuses n\(i)'s fencing or rollback: \(why)")) }
                if change.id != 0 { witnessReply(w, to: change, refused: verdict != .granted) }
                if verdict != .granted && witness.arbiter.nodes[node]?.deposed == true {
                    witnessSend(w, toWitness: false, .disconnect(reason: .roleConflict, text: "deposed"))
                }
            }
        default:
            break
        }
    }

    func witnessReply(_ w: Int, to request: PeerStateChange, refused: Bool, flags extra: UInt16 = 0) {
        var flags = PeerFlags.State.reply | extra
        if refused { flags |= PeerFlags.State.refused }
        witnessSend(w, toWitness: false, .stateChange(PeerStateChange(id: request.id, role: request.role, diskState: request.diskState, flags: flags, uuids: request.uuids)))
    }

    /// The witness process dies and comes back: every link drops, and it knows nothing.
    func restartWitness(after delay: UInt64) {
        guard witness.up else { return }
        record(.fault("the witness restarts (down \(delay / SimTime.ms) ms)"))
        count("fault witness restart")
        witness.up = false
        witness.life += 1
        for w in witnessConns.indices where witnessConns[w].alive {
            killWitnessLink(w, nodeDelay: rng.between(10, 1000) * SimTime.us, witnessDelay: 0)
        }
        queue.push(now + delay, .witnessStart(life: witness.life))
    }

    func startWitness(life: Int) {
        guard !witness.up, witness.life == life else { return }
        witness = SimWitness(arbiter: WitnessArbiter(dataNodes: SimWitness.names), up: true, life: life)
        record(.note("the witness starts, knowing nothing"))
    }

    // MARK: The node's side (WitnessClient, ReplicatedNode)

    func nodeReceivedFromWitness(_ message: PeerMessage, node i: Int) {
        switch message {
        case .hello:
            guard !nodes[i].witnessUp else { return }
            nodes[i].witnessUp = true
            announceToWitness(i)
        case .stateChange(let change) where change.flags & PeerFlags.State.reply != 0:
            guard nodes[i].witnessRequests[change.id] != nil else { return }
            witnessReplied(i, id: change.id, change.flags & PeerFlags.State.refused == 0
                ? .recorded : .refused(peerRollsBack: change.flags & PeerFlags.State.rollingBack != 0))
        case .disconnect(let reason, let text):
            if reason == .roleConflict { deposed(i, text) }
            if let w = nodes[i].witnessConn { killWitnessLink(w, nodeDelay: 0, witnessDelay: rng.between(10, 1000) * SimTime.us) }
        default:
            break
        }
    }

    func hasQuorum(_ i: Int) -> Bool {
        guard options.witness else { return true }
        let link = nodes[i].core.link
        return link == .connected || link == .handshaking || nodes[i].witnessUp
    }

    /// A primary with a witness holds client answers while it writes without its peer and the
    /// witness has not yet recorded the peer as outdated.
    func mustHold(_ i: Int) -> Bool {
        options.witness && nodes[i].core.role == .primary && !nodes[i].core.replicating && !nodes[i].fenced
    }

    func witnessState(_ i: Int) -> PeerStateChange {
        let core = nodes[i].core!
        var flags: UInt16 = 0
        if core.role == .primary && !core.replicating { flags |= PeerFlags.State.peerOutdated }
        if nodes[i].rollbackRecord && core.role == .secondary { flags |= PeerFlags.State.rollingBack }
        return PeerStateChange(role: core.role, diskState: core.disk, flags: flags, uuids: ReplicaCore.wire(core.uuids))
    }

    func witnessRequest(_ i: Int, _ state: PeerStateChange, _ kind: WitnessRequest) -> Bool {
        guard nodes[i].witnessUp, let w = nodes[i].witnessConn else { return false }
        var request = state
        request.id = nodes[i].nextWitnessRequest
        nodes[i].nextWitnessRequest += 1
        nodes[i].witnessRequests[request.id] = kind
        witnessSend(w, toWitness: true, .stateChange(request))
        return true
    }

    /// `ReplicatedNode.announceToWitness`.
    func announceToWitness(_ i: Int) {
        guard options.witness else { return }
        let state = witnessState(i)
        let fencing = state.flags & PeerFlags.State.peerOutdated != 0
        if witnessRequest(i, state, .announce(fencing: fencing)) {
            if fencing { nodes[i].fenceInFlight = true }
        } else {
            quorumMayHaveChanged(i)
        }
    }

    func witnessReplied(_ i: Int, id: UInt64, _ answer: SimWitnessAnswer) {
        guard let kind = nodes[i].witnessRequests.removeValue(forKey: id) else { return }
        let granted = answer == .recorded
        switch kind {
        case .rollback(let barrier):
            rollbackWitnessAnswered(i, barrier, answer)
        case .announce(let fencing):
            if fencing { nodes[i].fenceInFlight = false }
            if fencing && granted && nodes[i].core.role == .primary && !nodes[i].core.replicating {
                var started = false
                call(i) { core, a in started = core.startGenerationWithoutPeer(into: &a) }
                if started {
                    nodes[i].fenced = true
                    record(.note("n\(i): the witness recorded its peer as outdated: answering writes without it"))
                    count("witness fenced the peer")
                    releaseHeld(i, error: nil)
                } else {
                    record(.note("n\(i): fenced while its hello is out: answers stay held, asked again later"))
                    count("fence while the hello is out")
                }
            }
            quorumMayHaveChanged(i)
        case .promotion:
            nodes[i].promotionRequested = false
            if answer == .refused(peerRollsBack: true) { peerRollsBackSaysTheWitness(i) }
            guard granted, nodes[i].core.role == .secondary, nodes[i].core.link != .connected, nodes[i].core.link != .handshaking else {
                nodes[i].nextPromotionTry = now + 500 * SimTime.ms
                return
            }
            record(.fault("n\(i) promoted with the witness's consent"))
            count("witness promotion")
            promoteLocally(i)
        }
    }

    /// `ReplicatedNode.peerRollsBackSaysTheWitness`: refused because the witness holds the
    /// peer's rollback, the node outdates itself until it resyncs from the peer.
    func peerRollsBackSaysTheWitness(_ i: Int) {
        guard nodes[i].core.role == .secondary, nodes[i].core.link != .connected, nodes[i].core.link != .handshaking else { return }
        if !nodes[i].core.peerLeftForRollback {
            record(.note("n\(i): the witness says its peer rolls back: Outdated"))
            count("outdated by the witness for a rollback")
        }
        call(i) { core, a in core.peerRollsBack(into: &a) }
    }

    /// The peer is connected and gets (or has) what was written without it.
    func peerHoldsHeldWrites(_ i: Int) -> Bool {
        let core = nodes[i].core!
        return core.link == .connected && core.peerDisk != .failed
            && (core.sync == .syncSource || (core.sync == .established && core.bitmap.setBitCount == 0))
    }

    /// On the tick: a refused fencing request is asked again while answers wait for it.
    func retryFencing(_ i: Int) {
        guard options.witness, mustHold(i), !nodes[i].held.isEmpty, !nodes[i].fenceInFlight, nodes[i].ticks % 5 == 0 else { return }
        announceToWitness(i)
    }

    func releaseHeld(_ i: Int, error: Int32?) {
        let held = nodes[i].held
        nodes[i].held.removeAll()
        for h in held {
            guard let key = nodes[i].clients.removeValue(forKey: h.id) else { continue }
            clientCompleted(i, key: key, clientID: h.id, result: error ?? h.result)
        }
    }

    /// `ReplicatedNode.quorumMayHaveChanged`: a primary without quorum fails what it held.
    func quorumMayHaveChanged(_ i: Int) {
        let quorum = hasQuorum(i)
        defer { nodes[i].hadQuorum = quorum }
        if !quorum && nodes[i].core.role == .primary {
            if nodes[i].hadQuorum {
                record(.note("n\(i) lost quorum: neither its peer nor the witness"))
                count("quorum lost")
            }
            releaseHeld(i, error: -5)
        }
    }

    /// `ReplicatedNode.considerAutomaticFailover`, on the tick.
    func considerAutomaticFailover(_ i: Int) {
        guard options.witness, nodes[i].witnessUp, nodes[i].core.role == .secondary, nodes[i].core.disk == .upToDate,
              nodes[i].core.link == .connecting, !nodes[i].promotionRequested, nodes[i].demotion == nil, now >= nodes[i].nextPromotionTry,
              nodes[i].rollbackAsking == nil, nodes[i].rollbackRun == nil
        else { return }
        var state = witnessState(i)
        state.role = .primary
        if witnessRequest(i, state, .promotion) { nodes[i].promotionRequested = true }
    }

    /// `ReplicatedNode.promoteLocally`; the client follows the new primary (the old one's
    /// requests in flight are the old client's: answered or not, they are no longer awaited).
    func promoteLocally(_ i: Int) {
        var refusal: RoleChangeRefusal?
        let fresh = freshUUID()
        nodes[i].superblockFlags.insert(.wasPrimary)
        call(i) { core, a in refusal = core.promote(force: false, freshUUID: fresh, nowMillis: now / SimTime.ms, into: &a) }
        if let refusal {
            nodes[i].superblockFlags.remove(.wasPrimary)
            record(.note("promote n\(i) refused: \(refusal)"))
            return
        }
        persistMetadata(i)
        if i != primaryNode {
            record(.note("the client moves to n\(i)"))
            abandonClients(of: primaryNode)
            primaryNode = i
        }
    }

    /// The witness says the other node was promoted while this one was away: demote
    /// (`ReplicatedNode.demote`: requests in flight finish, both sides flush, then the core).
    func deposed(_ i: Int, _ why: String) {
        guard nodes[i].core.role == .primary, nodes[i].demotion == nil else { return }
        record(.fault("n\(i) deposed by the witness: demotes"))
        count("deposed")
        nodes[i].demotion = .draining
        queue.push(now + SimTime.ms, .demotionStep(node: i, life: nodes[i].life))
    }

    /// `ReplicatedNode.demote` for a deposed primary: its requests in flight finish (the held
    /// ones fail once quorum is gone), then one flush of both sides, then the core.
    func demotionStep(_ i: Int) {
        guard let step = nodes[i].demotion else { return }
        guard nodes[i].core.role == .primary else {
            nodes[i].demotion = nil
            return
        }
        // One demotion flush at a time: a switchover may be flushing this node already.
        if step == .draining && nodes[i].clients.isEmpty && nodes[i].held.isEmpty && nodes[i].demotionFlushID == nil {
            nodes[i].waitingForLog.removeAll()
            let id = nodes[i].nextClientID
            nodes[i].nextClientID += 1
            nodes[i].demotionFlushID = id
            nodes[i].demotion = .flushing
            call(i) { core, a in core.clientFlush(id: id, into: &a) }
            return
        }
        queue.push(now + 20 * SimTime.ms, .demotionStep(node: i, life: nodes[i].life))
    }

    func demoteDeposed(_ i: Int, flushResult: Int32) {
        if let refusal = demote(i, flushResult: flushResult) {
            record(.note("n\(i) demotion refused: \(refusal); tried again"))
            nodes[i].demotion = .draining
            queue.push(now + 100 * SimTime.ms, .demotionStep(node: i, life: nodes[i].life))
            return
        }
        nodes[i].demotion = nil
        record(.fault("n\(i) demoted (deposed; flush \(flushResult))"))
        scheduleConnect()
    }

    // MARK: Faults

    /// The node is cut off from its peer and the witness for a while (both links time out if it
    /// lasts).
    func isolate(_ i: Int, for duration: UInt64) {
        isolatedUntil[i] = max(isolatedUntil[i], now + duration)
        record(.fault("n\(i) cut off from its peer and the witness for \(duration / SimTime.ms) ms"))
        count("fault isolation")
        guard duration > SimTime.peerTimeout else { return }
        let at = now + SimTime.peerTimeout + rng.between(0, 200) * SimTime.ms
        if let c = nodes[i].connection, conns[c].alive { queue.push(at, .partitionTimeout(conn: c)) }
        if let w = nodes[i].witnessConn { queue.push(at + rng.between(0, 100) * SimTime.ms, .witnessTimeout(conn: w)) }
    }

    // MARK: Invariants

    /// At every answer a node gives a client write: with quorum configured, it has quorum or the
    /// witness recorded its peer as outdated (a request accepted with quorum may complete after
    /// losing it: the witness refuses the peer while that record stands), and the two nodes
    /// never both hold acknowledged writes the other lacks.
    func checkQuorumAnswer(_ i: Int, _ op: ClientOp) {
        guard options.witness else { return }
        if !hasQuorum(i) && !nodes[i].fenced { return fail("n\(i) acknowledged \(op) without quorum and without the witness's record") }
        if nodes[0].wroteAlone && nodes[1].wroteAlone {
            fail("with a witness, both nodes acknowledged writes the other lacks (n\(i) acknowledged \(op))")
        }
    }
}
