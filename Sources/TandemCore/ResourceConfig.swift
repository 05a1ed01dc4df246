/// A replicated resource as its resource file describes it: the name, the CA, tuning, and the
/// nodes (two data nodes and at most one witness). The format is `Protocol/resource-file.md`.
///
/// Sans-I/O: `parse` takes the file's text, and `checkFiles` asks the caller whether paths exist,
/// so both run in tests and in the simulator. Validation collects every error it can find, each
/// with its line and a fix, because an operator editing a file wants the whole list at once.
public struct ResourceConfig: Sendable {
    /// Longest resource or node name (names are ASCII): what the metadata superblock holds.
    public static let nameLengthMax = Limits.metadataResourceNameBytesMax
    /// Node ids, as the metadata numbers its peers.
    public static let nodeIDs = 0...Limits.metadataNodeIDMax
    /// Data nodes in a resource: exactly two for now.
    public static let dataNodeCount = 2
    /// Witnesses in a resource.
    public static let witnessCountMax = 1
    /// Bytes of a Unix socket path: `sun_path` holds 108 with the terminating NUL.
    public static let socketPathBytesMax = 107
    /// Bytes of any other path (PATH_MAX with its NUL).
    public static let pathBytesMax = 4095
    /// Where control sockets go when a node does not name one.
    public static let controlDirectoryDefault = "/run/tandem"

    /// The resource's name (`resource = "r0"`).
    public var name: String
    public var tls: TLS
    public var tuning: Tuning
    public var failover = Failover()
    public var barriers = Barriers()
    /// Scripts run on events (`[handlers]`), by event.
    public var handlers: [HandlerEvent: String] = [:]
    /// The nodes in the order of the file.
    public var nodes: [Node]
    /// The file the configuration came from, for messages.
    public var path: String
    /// Where keys and tables were, for `checkFiles` ("resource", "tls.ca", "node.NAME",
    /// "node.NAME.KEY").
    var positions: [String: Position] = [:]

    struct Position: Sendable {
        var line: Int
        var column: Int
    }

    /// A configuration built in code (tests, the simulator). Nothing is validated: `parse` is
    /// the way in for a file, and `checkFiles` reports such a configuration's problems on line 1.
    public init(name: String, tls: TLS, tuning: Tuning = Tuning(), nodes: [Node], path: String) {
        self.name = name
        self.tls = tls
        self.tuning = tuning
        self.nodes = nodes
        self.path = path
    }

    public struct TLS: Sendable, Equatable {
        /// PEM CA certificate every node's certificate must chain to.
        public var caPath: String

        public init(caPath: String) {
            self.caPath = caPath
        }
    }

    /// `[failover]`: what happens without an operator.
    public struct Failover: Sendable, Equatable {
        /// What a connect that finds a split brain does (default: refuse and wait for an operator).
        public var afterSplitBrain: SplitBrainPolicy = .disconnect
        /// With a witness: the secondary promotes itself when the primary is gone and the witness
        /// agrees; a primary that loses quorum stops acknowledging writes.
        public var autoPromote = true

        public init() {}
    }

    /// `[barriers]`: point-in-time barriers (Protocol/barriers.md).
    public struct Barriers: Sendable, Equatable {
        /// The primary creates a barrier every this many minutes (0: only on request).
        public var intervalMinutes = 0
        /// Retention: at most this many barriers, none older than `keepHours` (0: no age limit),
        /// at most `keepBytes` of undo data (0: no limit but the disk's). The oldest go first.
        public var keep = 24
        public var keepHours = 0
        public var keepBytes = 0
        /// Bytes saved per first overwrite after a barrier.
        public var chunkBytes = Limits.undoChunkBytesDefault

        public init() {}
    }

    /// Events that run a user's script (`[handlers]`), like DRBD's handlers. The script gets the
    /// event, resource, node and details as arguments and `TANDEM_*` variables; its failure is
    /// logged, never fatal.
    public enum HandlerEvent: String, Sendable, Equatable, Hashable, CaseIterable {
        case roleChange = "role-change"
        case splitBrain = "split-brain"
        case peerLost = "peer-lost"
        case resyncDone = "resync-done"
        case quorumLost = "quorum-lost"
    }

    public enum Role: String, Sendable, Equatable, CaseIterable {
        /// Holds a replica and exports it over NBD.
        case data
        /// Holds no data; takes part in deciding which data node may be primary.
        case witness
    }

    public struct Node: Sendable, Equatable {
        public var name: String
        public var id: Int
        public var role: Role
        /// Where this node listens for replication and where its peers connect.
        public var address: Address
        /// The backing file or block device (data nodes only).
        public var devicePath: String?
        /// The metadata file: bitmap, activity log, generations (data nodes only).
        public var metadataPath: String?
        /// Where the NBD export listens (data nodes only).
        public var nbd: Address?
        /// The node's control socket.
        public var controlPath: String
        public var certPath: String
        public var keyPath: String
        /// The undo directory that keeps point-in-time barriers restorable (data nodes; optional).
        public var undoPath: String?
        /// Where the node serves Prometheus metrics over HTTP (`GET /metrics`; optional).
        public var metrics: Address?

        public init(
            name: String, id: Int, role: Role, address: Address, devicePath: String?, metadataPath: String?,
            nbd: Address?, controlPath: String, certPath: String, keyPath: String
        ) {
            self.name = name
            self.id = id
            self.role = role
            self.address = address
            self.devicePath = devicePath
            self.metadataPath = metadataPath
            self.nbd = nbd
            self.controlPath = controlPath
            self.certPath = certPath
            self.keyPath = keyPath
        }

        public var isWitness: Bool { role == .witness }
    }

    /// Replication tuning; every field has a default, so `[tuning]` is optional.
    public struct Tuning: Sendable, Equatable {
        /// Bytes of device one bit of the out-of-sync bitmap stands for.
        public var bitmapGranularityBytes = Limits.bitmapGranularityBytesDefault
        /// Extents the activity log keeps hot (DRBD's al-extents default).
        public var activityLogExtents = Limits.activityLogExtentsDefault
        public var activityLogExtentBytes = Limits.activityLogExtentBytesDefault
        /// Resync never slows below this while application I/O competes with it.
        public var resyncBytesPerSecondMin = 10 << 20
        public var resyncBytesPerSecondMax = 4 << 30
        public var pingIntervalMillis = 1000
        /// A peer silent for this long is disconnected; longer than the ping interval.
        public var peerTimeoutMillis = 6000
        public var connectRetryMillis = 500
        /// Buffers one connection may hold for replication.
        public var buffersMax = 2048
        /// Microseconds the node's loop polls before it sleeps; 0: never.
        public var pollMicros = Limits.pollMicrosDefault
        /// SO_SNDBUF of the NBD export's client sockets; 0: the kernel's autotuning.
        public var nbdSendBufferBytes = Limits.nbdSendBufferBytesDefault
        /// SO_SNDBUF of the replication link's socket; 0: the kernel's autotuning.
        public var linkSendBufferBytes = Limits.linkSendBufferBytesDefault

        public init() {}

        // The metadata's limits bound what the metadata stores, so that a valid resource file
        // never trips a precondition in DirtyBitmap or ActivityLog.
        public static let bitmapGranularityBytesRange = Limits.bitmapGranularityBytesMin...Limits.bitmapGranularityBytesMax
        public static let activityLogExtentsRange = Limits.activityLogExtentsMin...Limits.activityLogExtentsMax
        public static let activityLogExtentBytesRange = Limits.activityLogExtentBytesMin...Limits.activityLogExtentBytesMax
        public static let resyncBytesPerSecondMinRange = 0...(1 << 40)
        public static let resyncBytesPerSecondMaxRange = (1 << 20)...(1 << 40)
        public static let pingIntervalMillisRange = 100...60_000
        public static let peerTimeoutMillisRange = 200...600_000
        public static let connectRetryMillisRange = 10...60_000
        public static let buffersMaxRange = 32...131_072
        public static let pollMicrosRange = 0...Limits.pollMicrosMax
        public static let sendBufferBytesRange = 0...Limits.socketSendBufferBytesMax
    }

    // MARK: Accessors

    public func node(named name: String) -> Node? {
        nodes.first { $0.name == name }
    }

    /// The other data node of a data node; nil for a witness or an unknown name.
    public func peer(of name: String) -> Node? {
        guard let node = node(named: name), node.role == .data else { return nil }
        return nodes.first { $0.role == .data && $0.name != name }
    }

    public var witness: Node? {
        nodes.first { $0.role == .witness }
    }

    public var dataNodes: [Node] {
        nodes.filter { $0.role == .data }
    }

    /// The control socket a node gets when its `[[node]]` names none.
    public static func controlPathDefault(resource: String, node: String) -> String {
        "\(controlDirectoryDefault)/\(resource)-\(node).sock"
    }
}

/// Two configurations are equal when they mean the same: where their keys were written, and the
/// file's path, do not count (a rendered and re-parsed configuration equals the original).
extension ResourceConfig: Equatable {
    public static func == (a: ResourceConfig, b: ResourceConfig) -> Bool {
        a.name == b.name && a.tls == b.tls && a.tuning == b.tuning && a.nodes == b.nodes && a.failover == b.failover
            && a.handlers == b.handlers && a.barriers == b.barriers
    }
}

// MARK: - Errors

/// One problem in a resource file, with a fix.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var path: String
    /// 1-based; a missing key is reported on the line of its table (1 for the top level).
    public var line: Int
    /// 1-based, in Unicode scalars; 1 when the problem is a whole line or table.
    public var column: Int
    public var message: String
    public var fix: String

    public init(path: String, line: Int, column: Int = 1, message: String, fix: String) {
        self.path = path
        self.line = line
        self.column = column
        self.message = message
        self.fix = fix
    }

    /// `r0.toml:12: unknown key 'adress' in [[node]]; did you mean 'address'? (fix: ...)`
    public var description: String { "\(path):\(line): \(message) (fix: \(fix))" }
}

