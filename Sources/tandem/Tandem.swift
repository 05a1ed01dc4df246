import ArgumentParser
import CTandem
import Glibc
import Logging
import TandemCore
import TandemIO
import TandemNode

@main
struct Tandem: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tandem",
        abstract: "Userspace block replication with an NBD export.",
        discussion: """
            Tandem keeps a backing file or block device, exports it over NBD and mirrors every \
            write synchronously to a peer over TLS. Every subcommand's --help has examples.

            Examples:
              tandem config check r0.toml --node alpha
              tandem up r0.toml --node alpha --primary
              tandem status r0.toml --node alpha
              tandem check r0.toml --node alpha
            """,
        subcommands: [Serve.self, Certs.self, Config.self, Init.self, Up.self, Status.self, Check.self, WaitSync.self, Events.self, Verify.self,
                      Primary.self, Secondary.self, Connect.self, Disconnect.self, Barrier.self, Diff.self, Apply.self, Rollback.self,
                      DumpMetadata.self, Bench.self, Sim.self, LinkProbe.self])

    /// Every failure, from argument parsing or from running, ends as one `error: ...` line on
    /// stderr and a non-zero exit; `--help` prints help and exits 0.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Glibc.exit(0)
            }
            let text = message(for: error)
            if !text.isEmpty {
                var line = "error: \(text)\n"
                if code == .validationFailure { line += "(see tandem --help, or tandem help SUBCOMMAND)\n" }
                line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
            }
            Glibc.exit(code.rawValue)
        }
    }
}

/// Options every long-running command shares.
struct LoggingOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    @Option(help: "Log format: human (one readable line per event) or json (one JSON object per line: ts, level, label, message, metadata).")
    var logFormat: String = "human"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("unknown log level '\(logLevel)' (use trace, debug, info, notice, warning or error)")
        }
        guard ["human", "json"].contains(logFormat) else {
            throw ValidationError("unknown log format '\(logFormat)' (use human or json)")
        }
    }

    func makeLogger() -> Logger {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        let json = logFormat == "json"
        LoggingSystem.bootstrap { label in
            if json {
                var handler = JSONLogHandler(label: label)
                handler.logLevel = level
                return handler
            }
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        return Logger(label: "tandem")
    }
}

/// Prints `error: message` and exits non-zero: the one shape every runtime failure takes.
func fail(_ message: String) -> ExitCode {
    var line = "error: \(message)\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    return ExitCode(1)
}

extension IOEngineKind: ExpressibleByArgument {}

/// How a node does its disk I/O: shared by `serve` and `up`.
struct IOOptions: ParsableArguments {
    @Option(help: "I/O engine: auto, uring, aio or threads (auto: io_uring, else libaio, else threads).")
    var ioEngine: String = "auto"

    @Option(help: "direct (O_DIRECT, no page cache) or page (through the page cache).")
    var cache: CacheMode = .direct

    @Option(help: ArgumentHelp("Fail chosen disk operations, for testing: OP:ERRNO[:offset=A-B][:after=N][:count=N] (repeatable).", valueName: "rule"))
    var injectFault: [String] = []

    @Option(name: .customLong("poll-us"), help: ArgumentHelp(
        "Microseconds a wait polls for completions before the thread sleeps, 0 to never poll (default: \(Limits.pollMicrosDefault), or the resource file's poll-us).",
        valueName: "us"))
    var pollMicros: Int?

    func validate() throws {
        guard ioEngine == "auto" || IOEngineKind(rawValue: ioEngine) != nil else {
            throw ValidationError("unknown I/O engine '\(ioEngine)' (use auto, uring, aio or threads)")
        }
        if let pollMicros, !(0...Limits.pollMicrosMax).contains(pollMicros) {
            throw ValidationError("--poll-us must be between 0 and \(Limits.pollMicrosMax), got \(pollMicros)")
        }
        for rule in injectFault {
            do { _ = try FaultRule(rule) } catch { throw ValidationError(error.operation) }
        }
    }

