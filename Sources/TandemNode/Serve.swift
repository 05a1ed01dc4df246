import CTandem
import Glibc
import Logging
import Synchronization
import TandemIO
import TandemNBD
import TandemCore

/// Everything `tandem serve` needs, already validated by the CLI.
public struct ServeOptions: Sendable {
    public var backingPath: String
    public var host: String
    public var port: UInt16
    public var exportName: String
    public var description: String
    public var readOnly: Bool
    public var engine: IOEngineKind?
    public var cache: CacheMode
    public var tlsCertificate: String?
    public var tlsKey: String?
    public var tlsCA: String?
    public var tlsAnonymousClients: Bool
    public var connectionsMax: Int
    /// Microseconds a wait polls before it sleeps (`PollPolicy`); 0: never.
    public var pollMicros = Limits.pollMicrosDefault
    /// Disk operations to fail on purpose (tests of error handling).
    public var faults: [FaultRule] = []
    /// Event loops (threads), each with its own ring, buffer pool and share of the connections;
    /// nil: `Serve.defaultLoops`.
    public var loops: Int?
    /// SO_SNDBUF of every client's socket; 0: the kernel's autotuning.
    public var sendBufferBytes = Limits.nbdSendBufferBytesDefault

    public init(backingPath: String, host: String, port: UInt16, exportName: String, description: String, readOnly: Bool, engine: IOEngineKind?, cache: CacheMode, tlsCertificate: String?, tlsKey: String?, tlsCA: String?, tlsAnonymousClients: Bool, connectionsMax: Int) {
        self.backingPath = backingPath
        self.host = host
        self.port = port
        self.exportName = exportName
        self.description = description
        self.readOnly = readOnly
        self.engine = engine
        self.cache = cache
        self.tlsCertificate = tlsCertificate
        self.tlsKey = tlsKey
        self.tlsCA = tlsCA
        self.tlsAnonymousClients = tlsAnonymousClients
        self.connectionsMax = connectionsMax
    }
}

/// How the start-up log line describes `PollPolicy`'s setting.
func pollText(_ micros: Int) -> String {
    micros == 0 ? "no polling" : "polls up to \(micros) µs before sleeping"
}

/// Watches SIGINT/SIGTERM/SIGHUP through a signalfd on the loop.
final class SignalWatcher: IOHandler {
    let loop: IOLoop
    let fd: Int32
    var id: UInt32 = 0
    let onSignal: (Int32) -> Void

    init(loop: IOLoop, fd: Int32, onSignal: @escaping (Int32) -> Void) {
        self.loop = loop
        self.fd = fd
        self.onSignal = onSignal
        id = loop.register(self)
        loop.engine.pollReadable(fd: fd, userData: IOLoop.userData(id, 0))
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        while true {
            let signal = ctandem_signalfd_read(fd)
            if signal <= 0 { break }
            onSignal(signal)
        }
        loop.engine.pollReadable(fd: fd, userData: IOLoop.userData(id, 0))
    }
}

/// Runs a single-node NBD export until SIGINT/SIGTERM: the `tandem serve` command.
///
/// With more than one loop, each runs on its own thread with its own engine (ring), buffer pool
/// and `NBDServer`; the first listens, and hands each new client to the loop with the fewest
/// connections (`LoopConnections`). A connection stays on its loop, so nothing of a request is
/// shared between threads. All loops write the one file, and a FLUSH's `fdatasync` covers every
/// write completed on it, whichever loop did it.
public enum Serve {
    /// One loop per CPU, at most `Limits.serveLoopsDefaultMax`; one with fault injection, whose
    /// rules count operations per engine (`--inject-fault`'s after= and count=).
    public static func defaultLoops(faults: [FaultRule]) -> Int {
        if !faults.isEmpty { return 1 }
        return min(NBDServer.cpus, Limits.serveLoopsDefaultMax)
    }