/// Every problem found in a resource file, in the order of the file.
public struct ConfigErrors: Error, Sendable, Equatable, CustomStringConvertible {
    public var errors: [ConfigError]

    public init(_ errors: [ConfigError]) {
        precondition(!errors.isEmpty, "ConfigErrors without an error")
        self.errors = errors
    }

    /// One error per line.
    public var description: String { errors.map(\.description).joined(separator: "\n") }
}

// MARK: - Parsing

extension ResourceConfig {
    /// Parses and validates a resource file's text; `path` only labels the errors.
    public static func parse(_ text: String, path: String) -> Result<ResourceConfig, ConfigErrors> {
        let root: TOMLTable
        switch TOML.parse(text) {
        case .failure(let e):
            return .failure(ConfigErrors([
                ConfigError(path: path, line: e.line, column: e.column, message: e.message, fix: e.fix)
            ]))
        case .success(let table):
            root = table
        }
        var validator = ConfigValidator(path: path)
        let config = validator.resource(root)
        if validator.errors.isEmpty {
            guard let config else { preconditionFailure("resource file rejected without an error") }
            return .success(config)
        }
        // Stable: problems on one line keep the order they were found in.
        let sorted = validator.errors.enumerated().sorted {
            ($0.element.line, $0.element.column, $0.offset) < ($1.element.line, $1.element.column, $1.offset)
        }.map(\.element)
        return .failure(ConfigErrors(sorted))
    }

    /// Checks the files `node` needs on its own host: the CA, its certificate and key, its
    /// device, and the directories of its metadata file and control socket. Paths of other nodes
    /// are not checked (they live on other hosts). The metadata file itself may be missing:
    /// initialising a node creates it. Returns no errors when everything is in place; otherwise
    /// errors in the order of the file.
    public func checkFiles(
        forNode nodeName: String,
        fileExists: (String) -> Bool,
        fileReadable: (String) -> Bool = { _ in true }
    ) -> [ConfigError] {
        guard let node = node(named: nodeName) else {
            let position = positions["resource"] ?? Position(line: 1, column: 1)
            return [ConfigError(
                path: path, line: position.line, column: position.column,
                message: "resource '\(name)' has no node named '\(nodeName)'; "
                    + "its nodes are \(nodes.map { "'\($0.name)'" }.joined(separator: ", "))",
                fix: "use one of those names, or add a [[node]] named '\(nodeName)'")]
        }
        var errors: [ConfigError] = []
        func position(_ key: String) -> Position {
            positions[key] ?? positions["node.\(node.name)"] ?? Position(line: 1, column: 1)
        }
        func file(_ path: String, key: String, what: String, createHint: String) {
            let at = position(key)
            if !fileExists(path) {
                errors.append(ConfigError(
                    path: self.path, line: at.line, column: at.column,
                    message: "\(what) \(path) does not exist",
                    fix: "\(createHint), or correct the path"))
            } else if !fileReadable(path) {
                errors.append(ConfigError(
                    path: self.path, line: at.line, column: at.column,
                    message: "\(what) \(path) exists but cannot be read",
                    fix: "check its owner and mode: the node reads it as the user it runs as"))
            }
        }
        func directory(of path: String, key: String, what: String) {
            let dir = Self.directory(of: path)
            guard !fileExists(dir) else { return }
            let at = position(key)
            errors.append(ConfigError(
                path: self.path, line: at.line, column: at.column,
                message: "the directory \(dir) of \(what) \(path) does not exist",
                fix: "create it: mkdir -p \(dir)"))
        }
        let certsHint = "make it with 'tandem certs --dir DIR --node \(node.name)'"
        file(tls.caPath, key: "tls.ca", what: "the CA certificate ('ca' in [tls])", createHint: certsHint)
        file(node.certPath, key: "node.\(node.name).cert", what: "the certificate of node '\(node.name)'",
             createHint: certsHint)
        file(node.keyPath, key: "node.\(node.name).key", what: "the private key of node '\(node.name)'",
             createHint: certsHint)
        if let device = node.devicePath {
            file(device, key: "node.\(node.name).device", what: "the device of node '\(node.name)'",
                 createHint: "create it (a file: truncate -s 10G \(device))")
        }
        if let metadata = node.metadataPath {
            directory(of: metadata, key: "node.\(node.name).metadata", what: "the metadata file")
        }
        directory(of: node.controlPath, key: "node.\(node.name).control", what: "the control socket")
        for event in HandlerEvent.allCases {
            if let script = handlers[event] {
                file(script, key: "handlers.\(event.rawValue)", what: "the \(event.rawValue) handler",
                     createHint: "write the script (it gets the event, resource and node as arguments)")
            }
        }
        return errors.enumerated().sorted {
            ($0.element.line, $0.element.column, $0.offset) < ($1.element.line, $1.element.column, $1.offset)
        }.map(\.element)
    }

    /// Checks the sizes `node` can see on its own host, each on the line of its key:
    /// - its device holds whole 4 KiB blocks and the bitmap at `bitmap-granularity` can cover it;
    /// - its metadata file, when one exists, was made for a device of this size (a device resized
    ///   since `tandem init` no longer matches its bitmap);
    /// - when the other data node runs on the same host (its address has the same host, or both
    ///   are loopback, as in tests and demos) and its device is here, both devices are the same
    ///   size (two replicas of different sizes refuse to connect).
    ///
    /// `deviceBytes` gives a device's size, nil when it does not exist or cannot be sized (which
    /// `checkFiles` reports); `recordedDeviceBytes` gives the device size a metadata file
    /// records, nil when there is none or it cannot be read.
    public func checkSizes(
        forNode nodeName: String,
        deviceBytes: (String) -> UInt64?,
        recordedDeviceBytes: (String) -> UInt64? = { _ in nil }
    ) -> [ConfigError] {
        guard let node = node(named: nodeName), let device = node.devicePath, let bytes = deviceBytes(device) else { return [] }
        var errors: [ConfigError] = []
        func report(_ key: String, _ message: String, fix: String) {
            let at = positions[key] ?? positions["node.\(node.name)"] ?? Position(line: 1, column: 1)
            errors.append(ConfigError(path: path, line: at.line, column: at.column, message: message, fix: fix))
        }
        let block = UInt64(Limits.blockSize)
        let deviceKey = "node.\(node.name).device"
        let what = "the device of node '\(node.name)' \(device)"
        if bytes == 0 {
            report(deviceKey, "\(what) is empty (0 bytes)", fix: "give it a size (a file: truncate -s 10G \(device)), or correct the path")
            return errors
        }
        if bytes % block != 0 {
            let up = (bytes / block + 1) * block
            report(deviceKey, "\(what) is \(bytes) bytes, not a whole number of \(block)-byte blocks",
                   fix: "grow it to \(up) bytes (a file: truncate -s \(up) \(device))")
        }
        let granularity = tuning.bitmapGranularityBytes
        if DirtyBitmap.bitCount(deviceBytes: bytes, granularityBytes: granularity) > Limits.bitmapBitsMax {
            var fits = granularity
            while fits < Limits.bitmapGranularityBytesMax && DirtyBitmap.bitCount(deviceBytes: bytes, granularityBytes: fits) > Limits.bitmapBitsMax {
                fits *= 2
            }
            let fixes = DirtyBitmap.bitCount(deviceBytes: bytes, granularityBytes: fits) <= Limits.bitmapBitsMax
            report(positions["tuning.bitmap-granularity"] != nil ? "tuning.bitmap-granularity" : deviceKey,
                   "\(what) is \(bytes) bytes: too large for a bitmap of \(Self.sizeText(granularity)) granules (at most \(Limits.bitmapBitsMax) bits)",
                   fix: fixes ? "set bitmap-granularity = \"\(Self.sizeText(fits))\" in [tuning]" : "use a smaller device")
        }
        if let metadata = node.metadataPath, let recorded = recordedDeviceBytes(metadata), recorded != bytes {
            report("node.\(node.name).metadata",
                   "the metadata file \(metadata) was made for a \(recorded)-byte device, but \(what) is \(bytes) bytes",
                   fix: "give the device back its \(recorded) bytes, or run 'tandem init \(path) --node \(node.name) --force' "
                       + "(its bitmap and generation history are lost)")
        }
        if let peer = peer(of: node.name), let peerDevice = peer.devicePath, peerDevice != device,
           peer.address.host == node.address.host || (peer.address.isLoopback && node.address.isLoopback),
           let peerBytes = deviceBytes(peerDevice), peerBytes != bytes {
            let larger = max(bytes, peerBytes)
            let smaller = bytes < peerBytes ? device : peerDevice
            report(deviceKey,
                   "\(what) is \(bytes) bytes, but the device of node '\(peer.name)' \(peerDevice) on the same host is \(peerBytes) bytes: "
                       + "the two replicas must be the same size",
                   fix: "make them the same size (a file: truncate -s \(larger) \(smaller)), then run 'tandem init --force' for the node resized")
        }
        return errors
    }

    /// The directory part of an absolute path ("/" for "/x").
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}

// MARK: - Rendering

