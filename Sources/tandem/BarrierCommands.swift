import ArgumentParser
import Foundation
import Glibc
import TandemCore
import TandemIO
import TandemNode

// Point-in-time barriers (Protocol/barriers.md). With a resource file and --node the commands ask
// the running node through its control socket; with --undo-dir (and --device) they work on a
// secondary's undo directory and device while no node runs on them.

/// The undo directory and device of an offline secondary.
struct UndoStoreOptions: ParsableArguments {
    @Option(help: "Offline: the undo directory (one segment file per barrier).")
    var undoDir: String?

    @Option(help: "Offline: the device (file or block device) the undo directory protects.")
    var device: String?

    /// Opens the device (page cache) and the store, printing what recovery did.
    func open(readOnly: Bool, chunkBytes: Int? = nil) throws -> (BackingDevice, UndoStore) {
        guard let undoDir, let device else { throw fail("give a resource file and --node (a running node), or --undo-dir and --device (offline)") }
        let backing: BackingDevice
        do {
            backing = try BackingDevice.open(path: device, readOnly: readOnly, cache: .page)
        } catch {
            throw fail(error.message)
        }
        do {
            let store = try UndoStore(directory: undoDir, deviceBytes: backing.size, chunkBytes: chunkBytes, readOnly: readOnly)
            for line in store.recoveryLog { printError("note: \(line)") }
            if !readOnly, let pending = store.pendingRollback {
                printError("note: a rollback to barrier \(pending) did not finish; run tandem rollback \(pending) first")
            }
            return (backing, store)
        } catch {
            throw fail("\(error)")
        }
    }
}

func unixNow() -> Int64 { Int64(time(nil)) }

func readDevice(_ device: BackingDevice) -> (UInt64, UnsafeMutableRawBufferPointer) throws -> Void {
    { offset, buffer in try BlockFile.read(device.fd, into: buffer, at: offset, device.path) }
}

func logDrops(_ dropped: [(BarrierInfo, BarrierRetention.Reason)]) {
    for (barrier, reason) in dropped { printError("note: dropped barrier \(barrier.id) (\(reason.rawValue))") }
}

/// The running node a barrier command asks, when a resource file is given.
struct OptionalNode: ParsableArguments {
    @Argument(help: "The resource file (ask the running node); omit for the offline form.")
    var file: String?

    @Option(help: "The node to ask.")
    var node: String?

    var online: Bool { file != nil }

    /// The running node, when a resource file is given.
    var running: RunningNode {
        get throws {
            guard let file, let node else { throw fail("--node is required with a resource file") }
            var target = RunningNode()
            target.file = file
            target.node = node
            return target
        }
    }

    /// The node's answer as JSON text, or its refusal as one `error:` line.
    func ask(_ request: String, timeoutSeconds: Int = 30) throws -> String {
        let object = try running.command(request, timeoutSeconds: timeoutSeconds)
        return String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
    }
}

