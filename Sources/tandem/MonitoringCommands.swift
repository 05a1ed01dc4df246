import ArgumentParser
import Foundation
import Glibc
import TandemCore
import TandemIO
import TandemNode

// Commands for people and programs watching a running node: `tandem check` (a Nagios probe) and
// `tandem wait-sync`, and the progress shared with `verify --wait`, `diff` and `apply`. They read
// `tandem status --json` (Protocol/status.md).

/// Whether long operations draw progress on stderr.
struct ProgressOptions: ParsableArguments {
    @Flag(help: "No progress on stderr (by default: a bar on a terminal, a line every 5% otherwise).")
    var noProgress = false

    func reporter(label: String) -> ProgressReporter? {
        noProgress ? nil : ProgressReporter(label: label)
    }
}

/// A node's `status` answer, parsed.
struct NodeStatus {
    let object: [String: Any]

    init?(_ answer: String) {
        guard let data = answer.data(using: .utf8),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              object["error"] == nil, object["role"] is String
        else { return nil }
        self.object = object
    }

    var role: String { object["role"] as? String ?? "?" }
    var disk: String { object["disk"] as? String ?? "?" }
    var splitBrain: Bool { object["split_brain"] as? Bool ?? false }
    /// nil without a witness.
    var quorum: Bool? { object["quorum"] as? Bool }
    var peer: [String: Any] { object["peer"] as? [String: Any] ?? [:] }
    var peerName: String { peer["node"] as? String ?? "peer" }
    var connection: String { peer["connection"] as? String ?? "?" }
    var peerRole: String? { peer["role"] as? String }
    var peerDisk: String? { peer["disk"] as? String }
    var replication: String { peer["replication"] as? String ?? "Off" }
    var outOfSyncBytes: UInt64 { Self.number(peer["out_of_sync_bytes"]) }
    var resyncDoneBytes: UInt64 { Self.number(peer["resync_done_bytes"]) }
    var verify: [String: Any] { object["verify"] as? [String: Any] ?? [:] }
    var verifyRunning: Bool { verify["running"] as? Bool ?? false }
    var verifyCheckedBytes: UInt64 { Self.number(verify["checked_bytes"]) }
    var verifyMismatchedBytes: UInt64 { Self.number(verify["mismatched_bytes"]) }
    var verifyUnreadableBytes: UInt64 { Self.number(verify["unreadable_bytes"]) }
    var verifyTotalBytes: UInt64 { Self.number(verify["total_bytes"]) }
    var resyncing: Bool { connection == "Connected" && (replication == "SyncSource" || replication == "SyncTarget") }
    var inSync: Bool { connection == "Connected" && replication == "Established" && outOfSyncBytes == 0 }

    static func number(_ value: Any?) -> UInt64 {
        (value as? NSNumber).map { $0.uint64Value } ?? 0
    }
}

extension RunningNode {
    /// The node's parsed status; a node that is not running or answers nonsense is one
    /// `error:` line.
    func status() throws -> NodeStatus {
        let answer = try ask("status")
        guard let status = NodeStatus(answer) else { throw fail("unreadable status from \(node): \(answer.prefix(200))") }
        return status
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A monitoring probe (Nagios/Icinga/Sensu plugin): one line and exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
        discussion: """
            Asks the running node and prints one line, TANDEM STATE: what | perfdata:
              TANDEM OK: r0 alpha Primary/UpToDate, beta Connected Secondary/UpToDate
              Established | out_of_sync=0B;;;0 resync_done=0B;;;0 ...

            The state is the worst rule that applies:
              CRITICAL (2)  split brain; the link is StandAlone (down until
                            'tandem connect'); a primary whose own disk is not
                            UpToDate (Failed, Inconsistent, Outdated); no quorum
                            (with a witness: neither peer nor witness reachable);
                            a witness that sees neither data node.
              WARNING (1)   a resync runs (its progress is in the line); the peer
                            is not connected (a primary serving alone, or a
                            secondary without its primary); a secondary's disk or
                            the peer's disk is not UpToDate; blocks out of sync;
                            the last verify found blocks that differ; a witness
                            that sees one data node only.
              OK (0)        connected, replication established, both disks
                            UpToDate, nothing out of sync.
              UNKNOWN (3)   the node is not running, its answer is unreadable, or
                            the resource file or node name is wrong.

            Examples:
              tandem check /etc/tandem/r0.toml --node alpha
              tandem check r0.toml --node gamma      # a witness: sees both nodes?
              # Nagios command definition:
              #   command_line /usr/local/bin/tandem check /etc/tandem/$ARG1$.toml
              #                --node $ARG2$
            """)

