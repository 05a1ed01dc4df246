import CTandem
import Glibc
import Logging
import Synchronization
import TandemIO
import TandemNBD
import TandemCore

/// What `tandem serve` exports and how.
public struct NBDServerConfiguration: Sendable {
    public var host: String
    public var port: UInt16
    public var export: NBDExport
    public var tlsMode: NBDTLSMode
    public var connectionsMax: Int
    /// SO_SNDBUF of every client's socket; 0: the kernel's autotuning.
    public var sendBufferBytes: Int

    public init(host: String, port: UInt16, export: NBDExport, tlsMode: NBDTLSMode, connectionsMax: Int,
                sendBufferBytes: Int = Limits.nbdSendBufferBytesDefault) {
        self.host = host
        self.port = port
        self.export = export
        self.tlsMode = tlsMode
        self.connectionsMax = connectionsMax
        self.sendBufferBytes = sendBufferBytes
    }
}

public struct ServeError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The NBD listener of a node: accepts clients on the loop and runs one `NBDConnection` each.
/// Takes the write-like requests of NBD connections when the export is replicated.
protocol NBDReplicator: AnyObject {
    /// WRITE (payload in `connection.payload(slot:)`), TRIM, WRITE_ZEROES or FLUSH; answered with
    /// `connection.replicatedCompleted(slot:result:)`.
    func clientRequest(_ connection: NBDConnection, slot: Int, _ request: NBDRequest)
    /// Whether reads must be served by the peer (the local disk is detached).
    var readsFromPeer: Bool { get }
    /// A local read failed: detach the disk; true when the peer can serve reads instead.
    func localReadFailed() -> Bool
    /// Serves a READ from the peer into `connection.payload(slot:)`; answered with
    /// `connection.replicatedReadCompleted(slot:result:)`.
    func clientRead(_ connection: NBDConnection, slot: Int, _ request: NBDRequest)
}

/// The connections of each loop of a `tandem serve` that runs several (`Serve`): the connection
/// limit counts all of them, and a new client goes to the loop that has the fewest.
final class LoopConnections: Sendable {
    private let counts: Mutex<[Int]>
    /// Loops with at least one connection (kept with `counts`, read without the lock).
    let busy = BusyLoops(cpus: NBDServer.cpus)

    init(loops: Int) {
        counts = Mutex(Array(repeating: 0, count: loops))
    }

    /// The loop with the fewest connections, counted for the new one; nil at `limit`.
    func reserve(limit: Int) -> Int? {
        counts.withLock { counts in
            guard counts.reduce(0, +) < limit else { return nil }
            let loop = counts.indices.min { counts[$0] < counts[$1] }!
            counts[loop] += 1
            if counts[loop] == 1 { busy.add(1) }
            return loop
        }
    }

    func release(_ loop: Int) {
        counts.withLock { counts in
            counts[loop] -= 1
            if counts[loop] == 0 { busy.add(-1) }
        }
    }
}

/// Hands an accepted connection to another loop of the same `tandem serve`.
struct LoopSpread {
    let connections: LoopConnections
    /// This server's loop.
    let index: Int
    /// Gives the socket (and the client's address) to loop `index`; nil on the loops that do not
    /// accept.
    let handOff: ((_ index: Int, _ fd: Int32, _ peer: String) -> Void)?
}

public final class NBDServer: IOHandler {
    let loop: IOLoop
    /// Set on a replicated node: writes go through replication instead of straight to disk.
    weak var replicator: (any NBDReplicator)?
    /// Set on a read-only export of a point-in-time barrier: reads come from here (the image
    /// at the barrier), synchronously, and every range is reported as data (the device's holes
    /// say nothing about the barrier's image). Returns 0 or -errno.
    var imageReader: ((UInt64, UnsafeMutableRawBufferPointer) -> Int32)?
    /// Set on a node that tracks changes since barriers: the extents of a range changed since
    /// barrier `key` (flag 1 = dirty), for `qemu:dirty-bitmap:` contexts. False when it no longer
    /// knows that barrier: the range is then reported dirty (never under-report).
    var changedRuns: ((_ key: UInt64, _ offset: UInt64, _ length: UInt32, _ runsMax: Int,
                       _ runs: inout [(length: UInt32, flags: UInt32)]) -> Bool)?
    /// Whether every CPU has a loop with connections to keep it busy. Then a loop copies its large
    /// cached reads of the read window itself; otherwise it hands those of 256 KiB or more to a
    /// kernel worker, which copies on a CPU no loop uses (`NBDConnection.offloadReadBytesMin`).
    /// 1 MiB QD16 reads of cached data through the read window, on 2 cores, medians of four
    /// alternating runs: at 1 connection (one busy loop) handing off gave 4470 MiB/s against
    /// 4036 copying on the loop; at 4 connections on 2 loops copying on the loop gave 5658
    /// against 5166.
    var everyCPUHasABusyLoop: Bool {
        guard let spread else { return false }
        return spread.connections.busy.everyCPUHasOne
    }