struct Barrier: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Point-in-time barriers: create on the primary, list, export read-only, roll back.",
        discussion: """
            Barriers need undo = "DIR" in each [[node]] of the resource file; the secondary keeps
            them (Protocol/barriers.md). Rolling back is 'tandem rollback'; incremental backups
            between barriers are 'tandem diff' and 'tandem apply'.

            Examples:
              tandem barrier create r0.toml --node alpha --label before-upgrade
              tandem barrier list r0.toml --node beta
              tandem barrier export r0.toml --node beta 1764000000000 --listen 127.0.0.1:10900
              tandem barrier unexport r0.toml --node beta 1764000000000
            """,
        subcommands: [List.self, Create.self, Export.self, Unexport.self, Write.self, Torture.self])

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Export the device as it was at a barrier, read-only over NBD, while replication goes on.",
            discussion: """
                Runs on the node that keeps the barrier (the secondary). The export is named
                RESOURCE@ID; look inside before rolling back, e.g. with nbdfuse and fsck -n.

                Examples:
                  tandem barrier export r0.toml --node beta 1764000000000 --listen 127.0.0.1:10900
                  nbdinfo nbd://127.0.0.1:10900/r0@1764000000000
                """)

        @OptionGroup var target: RunningNode

        @Argument(help: "The barrier id (tandem barrier list).")
        var id: UInt64

        @Option(help: "Where the export listens, HOST:PORT.")
        var listen: String

        func run() throws {
            let answer = try target.command("barrier export \(id) \(listen)")
            print("barrier \(id) exported read-only as nbd://\(answer["address"] ?? "?")/\(answer["export"] ?? "?")")
        }
    }

    struct Unexport: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop a barrier's read-only export.",
            discussion: """
                Examples:
                  tandem barrier unexport r0.toml --node beta 1764000000000
                """)

        @OptionGroup var target: RunningNode

        @Argument(help: "The barrier id.")
        var id: UInt64

        func run() throws {
            try target.command("barrier unexport \(id)")
            print("barrier \(id) no longer exported")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the retained barriers: id, time, label, bytes held.",
            discussion: """
                On a running node: the secondary answers from its undo store (bytes held per
                barrier); the primary lists the barriers it created and names the node keeping them.

                Examples:
                  tandem barrier list r0.toml --node beta
                  tandem barrier list r0.toml --node beta --json
                  tandem barrier list --undo-dir /var/lib/tandem/r0.undo
                """)

        @OptionGroup var target: OptionalNode

        @Option(help: "Offline: the undo directory.")
        var undoDir: String?

        @Flag(help: "Print JSON: {\"chunk_bytes\":N,\"barriers\":[{\"id\",\"time\",\"label\",\"bytes_held\",\"chunks_saved\"}]}.")
        var json = false

        func run() throws {
            if target.online {
                let answer = try target.ask("barrier list")
                if json { return print(answer) }
                return printBarrierTable(answer)
            }
            guard let undoDir else { throw fail("give a resource file and --node, or --undo-dir") }
            guard access(undoDir, F_OK) == 0 else { throw fail("undo directory \(undoDir) does not exist") }
            guard let deviceBytes = UndoStore.recordedDeviceBytes(directory: undoDir) else {
                print(json ? "{\"chunk_bytes\":null,\"barriers\":[]}" : "no barriers")
                return
            }
            let store: UndoStore
            do { store = try UndoStore(directory: undoDir, deviceBytes: deviceBytes, readOnly: true) } catch { throw fail("\(error)") }
            for line in store.recoveryLog { printError("note: \(line) (read-only: not repaired)") }
            let rows = store.barriers
            if json {
                let items = rows.map { row in
                    "{\"id\":\(row.info.id),\"time\":\(row.info.createdUnixSeconds),\"label\":\(jsonString(row.info.label)),\"bytes_held\":\(row.bytesHeld),\"chunks_saved\":\(store.index.recordCount(row.info.id)!)}"
                }
                print("{\"chunk_bytes\":\(store.geometry.chunkBytes),\"barriers\":[\(items.joined(separator: ","))]}")
            } else if rows.isEmpty {
                print("no barriers")
            } else {
                for row in rows {
                    print("\(row.info.id)\t\(row.info.createdUnixSeconds)\t\(row.bytesHeld) bytes\t\(row.info.label)")
                }
            }
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Record a barrier in an offline undo store (a running node records the primary's).",
            discussion: """
                On a running primary the barrier travels in order in the replication stream:
                every write answered before it is in its image, none after.

                Examples:
                  tandem barrier create r0.toml --node alpha --label before-upgrade
                  tandem barrier create --undo-dir r0.undo --device disk.img --label before-upgrade
                """)

        @OptionGroup var target: OptionalNode

        @OptionGroup var store: UndoStoreOptions

        @Option(help: "Label, up to 64 bytes of UTF-8.")
        var label: String = ""

        @Option(help: "Barrier id (default: one more than the newest).")
        var id: UInt64?

        @Option(help: "Chunk size in bytes for a new store (a power of two, 4096...1048576).")
        var chunkBytes: Int?

        func validate() throws {
            do { try BarrierInfo.checkLabel(label) } catch { throw ValidationError("--label: \(error)") }
            if id == 0 { throw ValidationError("--id must be at least 1") }
        }

        func run() throws {
            if target.online {
                let id = try target.running.command("barrier create \(label)")["id"] ?? "?"
                return print("barrier \(id)")
            }
            let (_, undo) = try store.open(readOnly: false, chunkBytes: chunkBytes)
            let info = BarrierInfo(id: id ?? undo.index.newestID + 1, createdUnixSeconds: unixNow(), label: label)
            do {
                logDrops(try undo.createBarrier(info, nowUnixSeconds: info.createdUnixSeconds))
            } catch {
                throw fail("\(error)")
            }
            print("barrier \(info.id)")
        }
    }

    /// Writes to the device through the undo store, as a secondary applies a replicated write:
    /// for tests and for repairing an image offline without losing the barriers.
    struct Write: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a file's bytes to the device at an offset, saving what barriers need first.",
            shouldDisplay: false)

        @OptionGroup var store: UndoStoreOptions

        @Option(help: "Byte offset on the device.")
        var offset: UInt64

        @Option(help: "The file whose bytes are written.")
        var input: String

        func run() throws {
            let (device, undo) = try store.open(readOnly: false)
            let fd = open(input, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw fail("cannot open \(input): \(SystemError.text(errno))") }
            defer { close(fd) }
            var st = stat()
            fstat(fd, &st)
            let length = UInt64(st.st_size)
            guard offset <= device.size, length <= device.size - offset else {
                throw fail("\(length) bytes at \(offset) run past the end of the \(device.size)-byte device")
            }
            var bytes = [UInt8](repeating: 0, count: Int(length))
            do {
                try bytes.withUnsafeMutableBytes { try BlockFile.read(fd, into: $0, at: 0, input) }
                logDrops(try undo.save(offset: offset, length: length, nowUnixSeconds: unixNow(), readDevice: readDevice(device)))
                try bytes.withUnsafeBytes { try BlockFile.write(device.fd, $0, at: offset, device.path) }
                guard fsync(device.fd) == 0 else { throw UndoStoreError("cannot sync \(device.path): \(SystemError.text(errno))") }
            } catch {
                throw fail("\(error)")
            }
        }
    }

    /// Random writes and barriers until killed, for crash tests: after each barrier, a copy of the
    /// device (the expected image) goes to --oracle-dir/<id>.img and `barrier <id>` is printed.
    struct Torture: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write randomly through the undo store with barriers (crash tests).",
            shouldDisplay: false)

        @OptionGroup var store: UndoStoreOptions

        @Option(help: "Directory for the expected image at each barrier.")
        var oracleDir: String

        @Option(help: "Seed of the writes.")
        var seed: UInt64 = 1

        @Option(help: "Writes between barriers.")
        var barrierEvery: Int = 20

        @Option(help: "Writes in all (0: until killed).")
        var writes: Int = 0

        @Option(help: "Barriers kept (retention by count).")
        var keep: Int = 6

        @Option(help: "Bytes the undo store may hold (retention by space).")
        var bytesMax: UInt64?

        func run() throws {
            let (device, undo) = try store.open(readOnly: false, chunkBytes: 16384)
            undo.retention = BarrierRetention(countMax: keep, bytesMax: bytesMax)
            var rng = SplitMix64(seed: seed)
            var image = [UInt8](repeating: 0, count: Int(device.size))
            var buffer = [UInt8](repeating: 0, count: 3 * undo.geometry.chunkBytes)
            var count = 0
            do {
                while writes == 0 || count < writes {
                    count += 1
                    let offset = UInt64(rng.below(Int(device.size)))
                    let length = 1 + rng.below(min(buffer.count, Int(device.size - offset)))
                    let fill = UInt64(rng.next())
                    for i in 0..<length { buffer[i] = UInt8(truncatingIfNeeded: fill >> UInt64(8 * (i % 8)) &+ UInt64(i / 8)) }
                    logDrops(try undo.save(offset: offset, length: UInt64(length), nowUnixSeconds: unixNow(), readDevice: readDevice(device)))
                    try buffer.withUnsafeBytes { try BlockFile.write(device.fd, UnsafeRawBufferPointer(rebasing: $0[0..<length]), at: offset, device.path) }
                    if count % barrierEvery == 0 {
                        let id = undo.index.newestID + 1
                        logDrops(try undo.createBarrier(BarrierInfo(id: id, createdUnixSeconds: unixNow(), label: "t\(id)"), nowUnixSeconds: unixNow()))
                        try image.withUnsafeMutableBytes { try BlockFile.read(device.fd, into: $0, at: 0, device.path) }
                        let path = "\(oracleDir)/\(id).img"
                        let fd = open(path + ".tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                        guard fd >= 0 else { throw UndoStoreError("cannot create \(path).tmp: \(SystemError.text(errno))") }
                        try image.withUnsafeBytes { try BlockFile.write(fd, $0, at: 0, path) }
                        close(fd)
                        rename(path + ".tmp", path)
                        // Unbuffered: the test reading it may kill this process at any moment.
                        var line = "barrier \(id)\n"
                        line.withUTF8 { _ = Glibc.write(1, $0.baseAddress, $0.count) }
                    }
                }
            } catch {
                throw fail("\(error)")
            }
        }
    }
}

