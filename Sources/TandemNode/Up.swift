import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO
import TandemNBD

/// Runs one node of a replicated resource until SIGINT/SIGTERM: the `tandem up` command.
public enum Up {
    public struct Options: Sendable {
        public var resourceFile: String
        public var config: ResourceConfig
        public var node: String
        public var primary: Bool
        public var engine: IOEngineKind?
        public var cache: CacheMode
        public var faults: [FaultRule]
        /// Overrides the resource file's `poll-us` when set.
        public var pollMicros: Int?

        public init(resourceFile: String, config: ResourceConfig, node: String, primary: Bool, engine: IOEngineKind?, cache: CacheMode, faults: [FaultRule]) {
            self.resourceFile = resourceFile
            self.config = config
            self.node = node
            self.primary = primary
            self.engine = engine
            self.cache = cache
            self.faults = faults
        }
    }

    public static func run(_ options: Options, logger: Logger) throws(ServeError) {
        Limits.checkRelations()
        let signalFD = ctandem_signalfd_for_termination()
        guard signalFD >= 0 else { throw ServeError("cannot watch signals: \(SystemError.text(-signalFD))") }
        if let me = options.config.node(named: options.node), me.isWitness {
            return try runWitness(options, me: me, signalFD: signalFD, logger: logger)
        }
        guard let me = options.config.node(named: options.node), !me.isWitness, let devicePath = me.devicePath else {
            throw ServeError("\(options.resourceFile): no data node named '\(options.node)'")
        }
        let device: BackingDevice
        do {
            device = try BackingDevice.open(path: devicePath, readOnly: false, cache: options.cache)
        } catch {
            throw ServeError(error.message)
        }
        var engine: any IOEngine
        do {
            let pollMicros = options.pollMicros ?? options.config.tuning.pollMicros
            engine = try IOEngineFactory.make(options.engine, pollNanos: UInt64(pollMicros) * 1000)
        } catch {
            throw ServeError("cannot start the I/O engine: \(error)")
        }
        if !options.faults.isEmpty { engine = FaultInjectingEngine(engine, rules: options.faults) }
        logger.info("io engine: \(engine.kind.rawValue) (\(engine.reason)), \(pollText(options.pollMicros ?? options.config.tuning.pollMicros))")
        let loop = IOLoop(engine: engine, pool: BufferPool(), logger: logger)
        let node = try ReplicatedNode(loop: loop, logger: logger, config: options.config, me: me, device: device, primary: options.primary)
        var server: NBDServer?
        if let nbd = me.nbd {
            // The primary exports read-write through replication; a secondary exports read-only,
            // so its NBD clients get EPERM for every write. The node switches it with the role.
            let export = NBDExport(
                name: options.config.name, size: device.size, readOnly: node.status.role != .primary, blockSizeMin: device.alignment,
                blockSizePreferred: UInt32(Limits.blockSize), blockSizeMax: UInt32(Limits.nbdRequestBytesMax),
                canTrim: true, canZero: true, canFastZero: false)
            let s = try NBDServer(
                loop: loop, device: device,
                configuration: NBDServerConfiguration(host: nbd.hostText, port: nbd.port, export: export, tlsMode: .none, connectionsMax: Limits.nbdConnectionsMax,
                                                       sendBufferBytes: options.config.tuning.nbdSendBufferBytes),
                tlsContext: nil, logger: logger)
            node.attach(server: s)
            server = s
        }
        let control = try ControlServer(loop: loop, path: me.controlPath, logger: logger) { node.control($0, reply: $1) }
        control.subscribed = { node.eventSnapshot() }
        let metrics = try me.metrics.map { address throws(ServeError) in
            try MetricsServer(loop: loop, address: address, logger: logger) { node.metricsText() }
        }
        node.onEvent = { [unowned control] line in control.broadcast(line) }
        var stopping = false
        let signals = SignalWatcher(loop: loop, fd: signalFD) { signal in
            guard !stopping else { return }
            stopping = true
            logger.info("signal \(signal): stopping")
            control.stop()
            metrics?.stop()
            if let server {
                server.onStopped = {
                    node.settle {
                        node.stop()
                        loop.stop()
                    }
                }
                server.beginShutdown()
            } else {
                node.settle {
                    node.stop()
                    loop.stop()
                }
            }
        }
        try node.start()
        server?.start()
        control.start()
        metrics?.start()
        let primary = node.status.role == .primary
        logger.info("node \(me.name) of \(options.config.name) up as \(primary ? "primary" : "secondary")\(server.map { ", exporting \"\(options.config.name)\"\(primary ? "" : " read-only") on \($0.boundAddress)" } ?? "")")
        loop.run()
        // Writes that landed after the node's own sync (`ReplicatedNode.stop`, before it cleared
        // `wasPrimary`) are marked out of sync; this sync only spares them a resync.
        _ = fdatasync(device.fd)
        withExtendedLifetime((signals, node, control, metrics)) {}
        logger.info("stopped")
    }

    /// A witness: no disk, no export; the arbiter, a control socket and the signal watcher.
    static func runWitness(_ options: Options, me: ResourceConfig.Node, signalFD: Int32, logger: Logger) throws(ServeError) {
        let engine: any IOEngine
        do {
            engine = try IOEngineFactory.make(options.engine)
        } catch {
            throw ServeError("cannot start the I/O engine: \(error)")
        }
        let loop = IOLoop(engine: engine, pool: BufferPool(), logger: logger)
        let node = try WitnessNode(loop: loop, logger: logger, config: options.config, me: me)
        let control = try ControlServer(loop: loop, path: me.controlPath, logger: logger) { node.control($0, reply: $1) }
        let signals = SignalWatcher(loop: loop, fd: signalFD) { signal in
            logger.info("signal \(signal): stopping")
            control.stop()
            node.stop()
            loop.stop()
        }
        try node.start()
        control.start()
        logger.info("witness \(me.name) of \(options.config.name) up")
        loop.run()
        withExtendedLifetime((signals, node, control)) {}
        logger.info("stopped")
    }
}