    /// nil: pick the best engine available.
    var engine: IOEngineKind? { IOEngineKind(rawValue: ioEngine) }
    /// The fault rules (checked in `validate`).
    var faults: [FaultRule] { injectFault.compactMap { try? FaultRule($0) } }
}
extension CacheMode: ExpressibleByArgument {}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Export a backing file or block device over NBD (one node, no replication).",
        discussion: """
            Examples:
              tandem serve disk.img
              tandem serve /dev/vdb --listen 0.0.0.0:10809 --export-name vm1
              tandem serve disk.img --tls-cert server-cert.pem --tls-key server-key.pem --tls-ca ca-cert.pem
              tandem serve disk.img --read-only --cache page --io-engine threads

            Clients: nbdinfo nbd://127.0.0.1:10809, qemu-io -f raw nbd://127.0.0.1:10809/tandem,
            nbdcopy, fio --ioengine=nbd, nbdfuse. With TLS, use nbds:// and a certificate directory
            made by `tandem certs`.
            """)

    @Argument(help: "The backing file or block device (its size must be a multiple of 4096).")
    var backing: String

    @Option(help: "Address to listen on, HOST:PORT or [IPv6]:PORT.")
    var listen: String = "127.0.0.1:10809"

    @Option(help: "Name of the export (clients asking for the empty name get it too).")
    var exportName: String = "tandem"

    @Option(help: "Description shown to clients that ask.")
    var description: String = ""

    @Flag(help: "Refuse writes (the device is opened read-only).")
    var readOnly = false

    @OptionGroup var io: IOOptions

    @Option(help: "PEM certificate of this server; with --tls-key and --tls-ca, TLS is required.")
    var tlsCert: String?

    @Option(help: "PEM private key of --tls-cert.")
    var tlsKey: String?

    @Option(help: "PEM CA certificate that client certificates must chain to.")
    var tlsCa: String?

    @Flag(help: "With TLS, accept clients that present no certificate.")
    var tlsAnonymousClients = false

    @Option(help: "Most NBD connections at once.")
    var maxConnections: Int = Limits.nbdConnectionsMax

    @Option(help: ArgumentHelp(
        "Event loops (threads), each with its own io_uring and buffers; new clients go to the one with the fewest (default: one per CPU, at most \(Limits.serveLoopsDefaultMax); 1 with --inject-fault).",
        valueName: "n"))
    var loops: Int?

    @Option(help: ArgumentHelp(
        "Send buffer of each client's socket in KiB (SO_SNDBUF; 0: the kernel's autotuning). Bounded, replies reach the client while they are in the CPU's cache; a long network path may want more.",
        valueName: "KiB"))
    var sendBufferKib: Int = Limits.nbdSendBufferBytesDefault >> 10

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        guard ResourceConfig.Address(listen: listen) != nil else { throw ValidationError("--listen wants HOST:PORT or [IPv6]:PORT, got '\(listen)'") }
        let tls = [tlsCert, tlsKey, tlsCa].compactMap { $0 }
        guard tls.isEmpty || tls.count == 3 else {
            throw ValidationError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
        }
        guard (1...Limits.nbdConnectionsMax).contains(maxConnections) else {
            throw ValidationError("--max-connections must be between 1 and \(Limits.nbdConnectionsMax)")
        }
        guard exportName.utf8.count <= Limits.nbdStringLengthMax else { throw ValidationError("--export-name is too long") }
        if let loops, !(1...Limits.serveLoopsMax).contains(loops) {
            throw ValidationError("--loops must be between 1 and \(Limits.serveLoopsMax)")
        }
        guard (0...(Limits.socketSendBufferBytesMax >> 10)).contains(sendBufferKib) else {
            throw ValidationError("--send-buffer-kib must be between 0 and \(Limits.socketSendBufferBytesMax >> 10), got \(sendBufferKib)")
        }
    }

    func run() throws {
        let logger = logging.makeLogger()
        let address = ResourceConfig.Address(listen: listen)!
        let (host, port) = (address.hostText, address.port)
        for (flag, path) in [("--tls-cert", tlsCert), ("--tls-key", tlsKey), ("--tls-ca", tlsCa)] {
            if let path, access(path, R_OK) != 0 {
                throw fail("cannot read \(flag) \(path): \(SystemError.text(errno))")
            }
        }
        var options = ServeOptions(
            backingPath: backing, host: host, port: port, exportName: exportName, description: description,
            readOnly: readOnly, engine: io.engine, cache: io.cache, tlsCertificate: tlsCert,
            tlsKey: tlsKey, tlsCA: tlsCa, tlsAnonymousClients: tlsAnonymousClients, connectionsMax: maxConnections)
        options.faults = io.faults
        options.pollMicros = io.pollMicros ?? Limits.pollMicrosDefault
        options.loops = loops
        options.sendBufferBytes = sendBufferKib << 10
        do {
            try TandemNode.Serve.run(options, logger: logger)
        } catch {
            throw fail(error.message)
        }
    }
}