struct Diff: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write an incremental stream between two barriers (like zfs send -i), on a running node or offline.",
        discussion: """
            The stream holds every chunk that differs between the image at FROM and the image at
            TO, with checksums of both; `tandem apply` refuses it on a device that does not hold
            the image at FROM. FROM 0 makes a full stream (every chunk; applies to any device of
            the size).

            With a resource file and --node, the running node that keeps the barriers (the
            secondary) writes the stream to --output (a path on its host) while it goes on
            replicating; a progress bar follows it. TO must be a barrier there.
            Offline, on a stopped secondary's undo directory and device, TO may also be "now":
            the device as it is (nothing may write it meanwhile).

            Examples:
              tandem diff r0.toml --node beta 3 7 --output /backup/3-7.tdiff
              tandem diff r0.toml --node beta 0 7 --output /backup/full-7.tdiff
              tandem diff --undo-dir r0.undo --device disk.img 3 7 --output 3-7.tdiff
              tandem diff --device disk.img 0 now --output full.tdiff
            """)

    @Argument(help: ArgumentHelp("[RESOURCE-FILE] FROM TO: the resource file (a running node), the base barrier id (0: a full stream), the target barrier id (or now, offline).",
                                 valueName: "args"))
    var words: [String] = []

    @Option(help: "The node that keeps the barriers (with a resource file).")
    var node: String?

    @Option(help: "Offline: the undo directory (not needed for FROM 0 and TO now).")
    var undoDir: String?

    @Option(help: "Offline: the device the undo directory protects.")
    var device: String?

    @Option(help: "The stream file to write.")
    var output: String

    @Flag(help: "Replace --output if it exists.")
    var force = false

    @OptionGroup var progress: ProgressOptions

    var online: Bool { words.count == 3 }
    var from: UInt64 { UInt64(words[words.count - 2]) ?? 0 }
    var to: String { words[words.count - 1] }

    func validate() throws {
        guard words.count == 2 || words.count == 3 else { throw ValidationError("give FROM and TO (and the resource file first for a running node)") }
        guard UInt64(words[words.count - 2]) != nil else { throw ValidationError("FROM must be a barrier id or 0, got '\(words[words.count - 2])'") }
        guard to == "now" || UInt64(to) != nil else { throw ValidationError("TO must be a barrier id or now, got '\(to)'") }
        if to != "now", let id = UInt64(to), from != 0, id <= from { throw ValidationError("TO (\(id)) must be newer than FROM (\(from))") }
        if online {
            guard node != nil else { throw ValidationError("--node is required with a resource file") }
            guard undoDir == nil && device == nil else { throw ValidationError("--undo-dir and --device are for the offline form; a running node uses its own") }
            guard to != "now" else { throw ValidationError("a running node diffs to a barrier, not to now (its device changes under the stream): create a barrier and diff to it") }
            guard !output.contains("\n") else { throw ValidationError("--output must not contain a newline") }
        } else {
            guard device != nil else { throw ValidationError("--device is needed offline (or give a resource file and --node)") }
            if undoDir == nil && !(from == 0 && to == "now") { throw ValidationError("--undo-dir is needed unless FROM is 0 and TO is now") }
        }
    }

    func run() throws {
        if !force && access(output, F_OK) == 0 { throw fail("\(output) exists; use --force to replace it") }
        if online { return try runOnline() }
        let backing: BackingDevice
        do { backing = try BackingDevice.open(path: device!, readOnly: true, cache: .page) } catch { throw fail(error.message) }
        do {
            let store = try undoDir.map { try UndoStore(directory: $0, deviceBytes: backing.size, readOnly: true) }
            for line in store?.recoveryLog ?? [] { printError("note: \(line) (read-only: not repaired)") }
            if let pending = store?.pendingRollback { throw fail("a rollback to barrier \(pending) did not finish; run tandem rollback \(pending) first") }
            let reporter = progress.reporter(label: "diff")
            let summary = try BarrierStream.make(store: store, deviceFD: backing.fd, deviceBytes: backing.size,
                                                 from: from == 0 ? nil : from, to: UInt64(to), output: output, nowUnixSeconds: unixNow(),
                                                 progress: reporter.map { r in { r.update(done: $0, total: $1) } })
            reporter?.finish()
            print("wrote \(output): \(summary.chunks) chunks, \(summary.dataBytes) bytes of data, \(summary.streamBytes) bytes")
        } catch let error as ExitCode {
            throw error
        } catch {
            throw fail("\(error)")
        }
    }

    /// The running node writes the stream; its status says how far it is.
    private func runOnline() throws {
        var target = RunningNode()
        target.file = words[0]
        target.node = node!
        // The node writes the file: a path relative to this shell means nothing to it.
        let path = output.hasPrefix("/") ? output : FileManager.default.currentDirectoryPath + "/" + output
        let started = try target.command("diff \(from) \(to) \(path)")
        let total = UInt64(started["total_bytes"] as? Int ?? 0)
        let reporter = progress.reporter(label: "diff")
        var diff: [String: Any] = [:]
        while true {
            let status = try target.status()
            diff = status.object["diff"] as? [String: Any] ?? [:]
            guard diff["output"] as? String == path else { throw fail("\(node!) no longer reports this diff (restarted?)") }
            if diff["running"] as? Bool != true { break }
            reporter?.update(done: UInt64(diff["done_bytes"] as? Int ?? 0), total: max(total, 1))
            usleep(200_000)
        }
        if let why = diff["error"] as? String { throw fail("\(node!): the diff failed: \(why)") }
        reporter?.update(done: total, total: max(total, 1))
        reporter?.finish()
        print("wrote \(path): \(diff["chunks"] ?? "?") chunks, \(diff["stream_bytes"] ?? "?") bytes")
    }
}

