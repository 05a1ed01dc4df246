import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO

/// A witness (`tandem up --node witness`): holds no data; both data nodes keep a TLS link to it
/// (the same framing as the peer link), announce their state, ask it before becoming primary and,
/// as primary, before writing without their peer. The decisions are `WitnessArbiter`'s.
final class WitnessNode: IOHandler, PeerConnectionDelegate {
    private static let tagAccept: UInt32 = 1
    private static let tagTick: UInt32 = 2
    private static let linksMax = 8

    let loop: IOLoop
    let logger: Logger
    let config: ResourceConfig
    let me: ResourceConfig.Node
    private let tls: TLSContext
    private var listenFD: Int32 = -1
    private(set) var id: UInt32 = 0
    private var arbiter: WitnessArbiter
    /// Links by connection, with the data node id once its hello arrived.
    private var links: [ObjectIdentifier: (connection: PeerConnection, node: UInt8?, lastHeard: UInt64)] = [:]
    private var stopping = false

    init(loop: IOLoop, logger: Logger, config: ResourceConfig, me: ResourceConfig.Node) throws(ServeError) {
        self.loop = loop
        self.logger = logger
        self.config = config
        self.me = me
        arbiter = WitnessArbiter(dataNodes: config.dataNodes.map { (UInt8($0.id), $0.name) })
        do {
            tls = try TLSContext(server: true, certificate: me.certPath, key: me.keyPath, ca: config.tls.caPath, requirePeerCertificate: true, tls13Only: true)
        } catch {
            throw ServeError("TLS: \(error.message)")
        }
    }

    func start() throws(ServeError) {
        id = loop.register(self)
        do {
            let (fd, bound) = try Sockets.listen(host: me.address.hostText, port: me.address.port)
            listenFD = fd
            loop.engine.adoptSocket(fd)
            logger.info("witness: listening for \(config.dataNodes.map(\.name).joined(separator: " and ")) on \(bound)")
        } catch {
            throw ServeError("witness address \(me.address): \(error.errno == EADDRINUSE ? error.operation : error.description)")
        }
        loop.engine.accept(fd: listenFD, userData: IOLoop.userData(id, Self.tagAccept))
        loop.addTimer(id: id, tag: Self.tagTick, afterNanos: 100_000_000)
    }

    func stop() {
        stopping = true
        if listenFD >= 0 { shutdown(listenFD, Int32(SHUT_RDWR)) }
        for link in links.values { link.connection.close(reason: "witness stopping") }
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        switch tag {
        case Self.tagAccept:
            if result >= 0 {
                if stopping || links.count >= Self.linksMax {
                    closeDescriptor(result)
                } else {
                    Sockets.setNoDelay(result)
                    // Either data node may dial: the certificate's name is checked after TLS.
                    let connection = PeerConnection(loop: loop, fd: result, context: tls, expectedPeerName: "", delegate: self)
                    links[ObjectIdentifier(connection)] = (connection, nil, monotonicNanos())
                    connection.start()
                }
            }
            if !stopping && result != -EINVAL { loop.engine.accept(fd: listenFD, userData: IOLoop.userData(id, Self.tagAccept)) }
        case Self.tagTick:
            let now = monotonicNanos()
            for link in links.values where now - link.lastHeard > UInt64(config.tuning.peerTimeoutMillis) * 1_000_000 {
                link.connection.close(reason: "silent for \((now - link.lastHeard) / 1_000_000) ms")
            }
            if !stopping { loop.addTimer(id: id, tag: Self.tagTick, afterNanos: 100_000_000) }
        default:
            break
        }
    }

    /// Which data nodes the arbiter holds a rollback record for.
    private func rollbackRecords() -> [UInt8: Bool] {
        arbiter.nodes.mapValues { $0.rollingBackFrom != nil }
    }

    private func logRollbackRecords(since before: [UInt8: Bool]) {
        for (node, had) in before.sorted(by: { $0.key < $1.key }) where arbiter.rollsBack(node) != had {
            if had {
                logger.notice("witness: \(name(node)) no longer rolls back (\(name(other(node))) resynced from it, it was promoted, or the rollback did not start)")
            } else {
                logger.notice("witness: \(name(node)) rolls back to a barrier: \(name(other(node))) is not promoted until it resynced from \(name(node))")
            }
        }
    }