    public static func run(_ options: ServeOptions, logger: Logger) throws(ServeError) {
        Limits.checkRelations()
        // Signals are blocked before any thread starts, so only the signalfd sees them.
        let signalFD = ctandem_signalfd_for_termination()
        guard signalFD >= 0 else { throw ServeError("cannot watch signals: \(SystemError.text(-signalFD))") }
        let device: BackingDevice
        do {
            device = try BackingDevice.open(path: options.backingPath, readOnly: options.readOnly, cache: options.cache)
        } catch {
            throw ServeError(error.message)
        }
        var tlsContext: TLSContext?
        if let cert = options.tlsCertificate, let key = options.tlsKey, let ca = options.tlsCA {
            do {
                tlsContext = try TLSContext(server: true, certificate: cert, key: key, ca: ca, requirePeerCertificate: !options.tlsAnonymousClients, tls13Only: false)
            } catch {
                throw ServeError("TLS: \(error.message)")
            }
        }
        let loopCount = options.loops ?? defaultLoops(faults: options.faults)
        precondition((1...Limits.serveLoopsMax).contains(loopCount), "loops checked by the CLI")
        // Counted before any engine exists: every loop's waits consult it (`PollPolicy`).
        let connections = LoopConnections(loops: loopCount)
        let busyLoops = loopCount > 1 ? connections.busy : nil
        let engine = try makeEngine(options, busyLoops: busyLoops)
        logger.info("io engine: \(engine.kind.rawValue) (\(engine.reason)), \(pollText(options.pollMicros))\(busyLoops != nil && options.pollMicros > 0 ? " (not while every CPU has a loop with clients)" : ""), \(loopCount) loop\(loopCount == 1 ? "" : "s")")
        let pool = BufferPool(classes: BufferPool.classes(sharedBy: loopCount))
        let loop = IOLoop(engine: engine, pool: pool, logger: logger)
        let export = NBDExport(
            name: options.exportName, description: options.description, size: device.size, readOnly: options.readOnly,
            blockSizeMin: device.alignment, blockSizePreferred: UInt32(Limits.blockSize), blockSizeMax: UInt32(Limits.nbdRequestBytesMax),
            canTrim: true, canZero: true, canFastZero: !device.isBlockDevice)
        let configuration = NBDServerConfiguration(
            host: options.host, port: options.port, export: export, tlsMode: tlsContext == nil ? .none : .forced,
            connectionsMax: options.connectionsMax, sendBufferBytes: options.sendBufferBytes)
        // The other loops start first: the listener hands clients to them from its first accept.
        var others: [ServeLoop] = []
        defer { for other in others { other.stopAndJoin() } }
        for index in 1..<loopCount {
            let other = try ServeLoop(index: index, of: loopCount, options: options, device: device, configuration: configuration, tlsContext: tlsContext,
                                  connections: connections, logger: logger)
            try other.start()
            others.append(other)
        }
        let mailboxes = others.map(\.mailbox)
        let spread = loopCount == 1 ? nil : LoopSpread(connections: connections, index: 0) { index, fd, peer in
            mailboxes[index - 1].post(fd, peer: peer)
        }
        let server = try NBDServer(loop: loop, device: device, configuration: configuration, tlsContext: tlsContext, logger: logger, spread: spread)
        server.onStopped = { loop.stop() }
        let signals = SignalWatcher(loop: loop, fd: signalFD) { signal in
            logger.info("signal \(signal): stopping")
            server.beginShutdown()
            for mailbox in mailboxes { mailbox.stop() }
        }
        server.start()
        logger.info("listening on \(server.boundAddress): export \"\(export.name)\", \(export.size) bytes, cache \(device.cache.rawValue)\(export.readOnly ? ", read-only" : "")\(tlsContext != nil ? ", TLS required" : ""), buffers \(pool.registeredWithRing ? "registered" : "not registered")")
        loop.run()
        for other in others { other.stopAndJoin() }
        others.removeAll()
        if !options.readOnly { _ = fdatasync(device.fd) }
        withExtendedLifetime(signals) {}
        logger.info("stopped")
    }

    static func makeEngine(_ options: ServeOptions, busyLoops: BusyLoops?) throws(ServeError) -> any IOEngine {
        var engine: any IOEngine
        do {
            engine = try IOEngineFactory.make(options.engine, pollNanos: UInt64(options.pollMicros) * 1000, busyLoops: busyLoops)
        } catch {
            throw ServeError("cannot start the \(options.engine?.rawValue ?? "") I/O engine: \(error)")
        }
        if !options.faults.isEmpty { engine = FaultInjectingEngine(engine, rules: options.faults) }
        return engine
    }
}

/// What the listening loop sends another loop: sockets of new clients, and the stop.
final class LoopMailbox: Sendable {
    /// Readable when there is something to take (non-blocking, drained by the receiver).
    let eventFD: Int32
    private let state = Mutex<(sockets: [(fd: Int32, peer: String)], stop: Bool)>(([], false))

    init() throws(ServeError) {
        eventFD = ctandem_eventfd()
        guard eventFD >= 0 else { throw ServeError("cannot make an eventfd: \(SystemError.text(-eventFD))") }
    }

    deinit {
        // Sockets handed off that the loop never took (it stopped first).
        for socket in state.withLock({ $0.sockets }) { closeDescriptor(socket.fd) }
        closeDescriptor(eventFD)
    }

    func post(_ fd: Int32, peer: String) {
        state.withLock { $0.sockets.append((fd, peer)) }
        ctandem_eventfd_signal(eventFD)
    }