extension ResourceConfig {
    /// The configuration as a resource file, every key written out (defaults included), so that
    /// `parse(renderTOML())` gives back an equal configuration.
    public func renderTOML() -> String {
        var out = "resource = \(TOML.quoted(name))\n\n[tls]\nca = \(TOML.quoted(tls.caPath))\n\n[tuning]\n"
        for key in TuningKey.all {
            let value = tuning[keyPath: key.field]
            out += "\(key.name) = \(key.isSize ? TOML.quoted(Self.sizeText(value)) : String(value))\n"
        }
        out += "\n[failover]\nafter-split-brain = \(TOML.quoted(failover.afterSplitBrain.rawValue))\nauto-promote = \(failover.autoPromote)\n"
        out += "\n[barriers]\ninterval-minutes = \(barriers.intervalMinutes)\nkeep = \(barriers.keep)\nkeep-hours = \(barriers.keepHours)\n"
        out += "keep-space = \(TOML.quoted(Self.sizeText(barriers.keepBytes)))\nchunk-size = \(TOML.quoted(Self.sizeText(barriers.chunkBytes)))\n"
        if !handlers.isEmpty {
            out += "\n[handlers]\n"
            for event in HandlerEvent.allCases { if let script = handlers[event] { out += "\(event.rawValue) = \(TOML.quoted(script))\n" } }
        }
        for node in nodes {
            out += "\n[[node]]\nname = \(TOML.quoted(node.name))\nid = \(node.id)\n"
            if node.role != .data { out += "role = \(TOML.quoted(node.role.rawValue))\n" }
            out += "address = \(TOML.quoted(node.address.description))\n"
            if let device = node.devicePath { out += "device = \(TOML.quoted(device))\n" }
            if let metadata = node.metadataPath { out += "metadata = \(TOML.quoted(metadata))\n" }
            if let nbd = node.nbd { out += "nbd = \(TOML.quoted(nbd.description))\n" }
            if let undo = node.undoPath { out += "undo = \(TOML.quoted(undo))\n" }
            if let metrics = node.metrics { out += "metrics = \(TOML.quoted(metrics.description))\n" }
            out += "control = \(TOML.quoted(node.controlPath))\n"
            out += "cert = \(TOML.quoted(node.certPath))\nkey = \(TOML.quoted(node.keyPath))\n"
        }
        return out
    }

    /// A size in the largest binary unit that holds it exactly: "4KiB", "1GiB", "1000B".
    public static func sizeText(_ bytes: Int) -> String {
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)]
        where bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(unit)"
        }
        return "\(bytes)B"
    }
}

// MARK: - Sizes

extension ResourceConfig {
    /// Why a value is wrong, and what to write instead.
    struct Problem: Error {
        var message: String
        var fix: String
    }

    static let sizeUnits: [(name: String, shift: Int)] = [
        ("", 0), ("B", 0), ("KiB", 10), ("MiB", 20), ("GiB", 30), ("TiB", 40),
        ("K", 10), ("M", 20), ("G", 30), ("T", 40),
    ]

    /// Parses "4096", "4KiB", "4 KiB", "1G". Messages are clauses after the key ("has ...").
    static func parseSize(_ text: String) -> Result<Int, Problem> {
        let scalars = Array(text.unicodeScalars)
        var k = 0
        var whole = 0
        var digitCount = 0
        func isDigit(_ c: Unicode.Scalar) -> Bool { ("0"..."9").contains(c) }
        if scalars.first == "-" {
            return .failure(Problem(message: "is negative (\(TOML.quoted(text)))", fix: "sizes are 0 or more"))
        }
        var overflow = false
        while k < scalars.count, isDigit(scalars[k]) {
            let (times, o1) = whole.multipliedReportingOverflow(by: 10)
            let (plus, o2) = times.addingReportingOverflow(Int(scalars[k].value - 0x30))
            overflow = overflow || o1 || o2
            whole = plus
            digitCount += 1
            k += 1
        }
        guard digitCount > 0 else {
            return .failure(Problem(message: "is not a size: \(TOML.quoted(text))",
                                    fix: "write a number with a unit, e.g. \"4KiB\", or a number of bytes"))
        }
        var fraction = 0
        var fractionDigits = 0
        if k < scalars.count, scalars[k] == "." {
            k += 1
            while k < scalars.count, isDigit(scalars[k]) {
                if fractionDigits < 9 {
                    fraction = fraction * 10 + Int(scalars[k].value - 0x30)
                    fractionDigits += 1
                }
                k += 1
            }
        }
        if k < scalars.count, scalars[k] == " " { k += 1 }
        var unitText = ""
        unitText.unicodeScalars.append(contentsOf: scalars[k...])
        guard let unit = sizeUnits.first(where: { $0.name == unitText }) else {
            if let suggestion = suggestUnit(unitText) {
                let number = String(String.UnicodeScalarView(scalars[..<(k > 0 && scalars[k - 1] == " " ? k - 1 : k)]))
                let binary = ["kb", "mb", "gb", "tb"].contains(unitText.lowercased())
                    ? " (sizes are binary: 1KiB is 1024 bytes)" : ""
                return .failure(Problem(
                    message: "has an unknown unit '\(unitText)' in \(TOML.quoted(text)); did you mean '\(suggestion)'?\(binary)",
                    fix: "write \(TOML.quoted(number + suggestion))"))
            }
            return .failure(Problem(
                message: "has an unknown unit '\(unitText)' in \(TOML.quoted(text))",
                fix: "units are B, KiB, MiB, GiB, TiB (K, M, G, T mean the same), e.g. \"4KiB\""))
        }
        if overflow || whole > Int.max >> unit.shift {
            return .failure(Problem(message: "is too large: \(TOML.quoted(text))", fix: "use a smaller size"))
        }
        if fractionDigits > 0 {
            // 1.5MiB is a whole number of bytes; say which, so the fix is exact.
            var scale = 1
            for _ in 0..<fractionDigits { scale *= 10 }
            let (fractionBytes, o) = fraction.multipliedReportingOverflow(by: 1 << unit.shift)
            if !o && fraction > 0 && fractionBytes % scale == 0 && whole <= (Int.max >> unit.shift) - 1 {
                let bytes = (whole << unit.shift) + fractionBytes / scale
                return .failure(Problem(message: "is not a whole number: \(TOML.quoted(text))",
                                        fix: "write \(TOML.quoted(sizeText(bytes)))"))
            }
            return .failure(Problem(message: "is not a whole number: \(TOML.quoted(text))",
                                    fix: "write a whole number of \(unit.name == "B" ? "bytes" : unit.name)"))
        }
        return .success(whole << unit.shift)
    }

    /// The unit someone probably meant: "kb" and "Kib" mean KiB, "bytes" means B.
    static func suggestUnit(_ unit: String) -> String? {
        let lower = unit.lowercased()
        if ["b", "byte", "bytes"].contains(lower) { return "B" }
        let prefixes: [(String, String, String)] = [
            ("k", "kilo", "KiB"), ("m", "mega", "MiB"), ("g", "giga", "GiB"), ("t", "tera", "TiB"),
        ]
        for (letter, word, name) in prefixes {
            let rest: Substring
            if lower.hasPrefix(word) {
                rest = lower.dropFirst(word.count)
            } else if lower.hasPrefix(letter) {
                rest = lower.dropFirst()
            } else {
                continue
            }
            if ["", "b", "ib", "byte", "bytes", "ibyte", "ibytes"].contains(String(rest)) { return name }
        }
        return nil
    }
}

// MARK: - Names and suggestions

extension ResourceConfig {
    /// Why a resource or node name is not `[a-z0-9_-]{1,64}`, or nil.
    static func nameProblem(_ name: String) -> String? {
        if name.isEmpty { return "is empty" }
        if name.unicodeScalars.count > nameLengthMax { return "is longer than \(nameLengthMax) characters" }
        if !name.unicodeScalars.allSatisfy(isNameScalar) {
            return "may contain only a-z, 0-9, '_' and '-'"
        }
        return nil
    }

    static func isNameScalar(_ c: Unicode.Scalar) -> Bool {
        switch c {
        case "a"..."z", "0"..."9", "_", "-": return true
        default: return false
        }
    }

    /// A valid name close to `name`: lowercased, other characters as '-', cut to the limit.
    static func suggestedName(_ name: String, fallback: String) -> String {
        var out = String.UnicodeScalarView()
        for c in name.lowercased().unicodeScalars.prefix(nameLengthMax) {
            out.append(isNameScalar(c) ? c : "-")
        }
        return out.isEmpty ? fallback : String(out)
    }

    /// The candidate nearest to `word` by edit distance (ignoring case, '_' as '-'), or one that
    /// starts with it ("peer-timeout" for "peer-timeout-ms"); nil when nothing is close.
    static func closest(to word: String, in candidates: [String]) -> String? {
        func normal(_ s: String) -> [Unicode.Scalar] {
            Array(s.lowercased().unicodeScalars.map { $0 == "_" ? "-" : $0 })
        }
        let w = normal(word)
        // Very long input is not a typo; it also keeps the quadratic distance cheap.
        guard !w.isEmpty, w.count <= 64 else { return nil }
        let limit = max(1, min(3, w.count / 3))
        var best: (String, Int)?
        for candidate in candidates {
            let c = normal(candidate)
            var d = editDistance(w, c)
            if d > limit && w.count >= 3 && (c.starts(with: w) || w.starts(with: c)) { d = limit }
            if d <= limit && (best == nil || d < best!.1) { best = (candidate, d) }
        }
        return best?.0
    }