    @Argument(help: "The resource file.")
    var file: String

    @Option(help: "The node to ask.")
    var node: String

    @Option(help: "Seconds to wait for the node's answer.")
    var timeout: Int = 10

    enum State: Int32, Comparable {
        case ok = 0, warning = 1, critical = 2, unknown = 3
        var name: String { ["OK", "WARNING", "CRITICAL", "UNKNOWN"][Int(rawValue)] }
        static func < (a: State, b: State) -> Bool { a.rawValue < b.rawValue }
    }

    func run() throws {
        let (state, line) = probe()
        print("TANDEM \(state.name): \(line)")
        if state != .ok { throw ExitCode(state.rawValue) }
    }

    /// Never throws: every failure is UNKNOWN with its reason.
    func probe() -> (State, String) {
        let config: ResourceConfig
        do {
            let text = try readTextFile(file, maxBytes: Limits.tomlFileBytesMax)
            switch ResourceConfig.parse(text, path: file) {
            case .success(let parsed): config = parsed
            case .failure(let errors): return (.unknown, "\(errors.errors[0].description) (tandem config check \(file))")
            }
        } catch {
            return (.unknown, error.description)
        }
        guard let me = config.node(named: node) else {
            return (.unknown, "\(file): no node named '\(node)' (nodes: \(config.nodes.map(\.name).joined(separator: ", ")))")
        }
        guard let answer = ControlClient.request(path: me.controlPath, "status", timeoutSeconds: max(1, timeout)) else {
            return (.unknown, "\(config.name) \(node): not running (no answer on \(me.controlPath))")
        }
        if me.isWitness { return Self.judgeWitness(answer, resource: config.name, node: node) }
        guard let status = NodeStatus(answer) else {
            return (.unknown, "\(config.name) \(node): unreadable answer: \(answer.prefix(120).filter { $0 != "\n" })")
        }
        return Self.judge(status, resource: config.name, node: node)
    }

    static func judge(_ s: NodeStatus, resource: String, node: String) -> (State, String) {
        var state = State.ok
        var reasons: [String] = []
        func raise(_ to: State, _ why: String) {
            state = max(state, to)
            reasons.append(why)
        }
        let connected = s.connection == "Connected"
        if s.splitBrain { raise(.critical, "split brain: resolve with tandem connect --discard-my-data on the node whose changes are dropped") }
        if s.connection == "Standalone" && !s.splitBrain { raise(.critical, "StandAlone: the link stays down until tandem connect") }
        if s.quorum == false { raise(.critical, "no quorum: neither \(s.peerName) nor the witness is reachable") }
        if s.role == "Primary" && s.disk != "UpToDate" {
            raise(.critical, "the primary's own disk is \(s.disk)\(s.disk == "Failed" && connected ? " (served through \(s.peerName))" : "")")
        } else if s.disk != "UpToDate" && !(s.resyncing && s.replication == "SyncTarget") {
            raise(.warning, "local disk \(s.disk)")
        }
        if s.resyncing {
            let total = s.resyncDoneBytes + s.outOfSyncBytes
            let percent = total == 0 ? 100 : s.resyncDoneBytes * 100 / total
            let progress = s.replication == "SyncSource" ? "\(percent)% done, " : ""
            raise(.warning, "resync \(s.replication == "SyncSource" ? "to" : "from") \(s.peerName): \(progress)\(ProgressReporter.size(s.outOfSyncBytes)) left")
        } else if s.connection == "Connecting" || s.connection == "Handshaking" {
            raise(.warning, s.role == "Primary"
                  ? "\(s.peerName) not connected: serving alone, \(ProgressReporter.size(s.outOfSyncBytes)) out of sync"
                  : "\(s.peerName) not connected")
        } else if connected && s.outOfSyncBytes > 0 {
            raise(.warning, "\(ProgressReporter.size(s.outOfSyncBytes)) out of sync")
        }
        if connected, let peerDisk = s.peerDisk, peerDisk != "UpToDate", !(s.resyncing && s.replication == "SyncSource") {
            raise(.warning, "\(s.peerName)'s disk \(peerDisk)")
        }
        if !s.verifyRunning && s.verifyMismatchedBytes > 0 {
            raise(.warning, "the last verify found \(ProgressReporter.size(s.verifyMismatchedBytes)) that differed")
        }
        var summary = "\(resource) \(node) \(s.role)/\(s.disk), \(s.peerName) \(s.connection)"
        if connected { summary += " \(s.peerRole ?? "?")/\(s.peerDisk ?? "DUnknown") \(s.replication)" }
        if !reasons.isEmpty { summary += ": " + reasons.joined(separator: "; ") }
        let perf = "out_of_sync=\(s.outOfSyncBytes)B;;;0 resync_done=\(s.resyncDoneBytes)B;;;0 "
            + "writes_in_flight=\(NodeStatus.number(s.object["writes_in_flight"]));;;0 verify_mismatched=\(s.verifyMismatchedBytes)B;;;0"
        return (state, "\(summary) | \(perf)")
    }

