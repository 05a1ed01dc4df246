import ArgumentParser
import Foundation
import CTandem
import Glibc
import TandemCore
import TandemIO
import TandemNode

/// Reads and validates a resource file; every problem becomes one `path:line: message (fix: ...)`
/// line and the command fails.
func loadResource(_ path: String) throws -> ResourceConfig {
    let text: String
    do {
        text = try readTextFile(path, maxBytes: Limits.tomlFileBytesMax)
    } catch {
        throw fail(error.description)
    }
    switch ResourceConfig.parse(text, path: path) {
    case .success(let config):
        return config
    case .failure(let errors):
        for e in errors.errors.dropLast() { printError("error: \(e.description)") }
        throw fail(errors.errors.last!.description)
    }
}

func printError(_ line: String) {
    var text = line + "\n"
    text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

func fileExists(_ path: String) -> Bool { access(path, F_OK) == 0 }
func fileReadable(_ path: String) -> Bool { access(path, R_OK) == 0 }

/// The size of a regular file or block device; nil when it is missing, unreadable or neither.
func deviceSize(_ path: String) -> UInt64? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { return nil }
    switch st.st_mode & S_IFMT {
    case S_IFREG: return UInt64(st.st_size)
    case S_IFBLK:
        let bytes = ctandem_blockdev_size(fd)
        return bytes >= 0 ? UInt64(bytes) : nil
    default: return nil
    }
}

/// The device size a metadata file records; nil when there is none or it cannot be read.
func recordedDeviceSize(_ path: String) -> UInt64? {
    guard fileExists(path) else { return nil }
    return try? MetadataFile.load(path: path, deviceBytes: nil).superblock.deviceBytes
}

struct Config: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Work with resource files.",
        discussion: """
            Examples:
              tandem config check /etc/tandem/r0.toml
              tandem config check /etc/tandem/r0.toml --node alpha
            """,
        subcommands: [Check.self])

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate a resource file: syntax, keys, types, ranges, duplicates, and (with --node) the node's files and sizes.",
            discussion: """
                Every problem is reported as FILE:LINE: message (fix: ...); the exit status is 0 when
                the file is valid, 1 otherwise.

                Without --node: syntax, unknown keys (with the key meant), types, ranges, missing
                keys, duplicate names, ids and addresses, and listeners, sockets or files two nodes
                on one host would share. With --node, what that node needs on this host: the CA,
                its certificate and key, its device, the directories of its metadata and control
                socket, handler scripts; its device size (whole 4 KiB blocks, within the bitmap's
                reach, the size its metadata was made for); and, when both data nodes run on this
                host, that their devices are the same size.

                Examples:
                  tandem config check /etc/tandem/r0.toml
                  tandem config check /etc/tandem/r0.toml --node alpha
                """)

        @Argument(help: "The resource file.")
        var file: String

        @Option(help: "Also check that this node's device, TLS files and directories exist.")
        var node: String?

        func run() throws {
            let config = try loadResource(file)
            if let node {
                guard config.node(named: node) != nil else { throw fail("\(file): no node named '\(node)' (nodes: \(config.nodes.map(\.name).joined(separator: ", ")))") }
                let problems = (config.checkFiles(forNode: node, fileExists: fileExists, fileReadable: fileReadable)
                    + config.checkSizes(forNode: node, deviceBytes: deviceSize, recordedDeviceBytes: recordedDeviceSize))
                    .enumerated().sorted { ($0.element.line, $0.offset) < ($1.element.line, $1.offset) }.map(\.element)
                if !problems.isEmpty {
                    for p in problems.dropLast() { printError("error: \(p.description)") }
                    throw fail(problems.last!.description)
                }
            }
            print("\(file): resource \(config.name), nodes \(config.nodes.map { "\($0.name) (id \($0.id)\($0.isWitness ? ", witness" : ""))" }.joined(separator: ", ")): valid")
        }
    }
}

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a node's metadata (superblock, activity log, dirty bitmap), like drbdadm create-md.",
        discussion: """
            The metadata file named in the resource file is created for this node's device. With
            --zeroed (or when the device is a file with no data at all), the metadata records a new,
            zeroed device: if the peer's is too, the first connection skips the initial full sync.

            Examples:
              tandem init /etc/tandem/r0.toml --node alpha
              tandem init r0.toml --node beta --zeroed
            """)

    @Argument(help: "The resource file.")
    var file: String

    @Option(help: "The node to initialise (its device and metadata paths come from the file).")
    var node: String

    @Flag(help: "The device is known to be all zeros (new): the initial sync may be skipped.")
    var zeroed = false

    @Flag(help: "Overwrite existing metadata (its bitmap and generation history are lost).")
    var force = false

    func run() throws {
        let config = try loadResource(file)
        guard let me = config.node(named: node) else { throw fail("\(file): no node named '\(node)'") }
        guard let devicePath = me.devicePath, let metadataPath = me.metadataPath else {
            throw fail("node '\(node)' is a witness: it keeps no data and needs no metadata")
        }
        let device: BackingDevice
        do {
            device = try BackingDevice.open(path: devicePath, readOnly: true, cache: .page)
        } catch {
            throw fail(error.message)
        }
        let empty = !device.isBlockDevice && ctandem_seek_data(device.fd, 0) == -Int64(ENXIO)
        var flags: Superblock.Flags = []
        // A zeroed device is a consistent image already; other data is Inconsistent until an
        // initial sync (or a primary that is told its data wins).
        if zeroed || empty { flags.formUnion([.newZeroed, .consistent]) }
        let superblock: Superblock
        do {
            superblock = try Superblock(
                resourceName: config.name, nodeID: UInt8(me.id), deviceBytes: device.size, flags: flags,
                bitmapGranularityBytes: config.tuning.bitmapGranularityBytes,
                activityLogExtentBytes: config.tuning.activityLogExtentBytes,
                activityLogExtents: config.tuning.activityLogExtents,
                createdUnixSeconds: Int64(time(nil)))
        } catch {
            throw fail("cannot lay out metadata for \(devicePath): \(error)")
        }
        do {
            try MetadataFile.create(path: metadataPath, superblock: superblock, force: force)
        } catch {
            throw fail(error.message)
        }
        print("initialised \(metadataPath): resource \(config.name), node \(node) (id \(me.id)), device \(device.size) bytes, \(superblock.layout.totalBytes) bytes of metadata\(flags.contains(.newZeroed) ? ", new and zeroed" : "")")
    }
}

