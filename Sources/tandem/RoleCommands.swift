import ArgumentParser
import Foundation
import TandemNode

struct Primary: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Promote a running node to primary: its NBD export becomes writable.",
        discussion: """
            Refused while the peer is primary, while a resync into this node runs, and unless the
            local disk is UpToDate. --force promotes an Outdated or Inconsistent disk anyway: the
            node's data becomes the truth, and writes the peer had that this node lacks are lost
            (or, if the peer also writes, end in a split brain that must be resolved by hand).
            Without the peer connected, the node's first write starts a new data generation, so
            the peer resyncs from it later (a node promoted alone that writes nothing keeps the
            peer's generation); --force on a disk that is not UpToDate starts one at once.

            Examples:
              tandem primary r0.toml --node beta
              tandem primary r0.toml --node beta --force
            """)

    @OptionGroup var target: RunningNode

    @Flag(help: "Promote even if the local disk is not UpToDate (risks losing the peer's newer writes).")
    var force = false

    func run() throws {
        let micros = try target.command(force ? "primary force" : "primary")["micros"] as? Int
        print("\(target.node) is primary\(micros.map { " (promoted in \($0) µs)" } ?? " (already)")")
    }
}

struct Secondary: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Demote a running primary to secondary: NBD clients are closed cleanly, both sides flushed.",
        discussion: """
            New NBD requests are answered ESHUTDOWN, requests in flight finish, the clients are
            disconnected, both nodes flush, then the export becomes read-only. A planned
            switchover is 'tandem secondary' on the primary, then 'tandem primary' on the other.

            Examples:
              tandem secondary r0.toml --node alpha
            """)

    @OptionGroup var target: RunningNode

    func run() throws {
        let micros = try target.command("secondary", timeoutSeconds: 60)["micros"] as? Int
        print("\(target.node) is secondary\(micros.map { " (demoted in \($0) µs)" } ?? " (already)")")
    }
}

struct Connect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Connect a StandAlone node to its peer again (after a split brain or 'tandem disconnect').",
        discussion: """
            After a split brain both nodes are StandAlone. Decide which node's changes since the
            split are thrown away; run 'tandem connect --discard-my-data' there (it must be
            secondary) and 'tandem connect' on the other. The discarding node becomes sync
            target and receives only the blocks either side changed since the split (the whole
            device when the split is older than both bitmaps).

            Examples:
              tandem connect r0.toml --node beta --discard-my-data
              tandem connect r0.toml --node alpha
            """)

    @OptionGroup var target: RunningNode

    @Flag(name: .customLong("discard-my-data"), help: "On a split brain, overwrite this node's changes with the peer's.")
    var discardMyData = false

    func run() throws {
        try target.command(discardMyData ? "connect discard-my-data" : "connect")
        print("\(target.node): connecting\(discardMyData ? "; its changes will be discarded if a split brain is found" : "")")
    }
}

struct Disconnect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take a node's replication link down on purpose; it stays StandAlone until 'tandem connect'.",
        discussion: """
            A primary that disconnects tells its peer, which marks its own disk Outdated (it will
            miss the writes that follow) and refuses promotion without --force. The primary
            records what it writes meanwhile in its bitmap and resyncs it after 'tandem connect'.

            Examples:
              tandem disconnect r0.toml --node alpha
            """)

    @OptionGroup var target: RunningNode

    func run() throws {
        try target.command("disconnect")
        print("\(target.node): disconnected (StandAlone)")
    }
}

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stream a running node's state changes as JSON lines (like drbdsetup events2).",
        discussion: """
            The first line ("type":"exists") is the state now; then one line per change, each
            {"time":UNIX_MS,"resource","node","type",...}. Types: state (role, disk, connection,
            peer_role, peer_disk, replication, out_of_sync_bytes, split_brain), role, peer-lost,
            split-brain, resync-start, resync-progress (every second), resync-done,
            barrier-created, barrier-recorded, quorum-lost, quorum-regained. Runs until the node
            stops or --count lines were printed. The schema is in Protocol/status.md.

            Examples:
              tandem events r0.toml --node alpha
              tandem events r0.toml --node alpha | jq -c 'select(.type == "role")'
            """)

    @OptionGroup var target: RunningNode

    @Option(help: "Stop after this many lines (default: run until the node stops).")
    var count: Int?

    func run() throws {
        let config = try loadResource(target.file)
        guard let me = config.node(named: target.node) else { throw fail("\(target.file): no node named '\(target.node)'") }
        var printed = 0
        let answered = ControlClient.stream(path: me.controlPath, "events") { line in
            // Unbuffered: a reader (a pipe, a monitoring agent) sees each line at once.
            let bytes = Array((line + "\n").utf8)
            _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
            printed += 1
            return count.map { printed < $0 } ?? true
        }
        guard answered else { throw fail("node \(target.node) is not running (no answer on \(me.controlPath))") }
    }
}