    /// A witness answers `{"role":"Witness","nodes":{"alpha":{"connected":true,...},...}}`.
    static func judgeWitness(_ answer: String, resource: String, node: String) -> (State, String) {
        guard let data = answer.data(using: .utf8),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let nodes = object["nodes"] as? [String: [String: Any]]
        else { return (.unknown, "\(resource) \(node): unreadable answer: \(answer.prefix(120).filter { $0 != "\n" })") }
        let names = nodes.keys.sorted()
        let seen = names.filter { nodes[$0]?["connected"] as? Bool == true }
        let missing = names.filter { !seen.contains($0) }
        let state: State = missing.isEmpty ? .ok : seen.isEmpty ? .critical : .warning
        let roles = names.map { "\($0) \(nodes[$0]?["connected"] as? Bool == true ? "connected" : "not connected")" }
        var line = "\(resource) \(node) Witness: \(roles.joined(separator: ", "))"
        if !missing.isEmpty { line += seen.isEmpty ? ": sees no data node" : ": does not see \(missing.joined(separator: ", "))" }
        return (state, "\(line) | data_nodes_seen=\(seen.count);;;0;\(names.count)")
    }
}

struct WaitSync: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wait-sync",
        abstract: "Wait until a node is connected and in sync with its peer, showing the resync's progress.",
        discussion: """
            Returns 0 once the node's link is Connected, replication Established and nothing is
            out of sync. While a resync runs, its progress goes to stderr: a bar on a terminal,
            a line every 5% otherwise. Fails at once when the node is StandAlone or in split
            brain (nothing will change until an operator acts), and after --timeout seconds.

            Examples:
              tandem wait-sync r0.toml --node alpha
              tandem wait-sync r0.toml --node beta --timeout 3600 && tandem primary r0.toml --node beta
              tandem up r0.toml --node beta & tandem wait-sync r0.toml --node beta --no-progress
            """)

    @OptionGroup var target: RunningNode

    @Option(help: "Give up after this many seconds (0: wait as long as it takes).")
    var timeout: Int = 0

    @OptionGroup var progress: ProgressOptions

    func validate() throws {
        guard timeout >= 0 else { throw ValidationError("--timeout must be 0 or more seconds") }
    }

    func run() throws {
        let started = ProgressReporter.nowNanos()
        let reporter = progress.reporter(label: "resync")
        var noted = ""
        // The resync's size, as the most this node has seen left plus done (the sync target
        // does not count what it received).
        var totalBytes: UInt64 = 0
        while true {
            let s = try target.status()
            // A split brain being resolved (`tandem connect` given, the node connecting again)
            // is waited for: the README's playbook runs wait-sync right after the connects.
            if s.splitBrain && s.connection == "Standalone" {
                throw fail("\(target.node) is in split brain with \(s.peerName): see tandem connect --help")
            }
            if s.connection == "Standalone" { throw fail("\(target.node) is StandAlone: it will not connect until tandem connect") }
            if s.inSync {
                // Nothing to report when it was in sync from the start.
                if totalBytes > 0 { reporter?.update(done: totalBytes, total: totalBytes) }
                reporter?.finish()
                print("\(target.node): in sync with \(s.peerName) (\(s.role)/\(s.disk), \(s.peerName) \(s.peerRole ?? "?")/\(s.peerDisk ?? "?"))")
                return
            }
            if s.resyncing {
                totalBytes = max(totalBytes, s.resyncDoneBytes + s.outOfSyncBytes)
                reporter?.update(done: totalBytes - min(totalBytes, s.outOfSyncBytes), total: totalBytes)
            } else if !progress.noProgress {
                let now = "waiting: \(s.peerName) \(s.connection)\(s.connection == "Connected" ? ", \(s.replication)" : "")"
                if now != noted {
                    printError(now)
                    noted = now
                }
            }
            if timeout > 0 && ProgressReporter.nowNanos() - started > UInt64(timeout) * 1_000_000_000 {
                reporter?.finish()
                throw fail("\(target.node) is not in sync after \(timeout) s (\(s.connection), \(s.replication), \(s.outOfSyncBytes) bytes out of sync)")
            }
            usleep(200_000)
        }
    }
}