struct DumpMetadata: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump-metadata",
        abstract: "Print a metadata file: superblock, generation UUIDs, flags, out-of-sync bytes, activity log.",
        discussion: """
            Examples:
              tandem dump-metadata /var/lib/tandem/alpha.meta
              tandem dump-metadata /var/lib/tandem/alpha.meta --json
            """)

    @Argument(help: "The metadata file.")
    var path: String

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let loaded: MetadataFile.Loaded
        do {
            loaded = try MetadataFile.load(path: path, deviceBytes: nil)
        } catch {
            throw fail(error.message)
        }
        let sb = loaded.superblock
        let hex = { (v: UInt64) in "0x" + String(v, radix: 16) }
        var flagNames: [String] = []
        let known: [(Superblock.Flags, String)] = [(.consistent, "consistent"), (.outdated, "outdated"), (.wasPrimary, "was-primary"), (.newZeroed, "new-zeroed"), (.resyncTarget, "resync-target"), (.crashedPrimary, "crashed-primary")]
        for (flag, name) in known where sb.flags.contains(flag) { flagNames.append(name) }
        if json {
            print("""
                {"resource":"\(sb.resourceName)","node_id":\(sb.nodeID),"device_bytes":\(sb.layout.deviceBytes),"sequence":\(sb.sequence),\
                "uuids":{"current":"\(hex(sb.uuids.current))","bitmap":"\(hex(sb.uuids.bitmap))","history":["\(hex(sb.uuids.history0))","\(hex(sb.uuids.history1))"]},\
                "flags":[\(flagNames.map { "\"\($0)\"" }.joined(separator: ","))],"bitmap_granularity_bytes":\(sb.layout.granularityBytes),\
                "out_of_sync_bytes":\(loaded.bitmap.outOfSyncBytes),"activity_log":{"extents":\(sb.activityLogExtents),"extent_bytes":\(sb.activityLogExtentBytes),\
                "hot_extents":\(loaded.recovery.hotExtents.count),"complete":\(loaded.recovery.isComplete)}}
                """)
        } else {
            print("""
                resource \(sb.resourceName), node id \(sb.nodeID), device \(sb.layout.deviceBytes) bytes (superblock sequence \(sb.sequence))
                uuids: current \(hex(sb.uuids.current)), bitmap \(hex(sb.uuids.bitmap)), history \(hex(sb.uuids.history0)) \(hex(sb.uuids.history1))
                flags: \(flagNames.isEmpty ? "none" : flagNames.joined(separator: ", "))
                bitmap: \(sb.layout.granularityBytes)-byte granules, \(loaded.bitmap.outOfSyncBytes) bytes out of sync
                activity log: \(sb.activityLogExtents) extents of \(sb.activityLogExtentBytes) bytes, \(loaded.recovery.hotExtents.count) hot at the last transaction
                """)
        }
    }
}