    func stop() {
        state.withLock { $0.stop = true }
        ctandem_eventfd_signal(eventFD)
    }

    /// Everything posted so far (at most `Limits.nbdConnectionsMax` sockets, the listener's
    /// limit), and whether the loop is to stop.
    func take() -> (sockets: [(fd: Int32, peer: String)], stop: Bool) {
        ctandem_eventfd_drain(eventFD)
        return state.withLock { state in
            defer { state.sockets.removeAll() }
            return (state.sockets, state.stop)
        }
    }
}

/// Waits on a loop for its mailbox.
final class MailboxWatcher: IOHandler {
    let loop: IOLoop
    let mailbox: LoopMailbox
    let server: NBDServer
    var id: UInt32 = 0
    private var stopped = false

    init(loop: IOLoop, mailbox: LoopMailbox, server: NBDServer) {
        self.loop = loop
        self.mailbox = mailbox
        self.server = server
        id = loop.register(self)
        loop.engine.pollReadable(fd: mailbox.eventFD, userData: IOLoop.userData(id, 0))
    }

    func ioCompleted(tag: UInt32, result: Int32) {
        let (sockets, stop) = mailbox.take()
        for socket in sockets { server.adopt(socket.fd, peer: socket.peer) }
        if stop && !stopped {
            stopped = true
            server.beginShutdown()
        }
        if !stopped { loop.engine.pollReadable(fd: mailbox.eventFD, userData: IOLoop.userData(id, 0)) }
    }
}

/// One loop of a `tandem serve` besides the listening one, on its own thread.
final class ServeLoop: ThreadMain, @unchecked Sendable {
    let index: Int
    let mailbox: LoopMailbox
    /// How many loops the server runs (each pool holds its share).
    private let loops: Int
    private let options: ServeOptions
    private let device: BackingDevice
    private let configuration: NBDServerConfiguration
    private let tlsContext: TLSContext?
    private let connections: LoopConnections
    private let logger: Logger
    private var thread: pthread_t?
    /// Set by the thread once its engine is up (nil) or could not start (the error).
    private let started = Mutex<(done: Bool, error: ServeError?)>((false, nil))

    init(index: Int, of loops: Int, options: ServeOptions, device: BackingDevice, configuration: NBDServerConfiguration, tlsContext: TLSContext?,
         connections: LoopConnections, logger: Logger) throws(ServeError) {
        self.index = index
        self.loops = loops
        self.options = options
        self.device = device
        self.configuration = configuration
        self.tlsContext = tlsContext
        self.connections = connections
        self.logger = logger
        mailbox = try LoopMailbox()
    }

    /// Starts the thread and waits until its engine runs (a ring must be made on the thread
    /// that submits to it: IORING_SETUP_SINGLE_ISSUER).
    func start() throws(ServeError) {
        let handle: pthread_t
        do {
            handle = try startThread(self)
        } catch {
            throw ServeError("cannot start loop \(index): \(error)")
        }
        // Bounded: the engine starts or fails in milliseconds.
        for _ in 0..<Limits.serveLoopStartMillisMax {
            let (done, error) = started.withLock { ($0.done, $0.error) }
            if done {
                if let error {
                    pthread_join(handle, nil)
                    throw error
                }
                thread = handle
                return
            }
            usleep(1000)
        }
        throw ServeError("loop \(index) did not start within \(Limits.serveLoopStartMillisMax) ms")
    }

    func threadMain() {
        let engine: any IOEngine
        do {
            engine = try Serve.makeEngine(options, busyLoops: connections.busy)
        } catch {
            started.withLock { $0 = (true, error) }
            return
        }
        let loop = IOLoop(engine: engine, pool: BufferPool(classes: BufferPool.classes(sharedBy: loops)), logger: logger)
        let server: NBDServer
        do {
            server = try NBDServer(loop: loop, device: device, configuration: configuration, tlsContext: tlsContext, logger: logger,
                                   spread: LoopSpread(connections: connections, index: index, handOff: nil))
        } catch {
            started.withLock { $0 = (true, error) }
            return
        }
        server.onStopped = { loop.stop() }
        // Registers it with the loop (its buffer waiters, batch ends and drain timers); it
        // accepts nothing, having no listener.
        server.start()
        let watcher = MailboxWatcher(loop: loop, mailbox: mailbox, server: server)
        started.withLock { $0 = (true, nil) }
        loop.run()
        withExtendedLifetime(watcher) {}
    }

    /// Asks the loop to stop (its clients drain as the listener's do) and waits for its thread.
    func stopAndJoin() {
        guard let handle = thread else { return }
        thread = nil
        mailbox.stop()
        pthread_join(handle, nil)
    }
}