    /// CPUs online (at least one): the default loop count and the test above.
    static let cpus = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))

    /// Reads served (for metrics): requests and bytes.
    var readRequests: UInt64 = 0
    var readBytes: UInt64 = 0
    let device: BackingDevice
    private(set) var configuration: NBDServerConfiguration
    let tlsContext: TLSContext?
    let logger: Logger
    /// -1 on a loop that only runs connections another loop accepted (`adopt`).
    private let listenFD: Int32
    /// Set when `tandem serve` runs several loops (`LoopSpread`).
    let spread: LoopSpread?
    private(set) var id: UInt32 = 0
    private var connections: [UInt32: NBDConnection] = [:]
    private var acceptPosted = false
    private var bufferWaiters: [NBDConnection] = []
    public private(set) var shuttingDown = false
    /// Clients are being closed (a demotion) while the listener stays open.
    public private(set) var draining = false
    private var drained: (() -> Void)?
    /// New requests are answered ESHUTDOWN.
    var refusingRequests: Bool { shuttingDown || draining }
    /// Called once the server has stopped and every connection is closed.
    public var onStopped: (() -> Void)?
    /// The address actually bound (the port is chosen by the kernel when 0 was asked for).
    public let boundAddress: String
    /// One MiB of zeros, for WRITE_ZEROES where the device cannot zero by itself.
    let zeroBuffer: UnsafeMutableRawPointer
    static let zeroBufferBytes = 1 << 20

    private static let tagAccept: UInt32 = 1
    private static let tagDrainTimer: UInt32 = 2
    private static let tagClientDrainTimer: UInt32 = 4

    public convenience init(loop: IOLoop, device: BackingDevice, configuration: NBDServerConfiguration, tlsContext: TLSContext?, logger: Logger) throws(ServeError) {
        try self.init(loop: loop, device: device, configuration: configuration, tlsContext: tlsContext, logger: logger, spread: nil)
    }

    /// With `spread`: one loop of several. The loop with a `handOff` listens and accepts for
    /// all; the others only run the connections handed to them (`adopt`).
    init(loop: IOLoop, device: BackingDevice, configuration: NBDServerConfiguration, tlsContext: TLSContext?, logger: Logger, spread: LoopSpread?) throws(ServeError) {
        self.loop = loop
        self.device = device
        self.configuration = configuration
        self.tlsContext = tlsContext
        self.logger = logger
        self.spread = spread
        if let spread, spread.handOff == nil {
            listenFD = -1
            boundAddress = ""
        } else {
            do {
                let (fd, bound) = try Sockets.listen(host: configuration.host, port: configuration.port)
                listenFD = fd
                boundAddress = bound.description
            } catch {
                throw ServeError(error.errno == EADDRINUSE ? error.operation : error.description)
            }
            loop.engine.adoptSocket(listenFD)
        }
        zeroBuffer = allocateAligned(Self.zeroBufferBytes)
    }

    deinit {
        if listenFD >= 0 { closeDescriptor(listenFD) }
        freeAligned(zeroBuffer, Self.zeroBufferBytes)
    }

    public var connectionCount: Int { connections.count }

    public func start() {
        id = loop.register(self)
        postAccept()
    }

    private func postAccept() {
        guard !acceptPosted, !shuttingDown, listenFD >= 0 else { return }
        acceptPosted = true
        loop.engine.accept(fd: listenFD, userData: IOLoop.userData(id, Self.tagAccept))
    }

    public func ioCompleted(tag: UInt32, result: Int32) {
        switch tag {
        case Self.tagAccept:
            acceptPosted = false
            if shuttingDown {
                if result >= 0 { closeDescriptor(result) }
                finishIfIdle()
                return
            }
            if result >= 0 {
                accepted(result)
            } else if result != -EAGAIN && result != -EINTR && result != -ECONNABORTED {
                logger.warning("accept failed: \(SystemError.text(-result))")
                if result == -EMFILE || result == -ENFILE {
                    // Out of descriptors: try again after a pause rather than spin.
                    loop.addTimer(id: id, tag: Self.tagDrainTimer + 1, afterNanos: 100_000_000)
                    return
                }
            }
            postAccept()
        case Self.tagDrainTimer:
            // The drain deadline passed: close whoever is still connected.
            for connection in connections.values { connection.close(reason: "server shut down") }
        case Self.tagDrainTimer + 1:
            postAccept()
        case Self.tagClientDrainTimer:
            for connection in connections.values { connection.close(reason: "clients disconnected by the node") }
        default:
            preconditionFailure("NBDServer: unknown tag \(tag)")
        }
    }

    private func accepted(_ fd: Int32) {
        let peer = SocketAddress(of: fd, peer: true)?.description ?? "?"
        if draining {
            logger.notice("refusing NBD client \(peer): the node is changing role")
            closeDescriptor(fd)
            return
        }
        var target = 0
        if let spread {
            guard let loop = spread.connections.reserve(limit: configuration.connectionsMax) else {
                return refuse(fd, peer)
            }
            target = loop
        } else if connections.count >= configuration.connectionsMax {
            return refuse(fd, peer)
        }
        if let spread, target != spread.index {
            spread.handOff!(target, fd, peer)
            return
        }
        adopt(fd, peer: peer)
    }

    private func refuse(_ fd: Int32, _ peer: String) {
        closeDescriptor(fd)
        // One line per refusal would let a client that reconnects in a loop flood the log: the
        // first is logged, then at most one a minute with the number refused meanwhile.
        refusedUnlogged += 1
        let now = monotonicNanos()
        guard refusalLoggedNanos == 0 || now &- refusalLoggedNanos >= 60_000_000_000 else { return }
        let others = refusedUnlogged - 1
        logger.warning("refusing NBD client \(peer): \(configuration.connectionsMax) connections already\(others > 0 ? " (and \(others) more since the last such line)" : "")")
        refusedUnlogged = 0
        refusalLoggedNanos = now
    }

    /// Refusals for the connection limit not logged yet, and when the last was.
    private var refusedUnlogged = 0
    private var refusalLoggedNanos: UInt64 = 0

    /// Runs a client accepted here or, with several loops, by the loop that listens.
    func adopt(_ fd: Int32, peer: String) {
        if shuttingDown {
            closeDescriptor(fd)
            spread?.connections.release(spread!.index)
            return
        }
        Sockets.setNoDelay(fd)
        Sockets.setSendBuffer(fd, bytes: configuration.sendBufferBytes)
        loop.engine.adoptSocket(fd)
        let connection = NBDConnection(server: self, fd: fd, peer: peer)
        connections[connection.id] = connection
        logger.debug("NBD client \(peer) connected")
        connection.start()
    }

    func connectionClosed(_ connection: NBDConnection) {
        connections[connection.id] = nil
        if let spread { spread.connections.release(spread.index) }
        bufferWaiters.removeAll { $0 === connection }
        finishIfIdle()
        finishDrainIfIdle()
    }

    /// The export as new clients see it (a node that changes role changes this).
    func setReadOnly(_ readOnly: Bool) {
        configuration.export.readOnly = readOnly
    }

    /// The changed-block bitmaps new clients may select (a node that creates barriers sets it).
    func setDirtyBitmaps(_ bitmaps: [NBDDirtyBitmap]) {
        configuration.export.dirtyBitmaps = bitmaps
    }

    /// Closes every client once its requests in flight are answered (new requests get
    /// ESHUTDOWN) and keeps listening; `done` runs when none is left (at the latest after the
    /// drain deadline).
    func disconnectClients(done: @escaping () -> Void) {
        precondition(!draining, "NBDServer: clients are already being disconnected")
        draining = true
        drained = done
        logger.info("disconnecting \(connections.count) NBD client(s)")
        for connection in connections.values { connection.serverShuttingDown() }
        loop.addTimer(id: id, tag: Self.tagClientDrainTimer, afterNanos: UInt64(Limits.shutdownDrainSeconds) * 1_000_000_000)
        finishDrainIfIdle()
    }

    private func finishDrainIfIdle() {
        guard draining, connections.isEmpty else { return }
        draining = false
        loop.cancelTimers(id: id, tag: Self.tagClientDrainTimer)
        let done = drained
        drained = nil
        done?()
    }

    /// A connection found no free buffer; it is resumed when one is given back.
    func waitForBuffer(_ connection: NBDConnection) {
        if !bufferWaiters.contains(where: { $0 === connection }) { bufferWaiters.append(connection) }
    }

    func bufferReleased() {
        if !bufferWaiters.isEmpty { loop.callAtBatchEnd(id) }
    }

    public func ioBatchEnded() {
        guard !bufferWaiters.isEmpty else { return }
        let waiters = bufferWaiters
        bufferWaiters.removeAll(keepingCapacity: true)
        for connection in waiters { connection.resumeAfterBuffer() }
    }

    /// Stops accepting, answers new requests with ESHUTDOWN, lets in-flight ones finish, then
    /// closes every connection (at the latest after the drain deadline).
    public func beginShutdown() {
        guard !shuttingDown else { return }
        shuttingDown = true
        logger.info("shutting down: \(connections.count) NBD connection(s) to drain")
        if listenFD >= 0 { shutdown(listenFD, Int32(SHUT_RDWR)) }
        for connection in connections.values { connection.serverShuttingDown() }
        loop.addTimer(id: id, tag: Self.tagDrainTimer, afterNanos: UInt64(Limits.shutdownDrainSeconds) * 1_000_000_000)
        finishIfIdle()
    }

    private func finishIfIdle() {
        guard shuttingDown, connections.isEmpty, !acceptPosted else { return }
        if let done = onStopped {
            onStopped = nil
            loop.cancelTimers(id: id, tag: Self.tagDrainTimer)
            done()
        }
    }
}