    /// Levenshtein distance.
    static func editDistance(_ a: [Unicode.Scalar], _ b: [Unicode.Scalar]) -> Int {
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var previous = Array(0...b.count)
        var current = Array(repeating: 0, count: b.count + 1)
        for i in 1...a.count {
            current[0] = i
            for j in 1...b.count {
                let substitute = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)
                current[j] = min(previous[j] + 1, current[j - 1] + 1, substitute)
            }
            swap(&previous, &current)
        }
        return previous[b.count]
    }

    /// Why a path is unusable, or nil.
    static func pathProblem(_ path: String, bytesMax: Int) -> Problem? {
        if path.isEmpty {
            return Problem(message: "is empty", fix: "write an absolute path")
        }
        if !path.hasPrefix("/") {
            return Problem(message: "is not an absolute path: \(TOML.quoted(path))",
                           fix: "write the full path, starting with '/'")
        }
        if path.unicodeScalars.contains(where: TOML.isControl) {
            return Problem(message: "contains a control character: \(TOML.quoted(path))",
                           fix: "remove it")
        }
        if path.utf8.count > bytesMax {
            return Problem(message: "is \(path.utf8.count) bytes long; the limit is \(bytesMax)",
                           fix: "use a shorter path")
        }
        return nil
    }
}

// MARK: - Addresses

extension ResourceConfig {
    /// HOST:PORT or [IPv6]:PORT, where HOST is an IPv4 address or a DNS name.
    public struct Address: Sendable, Hashable, CustomStringConvertible {
        public enum Host: Sendable, Hashable {
            /// Four bytes.
            case ipv4([UInt8])
            /// Eight 16-bit groups, and the zone of a link-local address (`%eth0`).
            case ipv6([UInt16], zone: String?)
            /// A DNS name, lowercased.
            case name(String)
        }

        public var host: Host
        public var port: UInt16

        public init(host: Host, port: UInt16) {
            self.host = host
            self.port = port
        }

        /// Parses HOST:PORT or [IPv6]:PORT; nil if it is neither.
        public init?(_ text: String) {
            guard case .success(let address) = Self.parse(text, examplePort: 1) else { return nil }
            self = address
        }

        /// A listen address, where port 0 asks the kernel to choose one.
        public init?(listen text: String) {
            guard case .success(let address) = Self.parse(text, examplePort: 1, portMin: 0) else { return nil }
            self = address
        }

        /// The host as `getaddrinfo` and `inet_pton` take it: no brackets.
        public var hostText: String {
            switch host {
            case .ipv4(let b):
                return b.map(String.init).joined(separator: ".")
            case .ipv6(let groups, let zone):
                return Self.ipv6Text(groups) + (zone.map { "%" + $0 } ?? "")
            case .name(let name):
                return name
            }
        }

        /// "127.0.0.1:7788", "[::1]:7788", "alpha.example.org:7788".
        public var description: String {
            if case .ipv6 = host { return "[\(hostText)]:\(port)" }
            return "\(hostText):\(port)"
        }

        /// 0.0.0.0 or [::]: every address of the host (a listener, never a peer to connect to).
        public var isWildcard: Bool {
            switch host {
            case .ipv4(let b): return b == [0, 0, 0, 0]
            case .ipv6(let g, _): return g.allSatisfy { $0 == 0 }
            case .name: return false
            }
        }

        /// 127.0.0.0/8, ::1 or "localhost".
        public var isLoopback: Bool {
            switch host {
            case .ipv4(let b): return b[0] == 127
            case .ipv6(let g, _): return g == [0, 0, 0, 0, 0, 0, 0, 1]
            case .name(let n): return n == "localhost"
            }
        }

        /// Whether listeners on both could collide on one host.
        func mayCollide(with other: Address) -> Bool {
            guard port == other.port else { return false }
            if host == other.host || isWildcard || other.isWildcard { return true }
            // "localhost" may resolve to any loopback address.
            if isLoopback && other.isLoopback, case .name = host { return true }
            if isLoopback && other.isLoopback, case .name = other.host { return true }
            return false
        }

        /// Parses an address; a problem's message is a clause to follow the key and text.
        static func parse(_ text: String, examplePort: Int, portMin: Int = 1) -> Result<Address, Problem> {
            let generic = "write HOST:PORT or [IPv6]:PORT, e.g. \"192.0.2.10:\(examplePort)\""
            if text.isEmpty { return .failure(Problem(message: "is empty", fix: generic)) }
            if text.unicodeScalars.contains(where: { $0 == " " || $0 == "\t" || TOML.isControl($0) }) {
                return .failure(Problem(message: "contains a space or control character", fix: generic))
            }
            let bytes = Array(text.utf8)
            let colon = UInt8(ascii: ":")
            let hostBytes: ArraySlice<UInt8>
            let portBytes: ArraySlice<UInt8>
            let bracketed = bytes[0] == UInt8(ascii: "[")
            if bracketed {
                guard let close = bytes.firstIndex(of: UInt8(ascii: "]")) else {
                    return .failure(Problem(message: "has '[' but no ']'", fix: "write [IPv6]:PORT, e.g. \"[::1]:\(examplePort)\""))
                }
                hostBytes = bytes[1..<close]
                let rest = bytes[(close + 1)...]
                guard rest.first == colon else {
                    let inner = String(decoding: hostBytes, as: UTF8.self)
                    return .failure(Problem(
                        message: rest.isEmpty ? "has no port" : "has something other than ':PORT' after ']'",
                        fix: "write \(TOML.quoted("[\(inner)]:\(examplePort)"))"))
                }
                portBytes = rest.dropFirst()
            } else {
                let colons = bytes.filter { $0 == colon }.count
                if colons == 0 {
                    return .failure(Problem(message: "has no port", fix: "write \(TOML.quoted("\(text):\(examplePort)"))"))
                }
                let last = bytes.lastIndex(of: colon)!
                if colons > 1 {
                    // "::1:7788" is also a complete IPv6 address, but someone who wrote a port-like
                    // last group most likely meant [::1]:7788.
                    let head = String(decoding: bytes[..<last], as: UTF8.self)
                    let tail = String(decoding: bytes[(last + 1)...], as: UTF8.self)
                    if parseIPv6(bytes[..<last]) != nil, !tail.isEmpty, tail.utf8.allSatisfy({ (0x30...0x39).contains($0) }) {
                        return .failure(Problem(message: "needs brackets around its IPv6 address",
                                                fix: "write \(TOML.quoted("[\(head)]:\(tail)"))"))
                    }
                    if parseIPv6(bytes[...]) != nil {
                        return .failure(Problem(message: "is an IPv6 address without a port",
                                                fix: "write \(TOML.quoted("[\(text)]:\(examplePort)"))"))
                    }
                    return .failure(Problem(message: "is not HOST:PORT", fix: generic))
                }
                hostBytes = bytes[..<last]
                portBytes = bytes[(last + 1)...]
            }
            let hostString = String(decoding: hostBytes, as: UTF8.self)
            guard !portBytes.isEmpty else {
                return .failure(Problem(message: "has no port after ':'", fix: generic))
            }
            guard portBytes.count <= 5, portBytes.allSatisfy({ (0x30...0x39).contains($0) }),
                  let port = Int(String(decoding: portBytes, as: UTF8.self)), (portMin...65535).contains(port)
            else {
                return .failure(Problem(
                    message: "has an invalid port '\(String(decoding: portBytes, as: UTF8.self))'",
                    fix: "ports are 1 to 65535, e.g. \(examplePort)"))
            }
            if hostBytes.isEmpty {
                return .failure(Problem(message: "has no host", fix: generic))
            }
            if bracketed {
                if parseIPv4(hostBytes) != nil {
                    return .failure(Problem(message: "puts an IPv4 address in brackets",
                                            fix: "write \(TOML.quoted("\(hostString):\(port)")) (brackets are for IPv6)"))
                }
                var addressBytes = hostBytes
                var zone: String?
                if let percent = hostBytes.firstIndex(of: UInt8(ascii: "%")) {
                    addressBytes = hostBytes[..<percent]
                    let zoneBytes = hostBytes[(percent + 1)...]
                    guard !zoneBytes.isEmpty, zoneBytes.allSatisfy({ isBareByte($0) || $0 == UInt8(ascii: ".") }) else {
                        return .failure(Problem(message: "has an invalid IPv6 zone in '\(hostString)'",
                                                fix: "write the interface name after '%', e.g. [fe80::1%eth0]"))
                    }
                    zone = String(decoding: zoneBytes, as: UTF8.self)
                }
                guard let groups = parseIPv6(addressBytes) else {
                    return .failure(Problem(message: "has an invalid IPv6 address '\(hostString)'",
                                            fix: "write an IPv6 address in brackets, e.g. \"[2001:db8::10]:\(port)\""))
                }
                return .success(Address(host: .ipv6(groups, zone: zone), port: UInt16(port)))
            }
            if hostBytes.allSatisfy({ (0x30...0x39).contains($0) || $0 == UInt8(ascii: ".") }) {
                guard let b = parseIPv4(hostBytes) else {
                    return .failure(Problem(message: "has an invalid IPv4 address '\(hostString)'",
                                            fix: "write four numbers from 0 to 255 without leading zeros, e.g. 192.0.2.10"))
                }
                return .success(Address(host: .ipv4(b), port: UInt16(port)))
            }
            guard isHostName(hostBytes) else {
                return .failure(Problem(message: "has an invalid host name '\(hostString)'",
                                        fix: "host names use letters, digits, '-' and '.' (labels of 1 to 63)"))
            }
            return .success(Address(host: .name(hostString.lowercased()), port: UInt16(port)))
        }

        private static func isBareByte(_ b: UInt8) -> Bool {
            switch b {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
                return true
            default:
                return false
            }
        }

        /// RFC 1123 names: labels of 1 to 63 letters, digits and inner hyphens; 253 bytes at most.
        static func isHostName(_ bytes: ArraySlice<UInt8>) -> Bool {
            guard bytes.count <= 253 else { return false }
            let hyphen = UInt8(ascii: "-")
            for label in bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
                guard (1...63).contains(label.count), label.first != hyphen, label.last != hyphen,
                      label.allSatisfy({ isBareByte($0) && $0 != UInt8(ascii: "_") })
                else { return false }
            }
            return true
        }