struct Apply: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply a stream from tandem diff to a file or block device (like zfs recv).",
        discussion: """
            The whole stream is checked first (checksums, device size), and every chunk the stream
            changes must hold the stream's base content on the device (or already its new content,
            after an interrupted apply); otherwise nothing is written. Then the chunks are written
            and the device is synced.

            Examples:
              tandem apply 3-7.tdiff --to /dev/vdb
              tandem apply full-7.tdiff --to restored.img --create
            """)

    @Argument(help: "The stream file.")
    var file: String

    @Option(help: "The file or block device to update.")
    var to: String

    @Flag(help: "For a full stream, create --to as a file of the right size if it does not exist.")
    var create = false

    @OptionGroup var progress: ProgressOptions

    func run() throws {
        do {
            // Two passes over the stream: one that checks everything, one that writes.
            let check = progress.reporter(label: "apply: check")
            let write = progress.reporter(label: "apply: write")
            let summary = try BarrierStream.apply(stream: file, to: to, create: create, progress: check.map { check in
                { writing, done, total in
                    if writing {
                        check.finish()
                        write?.update(done: done, total: total)
                    } else {
                        check.update(done: done, total: total)
                    }
                }
            })
            write?.finish()
            let target = summary.header.to.id == 0 ? "the device as it was" : "barrier \(summary.header.to.id)"
            print("applied \(file) to \(to): \(summary.written) chunks written, \(summary.alreadyApplied) already there; \(to) now holds \(target)")
        } catch {
            throw fail("\(error)")
        }
    }
}

