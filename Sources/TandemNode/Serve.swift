import CTandem
import Glibc
import Logging
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
public enum Serve {
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
        var engine: any IOEngine
        do {
            engine = try IOEngineFactory.make(options.engine, pollNanos: UInt64(options.pollMicros) * 1000)
        } catch {
            throw ServeError("cannot start the \(options.engine?.rawValue ?? "") I/O engine: \(error)")
        }
        if !options.faults.isEmpty { engine = FaultInjectingEngine(engine, rules: options.faults) }
        logger.info("io engine: \(engine.kind.rawValue) (\(engine.reason)), \(pollText(options.pollMicros))")
        let pool = BufferPool()
        let loop = IOLoop(engine: engine, pool: pool, logger: logger)
        let export = NBDExport(
            name: options.exportName, description: options.description, size: device.size, readOnly: options.readOnly,
            blockSizeMin: device.alignment, blockSizePreferred: UInt32(Limits.blockSize), blockSizeMax: UInt32(Limits.nbdRequestBytesMax),
            canTrim: true, canZero: true, canFastZero: !device.isBlockDevice)
        let configuration = NBDServerConfiguration(
            host: options.host, port: options.port, export: export, tlsMode: tlsContext == nil ? .none : .forced,
            connectionsMax: options.connectionsMax)
        let server = try NBDServer(loop: loop, device: device, configuration: configuration, tlsContext: tlsContext, logger: logger)
        server.onStopped = { loop.stop() }
        let signals = SignalWatcher(loop: loop, fd: signalFD) { signal in
            logger.info("signal \(signal): stopping")
            server.beginShutdown()
        }
        server.start()
        logger.info("listening on \(server.boundAddress): export \"\(export.name)\", \(export.size) bytes, cache \(device.cache.rawValue)\(export.readOnly ? ", read-only" : "")\(tlsContext != nil ? ", TLS required" : ""), buffers \(pool.registeredWithRing ? "registered" : "not registered")")
        loop.run()
        if !options.readOnly { _ = fdatasync(device.fd) }
        withExtendedLifetime(signals) {}
        logger.info("stopped")
    }
}