struct Up: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one node of a replicated resource.",
        discussion: """
            The primary exports the device over NBD (the node's nbd address, export name = the
            resource name) and mirrors every write to the secondary over mutually authenticated
            TLS 1.3 (protocol C: a write is answered once it is on both disks). The secondary
            applies the primary's writes. After a disconnect, only out-of-sync blocks are resynced.

            Examples:
              tandem up r0.toml --node alpha --primary
              tandem up r0.toml --node beta
            """)

    @Argument(help: "The resource file.")
    var file: String

    @Option(help: "This node's name in the resource file.")
    var node: String

    @Flag(help: "Start as primary (export over NBD); otherwise secondary.")
    var primary = false

    @OptionGroup var io: IOOptions

    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let config = try loadResource(file)
        let logger = logging.makeLogger()
        var options = TandemNode.Up.Options(
            resourceFile: file, config: config, node: node, primary: primary, engine: io.engine,
            cache: io.cache, faults: io.faults)
        options.pollMicros = io.pollMicros
        do {
            try TandemNode.Up.run(options, logger: logger)
        } catch {
            throw fail(error.message)
        }
    }
}

/// A running node to talk to through its control socket: shared by `status` and `verify`.
struct RunningNode: ParsableArguments {
    @Argument(help: "The resource file.")
    var file: String

    @Option(help: "The node to ask.")
    var node: String

    /// Sends one control request; a node that does not answer is a clear error.
    func ask(_ request: String, timeoutSeconds: Int = 5) throws -> String {
        let config = try loadResource(file)
        guard let me = config.node(named: node) else { throw fail("\(file): no node named '\(node)'") }
        guard let answer = ControlClient.request(path: me.controlPath, request, timeoutSeconds: timeoutSeconds) else {
            throw fail("node \(node) is not running (no answer on \(me.controlPath))")
        }
        return answer
    }

    /// A request whose answer is one JSON object: the object, or a failure that says what the
    /// node refused (`{"error": ...}`), as one `error:` line.
    @discardableResult
    func command(_ request: String, timeoutSeconds: Int = 30) throws -> [String: Any] {
        let answer = try ask(request, timeoutSeconds: timeoutSeconds)
        guard let data = answer.data(using: .utf8), let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw fail("\(node): unreadable answer: \(answer.prefix(200))")
        }
        if let why = object["error"] as? String { throw fail("\(node): \(why)") }
        return object
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a node's replication state (role, disks, connection, out-of-sync bytes).",
        discussion: """
            Asks the running node through its control socket (the resource file names it).
            Without --json, a few lines in the manner of drbdadm status:
              r0 role:Primary
                disk:UpToDate
                beta connection:Connected role:Secondary
                  peer-disk:UpToDate replication:Established
            --json prints one JSON object whose fields are documented, with their types and
            values, in Protocol/status.md (stable: fields are added, never renamed or removed):
            resource, node, role, disk, split_brain, role_conflict, quorum, peer {node,
            connection, role, disk, replication, out_of_sync_bytes, resync_done_bytes},
            writes_in_flight, transfer_log_entries, verify {running, checked_bytes,
            mismatched_bytes, unreadable_bytes, total_bytes}.
            States use DRBD's names (UpToDate, Inconsistent, SyncSource...). A witness answers
            {resource, node, role: "Witness", nodes {NAME: {connected, known, role, disk,
            writes_without_peer}}}.

            Examples:
              tandem status r0.toml --node alpha
              tandem status r0.toml --node beta --json
            """)

    @OptionGroup var target: RunningNode

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let answer = try target.ask(json ? "status" : "status text")
        print(answer, terminator: answer.hasSuffix("\n") ? "" : "\n")
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare every block of the pair online; blocks that differ are marked out of sync and resynced.",
        discussion: """
            Runs on the primary while the pair serves: both nodes read their copy and compare a
            CRC-32C per 4 KiB block. Client writes to the few MiB being compared wait for it,
            so data changing under the pass is not reported as a difference; a range whose read
            fails on either side is reported as unreadable, not as differing. Progress and the
            result show in `tandem status`; with
            --wait, progress goes to stderr (a bar on a terminal, a line every 5% otherwise) and
            the result to stdout.

            Examples:
              tandem verify r0.toml --node alpha
              tandem verify r0.toml --node alpha --wait
              tandem verify r0.toml --node alpha --wait --no-progress && tandem wait-sync r0.toml --node alpha
            """)

    @OptionGroup var target: RunningNode

    @Flag(help: "Wait for the pass to end and print its result.")
    var wait = false

    @OptionGroup var progress: ProgressOptions

    func run() throws {
        try target.command("verify")
        guard wait else { return print("verify started on \(target.node); see tandem status") }
        let reporter = progress.reporter(label: "verify")
        while true {
            usleep(200_000)
            let status = try target.status()
            reporter?.update(done: status.verifyCheckedBytes + status.verifyUnreadableBytes, total: status.verifyTotalBytes)
            if !status.verifyRunning {
                reporter?.finish()
                let unreadable = status.verifyUnreadableBytes
                print("verify finished: \(status.verifyCheckedBytes) bytes checked, \(status.verifyMismatchedBytes) bytes differ\(unreadable > 0 ? ", \(unreadable) bytes unreadable (see the node's log)" : "")")
                return
            }
        }
    }
}
