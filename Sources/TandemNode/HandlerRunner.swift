import Glibc
import Logging
import TandemCore
import TandemIO

/// Runs the resource's event scripts (`[handlers]`, like DRBD's handlers): each event starts
/// the script with `EVENT RESOURCE NODE DETAIL...` as arguments and the same facts in
/// `TANDEM_EVENT`, `TANDEM_RESOURCE`, `TANDEM_NODE`, `TANDEM_PEER`, `TANDEM_DETAIL`. Scripts run
/// in the background; the node never waits for one. A script that fails, cannot start or runs
/// past its deadline (then killed) is logged and that is all: a handler is never fatal.
final class HandlerRunner {
    /// Scripts running at once; further events are logged and skipped (a flapping link must not
    /// fork without bound).
    static let runningMax = 8
    static let deadlineNanos: UInt64 = 60_000_000_000

    private let scripts: [ResourceConfig.HandlerEvent: String]
    private let resource: String
    private let node: String
    private let peer: String
    private let logger: Logger
    private var running: [(pid: pid_t, event: ResourceConfig.HandlerEvent, started: UInt64)] = []

    init(config: ResourceConfig, node: String, peer: String, logger: Logger) {
        scripts = config.handlers
        resource = config.name
        self.node = node
        self.peer = peer
        self.logger = logger
    }

    /// Starts the script for `event`, if the resource names one.
    func fire(_ event: ResourceConfig.HandlerEvent, _ details: [String], nowNanos: UInt64) {
        guard let script = scripts[event] else { return }
        reap(nowNanos: nowNanos)
        guard running.count < Self.runningMax else {
            return logger.warning("handler \(event.rawValue): \(running.count) handlers still running; not starting \(script)")
        }
        let arguments = [script, event.rawValue, resource, node] + details
        let environment = [
            "TANDEM_EVENT=\(event.rawValue)", "TANDEM_RESOURCE=\(resource)", "TANDEM_NODE=\(node)", "TANDEM_PEER=\(peer)",
            "TANDEM_DETAIL=\(details.joined(separator: " "))", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ]
        var pid: pid_t = 0
        let rc = withCStrings(arguments) { argv in
            withCStrings(environment) { envp in
                posix_spawn(&pid, script, nil, nil, argv, envp)
            }
        }
        guard rc == 0 else {
            return logger.error("handler \(event.rawValue): cannot run \(script): \(SystemError.text(rc))")
        }
        logger.info("handler \(event.rawValue): started \(script) (pid \(pid))")
        running.append((pid, event, nowNanos))
    }

    /// Collects finished scripts and kills those past the deadline; call it now and then.
    func reap(nowNanos: UInt64) {
        var i = 0
        while i < running.count {
            let entry = running[i]
            var status: Int32 = 0
            let rc = waitpid(entry.pid, &status, WNOHANG)
            if rc == entry.pid || (rc < 0 && errno == ECHILD) {
                running.remove(at: i)
                let exited = status & 0x7F == 0
                let code = (status >> 8) & 0xFF
                if rc < 0 {
                    logger.warning("handler \(entry.event.rawValue): pid \(entry.pid) was reaped elsewhere")
                } else if exited && code == 0 {
                    logger.info("handler \(entry.event.rawValue): done")
                } else if exited {
                    logger.warning("handler \(entry.event.rawValue): exited with status \(code)")
                } else {
                    logger.warning("handler \(entry.event.rawValue): killed by signal \(status & 0x7F)")
                }
                continue
            }
            if nowNanos - entry.started > Self.deadlineNanos {
                logger.warning("handler \(entry.event.rawValue): still running after \(Self.deadlineNanos / 1_000_000_000) s: killing pid \(entry.pid)")
                kill(entry.pid, SIGKILL)
            }
            i += 1
        }
    }

    var runningCount: Int { running.count }
}

/// Calls `body` with a NULL-terminated C array of copies of `strings`.
private func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
    let pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) } + [nil]
    defer { for p in pointers { free(p) } }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}