struct Rollback: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Put an offline device back to a barrier's image (newer barriers are dropped).",
        discussion: """
            On a running pair: demote the primary first (tandem secondary), then roll back on the
            secondary that keeps the barrier. Its device goes back to the barrier's image, newer
            barriers are dropped, and the other node resyncs exactly the chunks changed since the
            barrier from it. Then promote either node. This destroys every write after the
            barrier: --yes-destroy-newer-data is required.
            Crash-safe: a rollback that stops part way is finished by running it again.

            With a witness, nothing is restored before the rollback is recorded: the
            witness then promotes the other node no more (its data is about to be
            older), or, if the witness is unreachable, the other node acknowledges over
            the link that it outdated itself. If neither is reachable the rollback is
            refused; --force rolls back anyway (the witness may then promote the other
            node meanwhile: a split brain with the rollback, found at the reconnect).

            Examples:
              tandem rollback r0.toml --node beta 1764000000000 --yes-destroy-newer-data
              tandem rollback --undo-dir r0.undo --device disk.img 5 --yes-destroy-newer-data
            """)

    @Argument(help: "The resource file (ask the running node); omit for the offline form.")
    var file: String?

    @Option(help: "The node that keeps the barrier (the secondary).")
    var node: String?

    @OptionGroup var store: UndoStoreOptions

    @Argument(help: "The barrier id.")
    var barrierID: UInt64?

    @Flag(name: .customLong("yes-destroy-newer-data"), help: "Confirm: every write after the barrier is lost.")
    var confirmed = false

    @Flag(help: "With a witness: roll back even if neither the witness nor the other node can record it first (risks a split brain).")
    var force = false

    @OptionGroup var progress: ProgressOptions

    /// `tandem rollback --undo-dir D --device F 5`: the only positional is the id.
    var offlineID: UInt64? { barrierID == nil ? file.flatMap { UInt64($0) } : nil }
    var id: UInt64 { barrierID ?? offlineID ?? 0 }

    func run() throws {
        guard confirmed else { throw fail("a rollback destroys every write after the barrier; add --yes-destroy-newer-data to confirm") }
        guard id != 0 else { throw fail("give the barrier id (tandem barrier list)") }
        if force && (file == nil || offlineID != nil) { throw fail("--force is for a running node (it skips the witness's record)") }
        if let file, offlineID == nil {
            var target = OptionalNode()
            target.file = file
            target.node = node
            // With a witness the node first asks it (or the peer) to record the rollback: up to
            // a link timeout each when they stop answering.
            let total = try target.running.command("rollback \(id)\(force ? " force" : "")", timeoutSeconds: 120)["chunks"] as? Int ?? 0
            // The node restores a step per tick; its status says how far it is.
            let reporter = progress.reporter(label: "rollback")
            let statusTarget = try target.running
            while true {
                usleep(200_000)
                let status = try statusTarget.status()
                let rollback = status.object["rollback"] as? [String: Any] ?? [:]
                guard rollback["running"] as? Bool == true else { break }
                reporter?.update(done: UInt64(rollback["done_chunks"] as? Int ?? 0), total: UInt64(max(rollback["total_chunks"] as? Int ?? total, 1)))
            }
            reporter?.update(done: UInt64(total), total: UInt64(max(total, 1)))
            reporter?.finish()
            if (try statusTarget.status()).object["rollback"].flatMap({ ($0 as? [String: Any])?["failed"] as? Bool }) == true {
                throw fail("the rollback to barrier \(id) failed part way (see the node's log); it finishes when the node starts again")
            }
            print("rolled back \(node ?? "") to barrier \(id): \(total) chunks restored; the peer resyncs them from it (tandem wait-sync to follow)")
            return
        }
        let (device, undo) = try store.open(readOnly: false)
        if let pending = undo.pendingRollback, pending != id {
            throw fail("a rollback to barrier \(pending) did not finish; run tandem rollback \(pending) first")
        }
        do {
            let plan = try undo.rollback(
                to: id,
                writeDevice: { offset, bytes in try BlockFile.write(device.fd, bytes, at: offset, device.path) },
                syncDevice: { guard fsync(device.fd) == 0 else { throw UndoStoreError("cannot sync \(device.path): \(SystemError.text(errno))") } })
            print("rolled back \(device.path) to barrier \(id): \(plan.restores.count) chunks restored, \(plan.newer.count) newer barriers dropped")
        } catch {
            throw fail("\(error)")
        }
    }
}


/// The human form of a node's `barrier list` answer.
private func printBarrierTable(_ answer: String) {
    guard let data = answer.data(using: .utf8),
          let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
          let rows = object["barriers"] as? [[String: Any]]
    else { return print(answer) }
    if let keeper = object["kept_on"] as? String { print("barriers created here, kept on \(keeper):") }
    if rows.isEmpty { return print("no barriers") }
    print("ID\tTIME\tBYTES HELD\tLABEL")
    for row in rows {
        let held = (row["bytes_held"] as? Int).map(String.init) ?? "-"
        print("\(row["id"] ?? "?")\t\(row["time"] ?? "?")\t\(held)\t\(row["label"] ?? "")")
    }
}
