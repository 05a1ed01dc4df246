import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO

/// What the witness answered a request (`WitnessClient.request`).
enum WitnessAnswer: Equatable {
    /// Recorded (a state, fencing, a rollback) or granted (a promotion).
    case recorded
    /// Refused; `peerRollsBack`: the witness holds a rollback of the other data node (its
    /// reply carries `rollingBack`), so this node's data is about to be older than its peer's.
    case refused(peerRollsBack: Bool)
    /// The link was down, or went down before the answer came.
    case unreachable
}

/// A data node's link to the resource's witness: dials it, says hello, announces every state
/// change, and sends requests (promotion, fencing, rollback) whose replies come back by id.
final class WitnessClient: IOHandler, PeerConnectionDelegate {
    private static let tagConnect: UInt32 = 1
    private static let tagRetry: UInt32 = 2

    let loop: IOLoop
    let logger: Logger
    let witness: ResourceConfig.Node
    private let context: TLSContext
    private let address: UnsafeMutablePointer<SocketAddress>
    private let retryNanos: UInt64
    private let timeoutNanos: UInt64
    private(set) var id: UInt32 = 0
    private var link: PeerConnection?
    private var dialFD: Int32 = -1
    private var stopping = false
    private var lastHeard: UInt64 = 0
    private var pingSent: UInt64 = 0
    /// Up: TLS verified and the witness's hello arrived.
    private(set) var up = false
    private var nextRequest: UInt64 = 1
    private var pending: [UInt64: (WitnessAnswer) -> Void] = [:]
    /// What to say in the hello and after (re)connecting.
    var currentState: () -> PeerStateChange = { PeerStateChange(role: .secondary, diskState: .diskless, uuids: PeerGenerationUUIDs(current: 0, bitmap: 0, history: [0, 0, 0, 0])) }
    var onUp: (() -> Void)?
    var onDown: (() -> Void)?
    /// The witness says another node was promoted while this one was away.
    var onDeposed: ((String) -> Void)?
    let resource: String
    let nodeID: UInt8
    let granularity: UInt32

    init(loop: IOLoop, logger: Logger, config: ResourceConfig, me: ResourceConfig.Node, witness: ResourceConfig.Node, context: TLSContext) throws(ServeError) {
        self.loop = loop
        self.logger = logger
        self.witness = witness
        self.context = context
        resource = config.name
        nodeID = UInt8(me.id)
        granularity = UInt32(config.tuning.bitmapGranularityBytes)
        retryNanos = UInt64(config.tuning.connectRetryMillis) * 1_000_000
        timeoutNanos = UInt64(config.tuning.peerTimeoutMillis) * 1_000_000
        address = .allocate(capacity: 1)
        do {
            address.initialize(to: try SocketAddress(host: witness.address.hostText, port: witness.address.port))
        } catch {
            address.deallocate()
            throw ServeError("witness address \(witness.address): \(error)")
        }
    }

    deinit { address.deallocate() }

    func start() {
        id = loop.register(self)
        dial()
    }

    func stop() {
        stopping = true
        link?.close(reason: "node stopping")
    }

    private func dial() {
        guard !stopping, link == nil, dialFD < 0 else { return }
        guard let fd = try? Sockets.stream(family: address.pointee.family) else { return retry() }
        dialFD = fd
        loop.engine.adoptSocket(fd)
        loop.engine.connect(fd: fd, address: SocketAddress.sockaddrPointer(address), length: address.pointee.length, userData: IOLoop.userData(id, Self.tagConnect))
    }

    private func retry() {
        if !stopping { loop.addTimer(id: id, tag: Self.tagRetry, afterNanos: retryNanos) }
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        switch tag {
        case Self.tagConnect:
            let fd = dialFD
            dialFD = -1
            if result == 0 && !stopping {
                Sockets.setNoDelay(fd)
                let connection = PeerConnection(loop: loop, fd: fd, context: context, expectedPeerName: witness.name, delegate: self)
                link = connection
                connection.start()
            } else {
                closeDescriptor(fd)
                retry()
            }
        case Self.tagRetry:
            dial()
        default:
            break
        }
    }

    /// Pings a quiet witness and drops it past the timeout (called on the node's tick).
    func tick(now: UInt64) {
        guard let link, lastHeard != 0 else { return }
        if now - lastHeard > timeoutNanos {
            link.close(reason: "witness silent for \((now - lastHeard) / 1_000_000) ms")
        } else if now - lastHeard > timeoutNanos / 4 && pingSent < lastHeard {
            pingSent = now
            link.send(.ping(id: 1))
        }
    }

    /// Tells the witness this node's state; `done(.recorded)` once it has recorded it, or its
    /// refusal, or `.unreachable` if the link is down or goes down first.
    func request(_ state: PeerStateChange, done: @escaping (WitnessAnswer) -> Void) {
        guard up, let link else { return done(.unreachable) }
        var request = state
        request.id = nextRequest
        nextRequest += 1
        pending[request.id] = done
        link.send(.stateChange(request))
    }

    func peerConnectionUp(_ connection: PeerConnection) {
        lastHeard = monotonicNanos()
        let state = currentState()
        // A rollback in progress is in the hello, so that a witness that restarted records it
        // before it handles anything else (a promotion request from the peer).
        let flags = state.flags & PeerFlags.State.rollingBack != 0 ? PeerFlags.Hello.rollingBack : 0
        connection.send(.hello(PeerHello(
            nodeID: nodeID, role: state.role, diskState: state.diskState, flags: flags, resourceName: resource, deviceSizeBytes: 0,
            bitmapGranularityBytes: granularity, uuids: state.uuids)))
    }

    func peerConnection(_ connection: PeerConnection, received header: PeerHeader, payload: UnsafeRawBufferPointer) {
        lastHeard = monotonicNanos()
        switch PeerMessage.decode(header: header, payload: payload) {
        case .invalid(let why):
            connection.close(reason: "protocol error from the witness: \(why)")
        case .message(.hello):
            guard !up else { return connection.close(reason: "protocol error: second hello from the witness") }
            up = true
            logger.info("witness: link to \(witness.name) up")
            onUp?()
        case .message(.stateChange(let change)) where change.flags & PeerFlags.State.reply != 0:
            guard up else { return connection.close(reason: "protocol error: a reply from the witness before its hello") }
            guard let done = pending.removeValue(forKey: change.id) else { return }
            done(change.flags & PeerFlags.State.refused == 0 ? .recorded : .refused(peerRollsBack: change.flags & PeerFlags.State.rollingBack != 0))
        case .message(.disconnect(let reason, let text)):
            let text = Printable.escaped(text)
            if reason == .roleConflict { onDeposed?(text) }
            connection.close(reason: "witness: \(text)")
        case .message(.pingAck):
            break
        case .message(let message):
            // A witness sends its hello, replies, pingAcks and disconnects, nothing else
            // (peer.md 12): anything else is not a witness.
            connection.close(reason: "protocol error: \(message.type) frame from the witness")
        }
    }

    func peerConnection(_ connection: PeerConnection, releasedPayload token: UInt64) {}

    func peerConnection(_ connection: PeerConnection, sinkFor header: PeerHeader) -> UnsafeMutableRawPointer? { nil }

    func peerConnectionDown(_ connection: PeerConnection, reason: String) {
        guard link === connection else { return }
        link = nil
        lastHeard = 0
        let wasUp = up
        up = false
        let waiting = pending
        pending.removeAll()
        for done in waiting.values { done(.unreachable) }
        logger.warning("witness: link to \(witness.name) down: \(reason)")
        if wasUp { onDown?() }
        retry()
    }
}