        /// Dotted quad, each part 0...255 without leading zeros (which some parsers read as octal).
        static func parseIPv4(_ bytes: ArraySlice<UInt8>) -> [UInt8]? {
            let parts = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
            guard parts.count == 4 else { return nil }
            var out: [UInt8] = []
            for part in parts {
                guard (1...3).contains(part.count), part.allSatisfy({ (0x30...0x39).contains($0) }),
                      part.count == 1 || part.first != UInt8(ascii: "0")
                else { return nil }
                let value = part.reduce(0) { $0 * 10 + Int($1 - 0x30) }
                guard value <= 255 else { return nil }
                out.append(UInt8(value))
            }
            return out
        }

        /// RFC 4291 section 2.2 text: groups of 1 to 4 hex digits, one "::", an IPv4 tail.
        static func parseIPv6(_ input: ArraySlice<UInt8>) -> [UInt16]? {
            let colon = UInt8(ascii: ":")
            var bytes = Array(input)
            var tail: [UInt16] = []
            if bytes.contains(UInt8(ascii: ".")) {
                guard let last = bytes.lastIndex(of: colon), let v4 = parseIPv4(bytes[(last + 1)...]) else {
                    return nil
                }
                tail = [UInt16(v4[0]) << 8 | UInt16(v4[1]), UInt16(v4[2]) << 8 | UInt16(v4[3])]
                bytes.removeSubrange((last + 1)...)
                // Keep a "::" before the IPv4 part; drop a lone separating ':'.
                if !(bytes.count >= 2 && bytes[bytes.count - 2] == colon) { bytes.removeLast() }
            }
            var doubleColon: Int?
            if bytes.count >= 2 {
                for k in 0..<(bytes.count - 1) where bytes[k] == colon && bytes[k + 1] == colon {
                    if doubleColon != nil { return nil }
                    doubleColon = k
                }
            }
            func groups(_ part: ArraySlice<UInt8>) -> [UInt16]? {
                if part.isEmpty { return [] }
                var out: [UInt16] = []
                for field in part.split(separator: colon, omittingEmptySubsequences: false) {
                    guard (1...4).contains(field.count) else { return nil }
                    var value: UInt16 = 0
                    for b in field {
                        let digit: UInt8
                        switch b {
                        case 0x30...0x39: digit = b - 0x30
                        case 0x61...0x66: digit = b - 0x61 + 10
                        case 0x41...0x46: digit = b - 0x41 + 10
                        default: return nil
                        }
                        value = value << 4 | UInt16(digit)
                    }
                    out.append(value)
                }
                return out
            }
            if let dc = doubleColon {
                guard let head = groups(bytes[..<dc]), let rest = groups(bytes[(dc + 2)...]) else { return nil }
                let count = head.count + rest.count + tail.count
                guard count <= 7 else { return nil }
                return head + Array(repeating: 0, count: 8 - count) + rest + tail
            }
            guard let all = groups(bytes[...]), all.count + tail.count == 8 else { return nil }
            return all + tail
        }

        /// RFC 5952 text: lowercase, no leading zeros, the longest run of two or more zero
        /// groups (the first of equals) as "::".
        static func ipv6Text(_ groups: [UInt16]) -> String {
            var bestStart = -1, bestLength = 0
            var k = 0
            while k < groups.count {
                if groups[k] == 0 {
                    var end = k
                    while end < groups.count && groups[end] == 0 { end += 1 }
                    if end - k > bestLength {
                        bestStart = k
                        bestLength = end - k
                    }
                    k = end
                } else {
                    k += 1
                }
            }
            let hex = groups.map { String($0, radix: 16) }
            guard bestLength >= 2 else { return hex.joined(separator: ":") }
            let head = hex[..<bestStart].joined(separator: ":")
            let tail = hex[(bestStart + bestLength)...].joined(separator: ":")
            return head + "::" + tail
        }
    }
}

// MARK: - Validation

/// One `[tuning]` key: how it reads, its bounds, and where it goes.
private struct TuningKey {
    let name: String
    let isSize: Bool
    let range: ClosedRange<Int>
    let powerOfTwo: Bool
    let field: WritableKeyPath<ResourceConfig.Tuning, Int>

    typealias T = ResourceConfig.Tuning

    static var all: [TuningKey] {
        [
            TuningKey(name: "bitmap-granularity", isSize: true, range: T.bitmapGranularityBytesRange,
                      powerOfTwo: true, field: \.bitmapGranularityBytes),
            TuningKey(name: "activity-log-extents", isSize: false, range: T.activityLogExtentsRange,
                      powerOfTwo: false, field: \.activityLogExtents),
            TuningKey(name: "activity-log-extent-size", isSize: true, range: T.activityLogExtentBytesRange,
                      powerOfTwo: true, field: \.activityLogExtentBytes),
            TuningKey(name: "resync-rate-min", isSize: true, range: T.resyncBytesPerSecondMinRange,
                      powerOfTwo: false, field: \.resyncBytesPerSecondMin),
            TuningKey(name: "resync-rate-max", isSize: true, range: T.resyncBytesPerSecondMaxRange,
                      powerOfTwo: false, field: \.resyncBytesPerSecondMax),
            TuningKey(name: "ping-interval-ms", isSize: false, range: T.pingIntervalMillisRange,
                      powerOfTwo: false, field: \.pingIntervalMillis),
            TuningKey(name: "peer-timeout-ms", isSize: false, range: T.peerTimeoutMillisRange,
                      powerOfTwo: false, field: \.peerTimeoutMillis),
            TuningKey(name: "connect-retry-ms", isSize: false, range: T.connectRetryMillisRange,
                      powerOfTwo: false, field: \.connectRetryMillis),
            TuningKey(name: "max-buffers", isSize: false, range: T.buffersMaxRange,
                      powerOfTwo: false, field: \.buffersMax),
            TuningKey(name: "poll-us", isSize: false, range: T.pollMicrosRange,
                      powerOfTwo: false, field: \.pollMicros),
            TuningKey(name: "nbd-send-buffer", isSize: true, range: T.sendBufferBytesRange,
                      powerOfTwo: false, field: \.nbdSendBufferBytes),
            TuningKey(name: "link-send-buffer", isSize: true, range: T.sendBufferBytesRange,
                      powerOfTwo: false, field: \.linkSendBufferBytes),
        ]
    }

    func text(_ value: Int) -> String {
        isSize ? ResourceConfig.sizeText(value) : String(value)
    }

    /// As written in a fix: sizes in quotes.
    func literal(_ value: Int) -> String {
        isSize ? TOML.quoted(ResourceConfig.sizeText(value)) : String(value)
    }

    /// The allowed value nearest to `value`.
    func nearest(_ value: Int) -> Int {
        let clamped = min(max(value, range.lowerBound), range.upperBound)
        guard powerOfTwo else { return clamped }
        var below = range.lowerBound
        while below * 2 <= clamped { below *= 2 }
        let above = below * 2
        return above <= range.upperBound && above - clamped < clamped - below ? above : below
    }
}

/// Where each known key belongs, for "unknown key" messages.
private enum Section: Equatable {
    case top, tls, tuning, failover, barriers, handlers, node

    var title: String {
        switch self {
        case .top: return "the top level"
        case .tls: return "[tls]"
        case .tuning: return "[tuning]"
        case .failover: return "[failover]"
        case .barriers: return "[barriers]"
        case .handlers: return "[handlers]"
        case .node: return "[[node]]"
        }
    }

    /// "at the top level", "in [tls]".
    var place: String { self == .top ? "at the top level" : "in \(title)" }

    var keys: [String] {
        switch self {
        case .top: return ["resource", "tls", "tuning", "failover", "barriers", "handlers", "node"]
        case .tls: return ["ca"]
        case .tuning: return TuningKey.all.map(\.name)
        case .failover: return ["after-split-brain", "auto-promote"]
        case .barriers: return ["interval-minutes", "keep", "keep-hours", "keep-space", "chunk-size"]
        case .handlers: return ResourceConfig.HandlerEvent.allCases.map(\.rawValue)
        case .node: return ["name", "id", "role", "address", "device", "metadata", "nbd", "control", "cert", "key", "undo", "metrics"]
        }
    }

    static let all: [Section] = [.top, .tls, .tuning, .failover, .barriers, .handlers, .node]
}

/// A key's value, as far as it could be read.
private enum Field<Value> {
    case absent
    /// Present but wrong; already reported.
    case invalid
    case present(Value, TOMLTable.Entry)

    var value: Value? {
        if case .present(let v, _) = self { return v }
        return nil
    }

    var entry: TOMLTable.Entry? {
        if case .present(_, let e) = self { return e }
        return nil
    }
}

/// A `[[node]]` as far as it could be read, for the checks across nodes.
private struct NodeDraft {
    var line: Int
    var column: Int
    var complete = true
    var name: String?
    var id: Field<Int> = .absent
    var role: ResourceConfig.Role?
    var address: Field<ResourceConfig.Address> = .absent
    var device: Field<String> = .absent
    var metadata: Field<String> = .absent
    var nbd: Field<ResourceConfig.Address> = .absent
    var control: Field<String> = .absent
    var controlPath: String?
    var cert: Field<String> = .absent
    var key: Field<String> = .absent
    var undo: Field<String> = .absent
    var metrics: Field<ResourceConfig.Address> = .absent
    var entries: [String: TOMLTable.Entry] = [:]