struct Certs: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a CA and the certificates it signs, for TLS on the export and the replication link.",
        discussion: """
            Writes, in --dir: ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem,
            client-cert.pem, client-key.pem (the layout libnbd's tls-certificates=DIR expects), and
            NAME-cert.pem / NAME-key.pem for each --node NAME. Keys are EC P-256, mode 0600.

            Examples:
              tandem certs --dir /etc/tandem/pki --node alpha --node beta
              tandem certs --dir ./pki --san 192.0.2.10 --san nas.example.org
              nbdinfo 'nbds://127.0.0.1/tandem?tls-certificates=./pki'
            """)

    @Option(help: "Directory to write into (created if missing).")
    var dir: String

    @Option(help: "Also make a certificate for this node name (repeatable).")
    var node: [String] = []

    @Option(help: "Extra subject alternative name (DNS name or IP address) for server and node certificates (repeatable).")
    var san: [String] = []

    @Option(help: "Validity in days.")
    var days: Int = 3650

    @Flag(help: "Replace files that exist.")
    var force = false

    func validate() throws {
        guard (1...36500).contains(days) else { throw ValidationError("--days must be between 1 and 36500") }
        for name in node where name.isEmpty || name.contains("/") || name.hasPrefix(".") {
            throw ValidationError("invalid node name '\(name)'")
        }
        for name in ["ca", "server", "client"] where node.contains(name) {
            throw ValidationError("node name '\(name)' clashes with the \(name)-cert.pem this command writes")
        }
    }

    func run() throws {
        if mkdir(dir, 0o700) != 0 && errno != EEXIST {
            throw fail("cannot create \(dir): \(SystemError.text(errno))")
        }
        let path = { (name: String) in "\(dir)/\(name)" }
        var outputs = ["ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"]
        for name in node { outputs += ["\(name)-cert.pem", "\(name)-key.pem"] }
        if !force, let existing = outputs.first(where: { access(path($0), F_OK) == 0 }) {
            throw fail("\(path(existing)) exists; use --force to replace it")
        }
        let sans = (["localhost", "127.0.0.1", "::1"] + san).joined(separator: ",")
        var err = [CChar](repeating: 0, count: 512)
        func check(_ rc: Int32) throws {
            if rc != 0 { throw fail(String(nulTerminated: err)) }
        }
        try check(ctandem_cert_make_ca("Tandem CA", Int32(days), path("ca-cert.pem"), path("ca-key.pem"), &err, err.count))
        let signed: [(cn: String, file: String, sans: String)] =
            [("localhost", "server", sans), ("tandem-client", "client", "")] + node.map { ($0, $0, sans) }
        for item in signed {
            try check(ctandem_cert_make_signed(
                item.cn, item.sans, Int32(days), path("ca-cert.pem"), path("ca-key.pem"),
                path("\(item.file)-cert.pem"), path("\(item.file)-key.pem"), &err, err.count))
        }
        print("wrote \(outputs.count) files to \(dir)")
    }
}