    private func other(_ node: UInt8) -> UInt8 {
        arbiter.nodes.keys.first { $0 != node }!
    }

    private func name(_ node: UInt8?) -> String {
        node.flatMap { n in config.dataNodes.first { $0.id == Int(n) }?.name } ?? "an unidentified node"
    }

    func peerConnectionUp(_ connection: PeerConnection) {
        connection.send(.hello(PeerHello(
            nodeID: UInt8(me.id), role: .secondary, diskState: .diskless, flags: 0, resourceName: config.name, deviceSizeBytes: 0,
            bitmapGranularityBytes: UInt32(config.tuning.bitmapGranularityBytes), uuids: PeerGenerationUUIDs(current: 0, bitmap: 0, history: [0, 0, 0, 0]))))
    }

    func peerConnection(_ connection: PeerConnection, received header: PeerHeader, payload: UnsafeRawBufferPointer) {
        let key = ObjectIdentifier(connection)
        guard var link = links[key] else { return }
        link.lastHeard = monotonicNanos()
        links[key] = link
        switch PeerMessage.decode(header: header, payload: payload) {
        case .invalid(let why):
            connection.close(reason: "protocol error: \(why)")
        case .message(.hello(let hello)):
            let certificate = connection.certificateName
            let shown = Printable.quoted(certificate)
            guard link.node == nil else { return connection.close(reason: "protocol error: a second hello from \(shown)") }
            guard hello.resourceName == config.name, arbiter.isDataNode(hello.nodeID), name(hello.nodeID) == certificate
            else {
                return connection.close(reason: "refusing \(shown) (node \(hello.nodeID) of \(hello.resourceName)): not a data node of \(config.name)")
            }
            if let old = links.first(where: { $0.key != key && $0.value.node == hello.nodeID }) {
                old.value.connection.close(reason: "replaced by a new link from \(shown)")
            }
            link.node = hello.nodeID
            links[key] = link
            let rollingBack = hello.flags & PeerFlags.Hello.rollingBack != 0
            let records = rollbackRecords()
            let deposed = arbiter.connected(hello.nodeID, role: hello.role, disk: hello.diskState, uuids: hello.uuids, rollingBack: rollingBack)
            logger.info("witness: \(shown) connected (\(hello.role), disk \(hello.diskState)\(rollingBack ? ", rolling back to a barrier" : ""))")
            logRollbackRecords(since: records)
            if let deposed {
                logger.warning("witness: \(deposed)")
                connection.send(.disconnect(reason: .roleConflict, text: deposed))
            }
        case .message(.stateChange(let change)):
            guard let node = link.node else { return connection.close(reason: "protocol error: stateChange before hello") }
            if change.role == .primary && arbiter.nodes[node]?.role != .primary && change.id != 0 && change.flags & PeerFlags.State.peerOutdated == 0 {
                // A promotion request.
                let records = rollbackRecords()
                let verdict = arbiter.requestPrimary(node, disk: change.diskState, uuids: change.uuids)
                logRollbackRecords(since: records)
                switch verdict {
                case .granted:
                    logger.notice("witness: \(name(node)) may become primary")
                    reply(connection, to: change, refused: nil)
                case .refused(let why):
                    logger.warning("witness: refused to let \(name(node)) become primary: \(why)")
                    // Refused while the other node rolls back: the reply says so, and the
                    // requester marks itself Outdated until it resyncs from that node.
                    reply(connection, to: change, refused: why, flags: arbiter.rollsBack(other(node)) ? PeerFlags.State.rollingBack : 0)
                }
            } else {
                let otherDeposed = arbiter.nodes.first { $0.key != node }?.value.deposed ?? false
                let rollingBack = change.flags & PeerFlags.State.rollingBack != 0
                let records = rollbackRecords()
                let verdict = arbiter.announced(node, role: change.role, disk: change.diskState, writesWithoutPeer: change.flags & PeerFlags.State.peerOutdated != 0,
                                                uuids: change.uuids, rollingBack: rollingBack)
                logRollbackRecords(since: records)
                if let (other, view) = arbiter.nodes.first(where: { $0.key != node }), view.deposed && !otherDeposed {
                    // This node holds the newer generation: the other, still primary, must demote now.
                    for link in links.values where link.node == other {
                        link.connection.send(.disconnect(reason: .roleConflict, text: "\(name(node)) holds newer data as primary; \(name(other)) must demote"))
                    }
                }
                switch verdict {
                case .granted:
                    if change.flags & PeerFlags.State.peerOutdated != 0 {
                        logger.notice("witness: \(name(node)) writes without its peer: the peer is outdated until they resync")
                    }
                    if change.id != 0 { reply(connection, to: change, refused: nil) }
                case .refused(let why):
                    if rollingBack && change.role == .secondary {
                        logger.warning("witness: refused to record \(name(node))'s rollback: \(why)")
                    } else {
                        logger.warning("witness: refused to record \(name(node)) writing without its peer: \(why)")
                    }
                    if change.id != 0 { reply(connection, to: change, refused: why) }
                    if arbiter.nodes[node]?.deposed == true { connection.send(.disconnect(reason: .roleConflict, text: why)) }
                }
            }
        case .message(.ping(let pingID)):
            guard link.node != nil else { return connection.close(reason: "protocol error: ping before hello") }
            connection.send(.pingAck(id: pingID))
        case .message(.disconnect):
            break  // a node leaving: its close follows
        case .message(.pingAck):
            // The witness pings nobody: harmless after the hello, out of order before it.
            guard link.node != nil else { return connection.close(reason: "protocol error: pingAck before hello") }
        case .message(let message):
            // Replication frames have no meaning here (peer.md 2.5, 12): whatever sent them is
            // not a data node speaking to its witness.
            connection.close(reason: "protocol error: \(message.type) frame on a witness link")
        }
    }