    var label: String { name.map { "[[node]] '\($0)'" } ?? "[[node]]" }
    var who: String { name.map { "node '\($0)'" } ?? "the node on line \(line)" }
}

private struct ConfigValidator {
    let path: String
    var errors: [ConfigError] = []
    var positions: [String: ResourceConfig.Position] = [:]

    init(path: String) {
        self.path = path
    }

    mutating func report(_ line: Int, _ column: Int, _ message: String, fix: String) {
        errors.append(ConfigError(path: path, line: line, column: column, message: message, fix: fix))
    }

    mutating func report(_ entry: TOMLTable.Entry, _ message: String, fix: String) {
        report(entry.line, entry.column, message, fix: fix)
    }

    static let examples: [String: String] = [
        "resource": "\"r0\"", "ca": "\"/etc/tandem/pki/ca-cert.pem\"",
        "name": "\"alpha\"", "id": "0", "role": "\"data\"", "address": "\"192.0.2.10:7788\"",
        "device": "\"/var/lib/tandem/r0.img\"", "metadata": "\"/var/lib/tandem/r0.meta\"",
        "nbd": "\"127.0.0.1:10809\"", "control": "\"/run/tandem/r0-alpha.sock\"",
        "cert": "\"/etc/tandem/pki/alpha-cert.pem\"", "key": "\"/etc/tandem/pki/alpha-key.pem\"",
        "after-split-brain": "\"disconnect\"", "auto-promote": "true", "undo": "\"/var/lib/tandem/r0.undo\"",
        "metrics": "\"127.0.0.1:9942\"", "interval-minutes": "60", "keep": "24", "keep-hours": "72", "keep-space": "\"10GiB\"", "chunk-size": "\"64KiB\"",
        "role-change": "\"/etc/tandem/handlers/notify\"", "split-brain": "\"/etc/tandem/handlers/notify\"",
        "peer-lost": "\"/etc/tandem/handlers/notify\"", "resync-done": "\"/etc/tandem/handlers/notify\"",
        "quorum-lost": "\"/etc/tandem/handlers/notify\"",
    ]

    static func example(_ key: String) -> String {
        if let e = examples[key] { return e }
        if let t = TuningKey.all.first(where: { $0.name == key }) {
            return t.literal(ResourceConfig.Tuning()[keyPath: t.field])
        }
        return "..."
    }

    // MARK: Keys and types

    mutating func checkKeys(_ table: TOMLTable, in section: Section) {
        let known = section.keys
        for entry in table.entries where !known.contains(entry.key) {
            let key = TOML.key(entry.key)
            // An unknown table reads better as the header it was written as.
            var shown = "key '\(key)'"
            var bracket: (String, String) = ("'", "'")
            if section == .top, entry.value.table != nil {
                (shown, bracket) = ("table [\(key)]", ("[", "]"))
            } else if section == .top, let a = entry.value.array, !a.isEmpty, a.allSatisfy({ $0.table != nil }) {
                (shown, bracket) = ("table [[\(key)]]", ("[[", "]]"))
            }
            if let home = Section.all.first(where: { $0 != section && $0.keys.contains(entry.key) }) {
                let fix = home == .top
                    ? "move it above the first [table] header: keys after a header belong to that table"
                    : "move it into \(home.title)"
                report(entry, "\(shown) belongs \(home.place), not \(section.place)", fix: fix)
            } else if let near = ResourceConfig.closest(to: entry.key, in: known) {
                let nearShown = bracket.0 + near + bracket.1
                report(entry, "unknown \(shown) \(section.place); did you mean \(nearShown)?",
                       fix: "rename \(bracket.0 + key + bracket.1) to \(nearShown)")
            } else {
                report(entry, "unknown \(shown) \(section.place)",
                       fix: "remove it; the keys \(section.place) are \(known.joined(separator: ", "))")
            }
        }
    }

    mutating func wrongType(_ entry: TOMLTable.Entry, expected: String) {
        let key = TOML.key(entry.key)
        var fix = "write \(key) = \(Self.example(entry.key))"
        if expected == "an integer", let s = entry.value.string, Int(s) != nil {
            fix = "remove the quotes: \(key) = \(s)"
        } else if expected == "a string", let n = entry.value.integer {
            fix = "put it in quotes: \(key) = \"\(n)\""
        }
        report(entry, "'\(key)' must be \(expected), got \(entry.value.typeDescription)", fix: fix)
    }

    mutating func string(_ table: TOMLTable, _ key: String) -> Field<String> {
        guard let entry = table.entry(key) else { return .absent }
        guard let s = entry.value.string else {
            wrongType(entry, expected: "a string")
            return .invalid
        }
        return .present(s, entry)
    }

    mutating func integer(_ table: TOMLTable, _ key: String) -> Field<Int> {
        guard let entry = table.entry(key) else { return .absent }
        guard let n = entry.value.integer else {
            wrongType(entry, expected: "an integer")
            return .invalid
        }
        return .present(Int(n), entry)
    }

    mutating func size(_ table: TOMLTable, _ key: String) -> Field<Int> {
        guard let entry = table.entry(key) else { return .absent }
        switch entry.value.kind {
        case .integer(let n):
            guard n >= 0 else {
                report(entry, "'\(key)' is negative (\(n))", fix: "sizes are 0 or more")
                return .invalid
            }
            return .present(Int(n), entry)
        case .string(let s):
            switch ResourceConfig.parseSize(s) {
            case .success(let bytes):
                return .present(bytes, entry)
            case .failure(let problem):
                report(entry, "'\(key)' \(problem.message)", fix: problem.fix)
                return .invalid
            }
        default:
            wrongType(entry, expected: "a size (bytes, or a string such as \"4KiB\")")
            return .invalid
        }
    }

    /// A path (absolute, short enough, no control characters).
    mutating func pathField(_ table: TOMLTable, _ key: String, bytesMax: Int = ResourceConfig.pathBytesMax) -> Field<String> {
        let field = string(table, key)
        guard case .present(let s, let entry) = field else { return field }
        if let problem = ResourceConfig.pathProblem(s, bytesMax: bytesMax) {
            let limit = bytesMax == ResourceConfig.socketPathBytesMax ? " (a Unix socket path)" : ""
            report(entry, "'\(key)' \(problem.message)\(limit)", fix: problem.fix)
            return .invalid
        }
        return field
    }

    mutating func addressField(_ table: TOMLTable, _ key: String, examplePort: Int) -> Field<ResourceConfig.Address> {
        switch string(table, key) {
        case .absent: return .absent
        case .invalid: return .invalid
        case .present(let s, let entry):
            switch ResourceConfig.Address.parse(s, examplePort: examplePort) {
            case .success(let address):
                return .present(address, entry)
            case .failure(let problem):
                report(entry, "'\(key)' \(TOML.quoted(s)) \(problem.message)", fix: problem.fix)
                return .invalid
            }
        }
    }

    /// A table-valued key (`[tls]`); reports `[[tls]]` and scalars.
    mutating func table(_ entry: TOMLTable.Entry) -> TOMLTable? {
        if let t = entry.value.table { return t }
        let key = TOML.key(entry.key)
        if let a = entry.value.array, !a.isEmpty, a.allSatisfy({ $0.table != nil }) {
            report(entry, "'\(key)' must be a single table, not an array of tables",
                   fix: "write [\(key)] (one pair of brackets) once")
        } else {
            report(entry, "'\(key)' must be a table, got \(entry.value.typeDescription)",
                   fix: "write a [\(key)] header and its keys on the lines below it")
        }
        return nil
    }

    /// `node` makes a node's example its own ("beta-cert.pem", not "alpha-cert.pem").
    mutating func missing(_ key: String, in label: String, line: Int, column: Int, node: String? = nil) {
        var example = Self.example(key)
        if let node, key != "name" { example = example.replacing("alpha", with: node) }
        report(line, column, "\(label) is missing '\(key)'", fix: "add \(key) = \(example)")
    }

    // MARK: Resource