    /// A reply carries the request's id and, for a refusal, the `refused` flag; the reason is in
    /// the witness's log (stateChange carries no text).
    private func reply(_ connection: PeerConnection, to request: PeerStateChange, refused: String?, flags extra: UInt16 = 0) {
        var flags = PeerFlags.State.reply | extra
        if refused != nil { flags |= PeerFlags.State.refused }
        connection.send(.stateChange(PeerStateChange(id: request.id, role: request.role, diskState: request.diskState, flags: flags, uuids: request.uuids)))
    }

    func peerConnection(_ connection: PeerConnection, releasedPayload token: UInt64) {}

    func peerConnection(_ connection: PeerConnection, sinkFor header: PeerHeader) -> UnsafeMutableRawPointer? { nil }

    func peerConnectionDown(_ connection: PeerConnection, reason: String) {
        guard let link = links.removeValue(forKey: ObjectIdentifier(connection)) else { return }
        if let node = link.node, !links.values.contains(where: { $0.node == node }) {
            arbiter.disconnected(node)
            logger.warning("witness: lost \(name(node)): \(reason)")
        } else if link.node == nil {
            logger.warning("witness: dropped a link from \(Printable.quoted(connection.certificateName)) before its hello: \(reason)")
        }
    }

    func control(_ request: String, reply: @escaping (String) -> Void) {
        switch request.split(separator: " ").first {
        case "ping":
            reply("{\"ok\":true}")
        case "status":
            let nodes = config.dataNodes.map { n -> String in
                let v = arbiter.nodes[UInt8(n.id)]!
                return "\"\(n.name)\":{\"connected\":\(v.connected),\"known\":\(v.known),\"role\":\"\(v.role)\",\"disk\":\"\(v.disk)\",\"writes_without_peer\":\(v.writesWithoutPeer),\"rolling_back\":\(v.rollingBackFrom != nil)}"
            }
            reply("{\"resource\":\"\(config.name)\",\"node\":\"\(me.name)\",\"role\":\"Witness\",\"nodes\":{\(nodes.joined(separator: ","))}}")
        default:
            reply(ReplicatedNode.error("a witness answers status and ping"))
        }
    }
}