    mutating func resource(_ root: TOMLTable) -> ResourceConfig? {
        checkKeys(root, in: .top)
        var ok = true

        var name: String?
        switch string(root, "resource") {
        case .absent:
            ok = false
            report(1, 1, "missing 'resource' (the resource's name)",
                   fix: "add resource = \"r0\" at the top of the file, above the first [table]")
        case .invalid:
            ok = false
        case .present(let s, let entry):
            if let problem = ResourceConfig.nameProblem(s) {
                ok = false
                report(entry, "resource name \(TOML.quoted(s)) \(problem)",
                       fix: "write resource = \(TOML.quoted(ResourceConfig.suggestedName(s, fallback: "r0")))")
            } else {
                name = s
                positions["resource"] = .init(line: entry.line, column: entry.column)
            }
        }

        var caPath: String?
        if let entry = root.entry("tls") {
            if let t = table(entry) {
                checkKeys(t, in: .tls)
                switch pathField(t, "ca") {
                case .absent:
                    missing("ca", in: "[tls]", line: t.line, column: t.column)
                case .invalid:
                    break
                case .present(let s, let e):
                    caPath = s
                    positions["tls.ca"] = .init(line: e.line, column: e.column)
                }
            }
        } else {
            report(1, 1, "missing [tls] (nodes authenticate each other with certificates)",
                   fix: "add a [tls] table with ca = \(Self.example("ca"))")
        }
        ok = ok && caPath != nil

        var tuning = ResourceConfig.Tuning()
        if let entry = root.entry("tuning") {
            if let t = table(entry) {
                ok = tuningTable(t, into: &tuning) && ok
            } else {
                ok = false
            }
        }

        var failover = ResourceConfig.Failover()
        if let entry = root.entry("failover") {
            if let t = table(entry) {
                checkKeys(t, in: .failover)
                switch string(t, "after-split-brain") {
                case .present(let text, let e):
                    if let policy = SplitBrainPolicy(rawValue: text) {
                        failover.afterSplitBrain = policy
                    } else {
                        ok = false
                        let names = SplitBrainPolicy.allCases.map { TOML.quoted($0.rawValue) }.joined(separator: ", ")
                        report(e, "'after-split-brain' \(TOML.quoted(text)) is not a policy", fix: "write one of \(names)")
                    }
                case .invalid: ok = false
                case .absent: break
                }
                if let e = t.entry("auto-promote") {
                    if let b = e.value.boolean { failover.autoPromote = b } else {
                        ok = false
                        report(e, "'auto-promote' must be a boolean, got \(e.value.typeDescription)", fix: "write auto-promote = true or false")
                    }
                }
            } else {
                ok = false
            }
        }
        var barriers = ResourceConfig.Barriers()
        if let entry = root.entry("barriers") {
            if let t = table(entry) {
                checkKeys(t, in: .barriers)
                let ints: [(String, WritableKeyPath<ResourceConfig.Barriers, Int>, ClosedRange<Int>)] = [
                    ("interval-minutes", \.intervalMinutes, 0...10_080), ("keep", \.keep, 1...Limits.barriersRetainedMax), ("keep-hours", \.keepHours, 0...87_600),
                ]
                for (key, path, range) in ints {
                    switch integer(t, key) {
                    case .present(let n, let e):
                        if range.contains(n) { barriers[keyPath: path] = n } else {
                            ok = false
                            report(e, "'\(key)' must be from \(range.lowerBound) to \(range.upperBound), got \(n)", fix: "write \(key) = \(min(max(n, range.lowerBound), range.upperBound))")
                        }
                    case .invalid: ok = false
                    case .absent: break
                    }
                }
                switch size(t, "keep-space") {
                case .present(let n, _): barriers.keepBytes = n
                case .invalid: ok = false
                case .absent: break
                }
                switch size(t, "chunk-size") {
                case .present(let n, let e):
                    if n >= Limits.undoChunkBytesMin && n <= Limits.undoChunkBytesMax && n & (n - 1) == 0 { barriers.chunkBytes = n } else {
                        ok = false
                        report(e, "'chunk-size' must be a power of two from \(Limits.undoChunkBytesMin) to \(Limits.undoChunkBytesMax) bytes, got \(n)", fix: "write chunk-size = \"64KiB\"")
                    }
                case .invalid: ok = false
                case .absent: break
                }
            } else {
                ok = false
            }
        }
        var handlers: [ResourceConfig.HandlerEvent: String] = [:]
        if let entry = root.entry("handlers") {
            if let t = table(entry) {
                checkKeys(t, in: .handlers)
                for event in ResourceConfig.HandlerEvent.allCases {
                    switch pathField(t, event.rawValue) {
                    case .present(let path, let e):
                        handlers[event] = path
                        positions["handlers.\(event.rawValue)"] = .init(line: e.line, column: e.column)
                    case .invalid: ok = false
                    case .absent: break
                    }
                }
            } else {
                ok = false
            }
        }

        var drafts: [NodeDraft] = []
        if let entry = root.entry("node") {
            switch entry.value.kind {
            case .array(let elements):
                for element in elements {
                    guard let t = element.table else {
                        report(element.line, element.column,
                               "each node must be a table, got \(element.typeDescription)",
                               fix: "write each node as a [[node]] section")
                        ok = false
                        continue
                    }
                    drafts.append(node(t, resource: name))
                }
            case .table:
                ok = false
                report(entry, "[node] defines a single table; nodes are an array of tables",
                       fix: "write [[node]] (two pairs of brackets) before each node")
            default:
                ok = false
                wrongType(entry, expected: "an array of tables ([[node]] sections)")
            }
        } else {
            ok = false
            report(1, 1, "no [[node]] sections; a resource has \(ResourceConfig.dataNodeCount) data nodes",
                   fix: "add a [[node]] section for each node (see Protocol/resource-file.md)")
        }
        ok = acrossNodes(drafts) && ok
        ok = ok && drafts.allSatisfy(\.complete)

        guard ok, let name, let caPath else { return nil }
        var nodes: [ResourceConfig.Node] = []
        for d in drafts {
            guard let nodeName = d.name, let id = d.id.value, let role = d.role, let address = d.address.value,
                  let control = d.controlPath, let cert = d.cert.value, let key = d.key.value
            else { preconditionFailure("a complete node draft lacks a field") }
            nodes.append(ResourceConfig.Node(
                name: nodeName, id: id, role: role, address: address, devicePath: d.device.value,
                metadataPath: d.metadata.value, nbd: d.nbd.value, controlPath: control, certPath: cert,
                keyPath: key))
            nodes[nodes.count - 1].undoPath = d.undo.value
            nodes[nodes.count - 1].metrics = d.metrics.value
            positions["node.\(nodeName)"] = .init(line: d.line, column: d.column)
            for (key, entry) in d.entries {
                positions["node.\(nodeName).\(key)"] = .init(line: entry.line, column: entry.column)
            }
        }
        var config = ResourceConfig(name: name, tls: .init(caPath: caPath), tuning: tuning, nodes: nodes, path: path)
        config.failover = failover
        config.handlers = handlers
        config.barriers = barriers
        config.positions = positions
        return config
    }

    // MARK: Tuning

    /// Reads `[tuning]` into `tuning`; false if anything was wrong.
    mutating func tuningTable(_ table: TOMLTable, into tuning: inout ResourceConfig.Tuning) -> Bool {
        checkKeys(table, in: .tuning)
        var ok = true
        var entries: [String: TOMLTable.Entry] = [:]
        var invalid: Set<String> = []
        for key in TuningKey.all {
            let field = key.isSize ? size(table, key.name) : integer(table, key.name)
            switch field {
            case .absent:
                continue
            case .invalid:
                ok = false
                invalid.insert(key.name)
            case .present(let value, let entry):
                entries[key.name] = entry
                positions["tuning.\(key.name)"] = .init(line: entry.line, column: entry.column)
                let inRange = key.range.contains(value) && (!key.powerOfTwo || value & (value - 1) == 0)
                if inRange {
                    tuning[keyPath: key.field] = value
                } else {
                    ok = false
                    invalid.insert(key.name)
                    let what = key.powerOfTwo ? "a power of two from" : "from"
                    report(entry,
                           "'\(key.name)' must be \(what) \(key.text(key.range.lowerBound)) to "
                               + "\(key.text(key.range.upperBound)), got \(key.text(value))",
                           fix: "write \(key.name) = \(key.literal(key.nearest(value)))")
                }
            }
        }

        // Relations, only between values that were themselves valid (or defaults).
        if invalid.isDisjoint(with: ["ping-interval-ms", "peer-timeout-ms"]),
           tuning.peerTimeoutMillis <= tuning.pingIntervalMillis {
            ok = false
            let at = entries["peer-timeout-ms"] ?? entries["ping-interval-ms"]
            let suggestion = min(tuning.pingIntervalMillis * 6, ResourceConfig.Tuning.peerTimeoutMillisRange.upperBound)
            report(at?.line ?? table.line, at?.column ?? table.column,
                   "'peer-timeout-ms' (\(tuning.peerTimeoutMillis)) must be greater than 'ping-interval-ms' "
                       + "(\(tuning.pingIntervalMillis)): a peer would time out between two pings",
                   fix: "write peer-timeout-ms = \(suggestion) (several ping intervals)")
        }
        if invalid.isDisjoint(with: ["resync-rate-min", "resync-rate-max"]),
           tuning.resyncBytesPerSecondMin > tuning.resyncBytesPerSecondMax {
            ok = false
            let at = entries["resync-rate-min"] ?? entries["resync-rate-max"]
            report(at?.line ?? table.line, at?.column ?? table.column,
                   "'resync-rate-min' (\(ResourceConfig.sizeText(tuning.resyncBytesPerSecondMin))) is more than "
                       + "'resync-rate-max' (\(ResourceConfig.sizeText(tuning.resyncBytesPerSecondMax)))",
                   fix: "write resync-rate-min = \(TOML.quoted(ResourceConfig.sizeText(tuning.resyncBytesPerSecondMax))) or less")
        }
        return ok
    }

    // MARK: Nodes

    mutating func node(_ table: TOMLTable, resource: String?) -> NodeDraft {
        checkKeys(table, in: .node)
        var d = NodeDraft(line: table.line, column: table.column)
        for entry in table.entries { d.entries[entry.key] = entry }

        switch string(table, "name") {
        case .absent:
            d.complete = false
            missing("name", in: "[[node]]", line: d.line, column: d.column)
        case .invalid:
            d.complete = false
        case .present(let s, let entry):
            if let problem = ResourceConfig.nameProblem(s) {
                d.complete = false
                report(entry, "node name \(TOML.quoted(s)) \(problem)",
                       fix: "write name = \(TOML.quoted(ResourceConfig.suggestedName(s, fallback: "alpha")))")
            } else {
                d.name = s
            }
        }

        d.id = integer(table, "id")
        if case .absent = d.id { missing("id", in: d.label, line: d.line, column: d.column, node: d.name) }
        if case .present(let id, let entry) = d.id, !ResourceConfig.nodeIDs.contains(id) {
            report(entry, "'id' must be from \(ResourceConfig.nodeIDs.lowerBound) to \(ResourceConfig.nodeIDs.upperBound), got \(id)",
                   fix: "use an id from \(ResourceConfig.nodeIDs.lowerBound) to \(ResourceConfig.nodeIDs.upperBound) that no other node has")
            d.id = .invalid
        }

        switch string(table, "role") {
        case .absent:
            d.role = .data
        case .invalid:
            break
        case .present(let s, let entry):
            if let role = ResourceConfig.Role(rawValue: s) {
                d.role = role
            } else {
                let roles = ResourceConfig.Role.allCases.map(\.rawValue)
                let near = ResourceConfig.closest(to: s, in: roles).map { "; did you mean \"\($0)\"?" } ?? ""
                report(entry, "'role' must be \"data\" or \"witness\", got \(TOML.quoted(s))\(near)",
                       fix: "write role = \"\(ResourceConfig.closest(to: s, in: roles) ?? "data")\", or leave it out for a data node")
            }
        }

        d.address = addressField(table, "address", examplePort: 7788)
        if case .present(let address, let entry) = d.address, address.isWildcard {
            report(entry, "'address' \(address) is a wildcard; peers need an address they can connect to",
                   fix: "write this node's own IP address or host name, e.g. \(Self.example("address"))")
            d.address = .invalid
        }
        let label = d.label
        if case .absent = d.address { missing("address", in: label, line: d.line, column: d.column, node: d.name) }

        for key in ["device", "metadata", "nbd"] {
            let present = table.entry(key)
            if d.role == .witness {
                if let entry = present {
                    report(entry, "a witness has no '\(key)' (it stores no data)",
                           fix: "remove '\(key)', or remove role = \"witness\" to make this a data node")
                    d.complete = false
                }
                continue
            }
            switch key {
            case "device": d.device = pathField(table, key)
            case "metadata": d.metadata = pathField(table, key)
            default: d.nbd = addressField(table, key, examplePort: 10809)
            }
            if present == nil && d.role == .data {
                missing(key, in: label, line: d.line, column: d.column, node: d.name)
                d.complete = false
            }
        }
        d.metrics = addressField(table, "metrics", examplePort: 9942)
        if let entry = table.entry("undo") {
            if d.role == .witness {
                report(entry, "a witness has no 'undo' (it stores no data)", fix: "remove 'undo'")
                d.complete = false
            } else {
                d.undo = pathField(table, "undo")
            }
        }
        if case .present(let device, _) = d.device, case .present(let metadata, let entry) = d.metadata,
           device == metadata {
            report(entry, "'metadata' is the same file as 'device' (\(device))",
                   fix: "keep metadata in a file of its own, e.g. \(TOML.quoted(device + ".meta"))")
            d.metadata = .invalid
        }

        d.control = pathField(table, "control", bytesMax: ResourceConfig.socketPathBytesMax)
        switch d.control {
        case .present(let s, _):
            d.controlPath = s
        case .absent:
            if let resource, let name = d.name {
                let path = ResourceConfig.controlPathDefault(resource: resource, node: name)
                if path.utf8.count > ResourceConfig.socketPathBytesMax {
                    report(d.line, d.column,
                           "the default control socket \(path) is \(path.utf8.count) bytes; "
                               + "a Unix socket path holds at most \(ResourceConfig.socketPathBytesMax)",
                           fix: "add control = \"/run/tandem/SHORT.sock\" to \(label)")
                } else {
                    d.controlPath = path
                }
            }
        case .invalid:
            break
        }

        d.cert = pathField(table, "cert")
        if case .absent = d.cert { missing("cert", in: label, line: d.line, column: d.column, node: d.name) }
        d.key = pathField(table, "key")
        if case .absent = d.key { missing("key", in: label, line: d.line, column: d.column, node: d.name) }

        let fields: [Bool] = [
            d.name != nil, d.id.value != nil, d.role != nil, d.address.value != nil, d.controlPath != nil,
            d.cert.value != nil, d.key.value != nil,
        ]
        let dataFields = d.role != .data
            || (d.device.value != nil && d.metadata.value != nil && d.nbd.value != nil)
        d.complete = d.complete && fields.allSatisfy { $0 } && dataFields
        return d
    }

    /// Counts, uniqueness, and collisions between nodes on one host. False if anything is wrong.
    mutating func acrossNodes(_ drafts: [NodeDraft]) -> Bool {
        let errorsBefore = errors.count
        // A role that could not be read would make any count misleading.
        if !drafts.isEmpty && drafts.allSatisfy({ $0.role != nil }) {
            let data = drafts.filter { $0.role == .data }
            let witnesses = drafts.filter { $0.role == .witness }
            if data.count > ResourceConfig.dataNodeCount {
                for (n, extra) in data.enumerated().dropFirst(ResourceConfig.dataNodeCount) {
                    report(extra.line, extra.column,
                           "a resource has exactly \(ResourceConfig.dataNodeCount) data nodes; \(extra.who) is data node \(n + 1)",
                           fix: "remove this [[node]], or make it a witness: role = \"witness\", without device, metadata and nbd")
                }
            } else if data.count < ResourceConfig.dataNodeCount {
                let first = data.first ?? drafts[0]
                report(first.line, first.column,
                       "a resource has exactly \(ResourceConfig.dataNodeCount) data nodes; this file has \(data.count)",
                       fix: "add a [[node]] with device, metadata and nbd")
            }
            if witnesses.count > ResourceConfig.witnessCountMax {
                for extra in witnesses[ResourceConfig.witnessCountMax...] {
                    report(extra.line, extra.column,
                           "a resource has at most \(ResourceConfig.witnessCountMax) witness; the first is on line \(witnesses[0].line)",
                           fix: "remove this [[node]]")
                }
            }
        }

        var names: [String: NodeDraft] = [:]
        var ids: [Int: NodeDraft] = [:]
        for d in drafts {
            if let name = d.name {
                if let first = names[name] {
                    let at = d.entries["name"]!
                    report(at, "node name '\(name)' is used twice (first on line \(first.entries["name"]!.line))",
                           fix: "give each node its own name")
                } else {
                    names[name] = d
                }
            }
            if case .present(let id, let at) = d.id {
                if let first = ids[id] {
                    report(at, "node id \(id) is used twice (first by \(first.who) on line \(first.entries["id"]!.line))",
                           fix: "give this node an unused id, e.g. \(firstUnusedID(drafts) ?? 0)")
                } else {
                    ids[id] = d
                }
            }
        }

        // Nodes whose replication addresses share a host run on one machine: there, listeners,
        // control sockets and files must not collide. (On different hosts the same nbd address
        // or control path is normal.) Only a bounded number of nodes is compared pairwise.
        let compared = drafts.prefix(ResourceConfig.nodeIDs.count)
        for (j, b) in compared.enumerated() {
            if case .present(let address, _) = b.address, case .present(let nbd, let at) = b.nbd,
               address.mayCollide(with: nbd) {
                report(at, "'nbd' \(nbd) is the same listener as this node's 'address' \(address)",
                       fix: "give nbd another port, e.g. \(TOML.quoted(Self.withPort(nbd, 10809 == address.port ? 10810 : 10809)))")
            }
            for a in compared.prefix(j) {
                guard let hostA = a.address.value, let hostB = b.address.value,
                      hostA.host == hostB.host || (hostA.isLoopback && hostB.isLoopback)
                else { continue }
                let same = "\(a.who) (line \(a.line)), on the same host"
                let listenersA: [(String, ResourceConfig.Address)] =
                    [("address", hostA)] + (a.nbd.value.map { [("nbd", $0)] } ?? [])
                for (keyB, field) in [("address", b.address), ("nbd", b.nbd)] {
                    guard case .present(let listener, let at) = field else { continue }
                    for (keyA, other) in listenersA where listener.mayCollide(with: other) {
                        let port = Self.freePort(after: listener.port, drafts: Array(compared))
                        report(at, "'\(keyB)' \(listener) is also the '\(keyA)' of \(same)",
                               fix: "give this node another port, e.g. \(TOML.quoted(Self.withPort(listener, port)))")
                    }
                }
                if let pathA = a.controlPath, let pathB = b.controlPath, pathA == pathB {
                    let example = TOML.quoted("/run/tandem/\(b.name ?? "beta").sock")
                    if let at = b.control.entry {
                        report(at, "'control' \(pathB) is also the control socket of \(same)",
                               fix: "give each node its own socket, e.g. \(example)")
                    } else {
                        report(b.line, b.column, "the default control socket \(pathB) of \(b.who) is also the control socket of \(same)",
                               fix: "give each node its own socket: add control = \(example) or change the other node's")
                    }
                }
                let filesA = [("device", a.device.value), ("metadata", a.metadata.value)]
                for (keyB, field) in [("device", b.device), ("metadata", b.metadata)] {
                    guard case .present(let file, let at) = field else { continue }
                    for (keyA, other) in filesA where other == file {
                        report(at, "'\(keyB)' \(file) is also the '\(keyA)' of \(same); both nodes would write it",
                               fix: "give each node its own file")
                    }
                }
            }
        }
        return errors.count == errorsBefore
    }

    private func firstUnusedID(_ drafts: [NodeDraft]) -> Int? {
        let used = Set(drafts.compactMap { $0.id.value })
        return ResourceConfig.nodeIDs.first { !used.contains($0) }
    }

    private static func withPort(_ address: ResourceConfig.Address, _ port: Int) -> String {
        var copy = address
        copy.port = UInt16(clamping: port)
        return copy.description
    }

    /// A port after `port` that no node uses.
    private static func freePort(after port: UInt16, drafts: [NodeDraft]) -> Int {
        let used = Set(drafts.flatMap { [$0.address.value?.port, $0.nbd.value?.port].compactMap { $0 } })
        var candidate = Int(port) + 1
        while candidate <= 65535 && used.contains(UInt16(candidate)) { candidate += 1 }
        return candidate <= 65535 ? candidate : 1024
    }
}
