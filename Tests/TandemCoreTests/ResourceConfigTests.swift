import Testing
import TandemCore

/// The resource file model: the valid example, every kind of validation error with its line and
/// fix, file checks through a fake file system, and random mutations that must never crash.
@Suite struct ResourceConfigTests {
    /// The example of Protocol/resource-file.md, one string per line (line n is `exampleLines[n - 1]`).
    static let exampleLines: [String] = [
        "# Resource r0: two data nodes and a witness.",    // 1
        "resource = \"r0\"",                               // 2
        "",                                                // 3
        "[tls]",                                           // 4
        "ca = \"/etc/tandem/pki/ca-cert.pem\"",            // 5
        "",                                                // 6
        "[tuning]",                                        // 7
        "bitmap-granularity = \"4KiB\"",                   // 8
        "activity-log-extents = 1237",                     // 9
        "activity-log-extent-size = \"4MiB\"",             // 10
        "resync-rate-min = \"10MiB\"",                     // 11
        "resync-rate-max = \"4GiB\"",                      // 12
        "ping-interval-ms = 1000",                         // 13
        "peer-timeout-ms = 6000",                          // 14
        "connect-retry-ms = 500",                          // 15
        "max-buffers = 2048",                              // 16
        "",                                                // 17
        "[[node]]",                                        // 18
        "name = \"alpha\"",                                // 19
        "id = 0",                                          // 20
        "address = \"192.0.2.10:7788\"",                   // 21
        "device = \"/var/lib/tandem/r0.img\"",             // 22
        "metadata = \"/var/lib/tandem/r0.meta\"",          // 23
        "nbd = \"0.0.0.0:10809\"",                         // 24
        "control = \"/run/tandem/r0-alpha.sock\"",         // 25
        "cert = \"/etc/tandem/pki/alpha-cert.pem\"",       // 26
        "key = \"/etc/tandem/pki/alpha-key.pem\"",         // 27
        "",                                                // 28
        "[[node]]",                                        // 29
        "name = \"beta\"",                                 // 30
        "id = 1",                                          // 31
        "address = \"192.0.2.11:7788\"",                   // 32
        "device = \"/var/lib/tandem/r0.img\"",             // 33
        "metadata = \"/var/lib/tandem/r0.meta\"",          // 34
        "nbd = \"0.0.0.0:10809\"",                         // 35
        "control = \"/run/tandem/r0-beta.sock\"",          // 36
        "cert = \"/etc/tandem/pki/beta-cert.pem\"",        // 37
        "key = \"/etc/tandem/pki/beta-key.pem\"",          // 38
        "",                                                // 39
        "[[node]]",                                        // 40
        "name = \"gamma\"",                                // 41
        "id = 2",                                          // 42
        "role = \"witness\"",                              // 43
        "address = \"[2001:db8::12]:7788\"",               // 44
        "cert = \"/etc/tandem/pki/gamma-cert.pem\"",       // 45
        "key = \"/etc/tandem/pki/gamma-key.pem\"",         // 46
    ]

    static var example: String { exampleLines.joined(separator: "\n") + "\n" }

    /// The example with some lines replaced (numbers stay put: a line becomes another line, or
    /// several joined with "\n", which shifts the lines after it).
    static func example(_ changes: [Int: String]) -> String {
        var lines = exampleLines
        for (n, text) in changes { lines[n - 1] = text }
        return lines.joined(separator: "\n") + "\n"
    }

    /// A small resource on one host (both data nodes on 127.0.0.1), as tests run it.
    static let localLines: [String] = [
        "resource = \"r0\"",                                      // 1
        "[tls]",                                                  // 2
        "ca = \"/pki/ca-cert.pem\"",                              // 3
        "[[node]]",                                               // 4
        "name = \"alpha\"",                                       // 5
        "id = 0",                                                 // 6
        "address = \"127.0.0.1:7788\"",                           // 7
        "device = \"/srv/alpha.img\"",                            // 8
        "metadata = \"/srv/alpha.meta\"",                         // 9
        "nbd = \"127.0.0.1:10809\"",                              // 10
        "cert = \"/pki/alpha-cert.pem\"",                         // 11
        "key = \"/pki/alpha-key.pem\"",                           // 12
        "[[node]]",                                               // 13
        "name = \"beta\"",                                        // 14
        "id = 1",                                                 // 15
        "address = \"127.0.0.1:7789\"",                           // 16
        "device = \"/srv/beta.img\"",                             // 17
        "metadata = \"/srv/beta.meta\"",                          // 18
        "nbd = \"127.0.0.1:10810\"",                              // 19
        "cert = \"/pki/beta-cert.pem\"",                          // 20
        "key = \"/pki/beta-key.pem\"",                            // 21
    ]

    static func local(_ changes: [Int: String] = [:]) -> String {
        var lines = localLines
        for (n, text) in changes { lines[n - 1] = text }
        return lines.joined(separator: "\n") + "\n"
    }

    private func errors(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> [ConfigError] {
        switch ResourceConfig.parse(text, path: "r0.toml") {
        case .success:
            Issue.record("accepted, expected errors", sourceLocation: sourceLocation)
            return []
        case .failure(let e):
            return e.errors
        }
    }

    /// Expects exactly one error, on `line`, whose message contains `message`.
    private func expectOne(
        _ text: String, line: Int, _ message: String, fix: String? = nil,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let found = errors(text, sourceLocation: sourceLocation)
        #expect(found.count == 1, "\(found)", sourceLocation: sourceLocation)
        guard let e = found.first else { return }
        #expect(e.line == line, "\(e)", sourceLocation: sourceLocation)
        #expect(e.message.contains(message), "\(e)", sourceLocation: sourceLocation)
        if let fix { #expect(e.fix.contains(fix), "\(e)", sourceLocation: sourceLocation) }
        #expect(!e.fix.isEmpty, sourceLocation: sourceLocation)
    }

    // MARK: The valid example

    @Test func fullExample() throws {
        let config = try ResourceConfig.parse(Self.example, path: "/etc/tandem/r0.toml").get()
        #expect(config.name == "r0")
        #expect(config.path == "/etc/tandem/r0.toml")
        #expect(config.tls.caPath == "/etc/tandem/pki/ca-cert.pem")
        #expect(config.tuning == ResourceConfig.Tuning())
        #expect(config.nodes.map(\.name) == ["alpha", "beta", "gamma"])

        let alpha = try #require(config.node(named: "alpha"))
        #expect(alpha.id == 0)
        #expect(alpha.role == .data)
        #expect(alpha.address == ResourceConfig.Address(host: .ipv4([192, 0, 2, 10]), port: 7788))
        #expect(alpha.address.description == "192.0.2.10:7788")
        #expect(alpha.devicePath == "/var/lib/tandem/r0.img")
        #expect(alpha.metadataPath == "/var/lib/tandem/r0.meta")
        #expect(alpha.nbd?.isWildcard == true)
        #expect(alpha.controlPath == "/run/tandem/r0-alpha.sock")
        #expect(alpha.certPath == "/etc/tandem/pki/alpha-cert.pem")
        #expect(alpha.keyPath == "/etc/tandem/pki/alpha-key.pem")

        let gamma = try #require(config.witness)
        #expect(gamma.name == "gamma")
        #expect(gamma.isWitness)
        #expect(gamma.devicePath == nil && gamma.metadataPath == nil && gamma.nbd == nil)
        #expect(gamma.address.description == "[2001:db8::12]:7788")
        #expect(gamma.address.hostText == "2001:db8::12")
        #expect(gamma.controlPath == "/run/tandem/r0-gamma.sock")  // the default

        #expect(config.peer(of: "alpha")?.name == "beta")
        #expect(config.peer(of: "beta")?.name == "alpha")
        #expect(config.peer(of: "gamma") == nil)
        #expect(config.peer(of: "delta") == nil)
        #expect(config.node(named: "delta") == nil)
        #expect(config.dataNodes.map(\.name) == ["alpha", "beta"])
    }

    @Test func renderedConfigParsesBackEqual() throws {
        for text in [Self.example, Self.local()] {
            let config = try ResourceConfig.parse(text, path: "a.toml").get()
            let rendered = config.renderTOML()
            let again = try ResourceConfig.parse(rendered, path: "b.toml").get()
            #expect(again == config)
            #expect(again.renderTOML() == rendered)
        }
        var tuned = try ResourceConfig.parse(Self.local(), path: "a.toml").get()
        tuned.tuning.bitmapGranularityBytes = 64 << 10
        tuned.tuning.resyncBytesPerSecondMin = 0
        tuned.tuning.resyncBytesPerSecondMax = 3_000_000
        tuned.nodes[0].address = try #require(ResourceConfig.Address("[fe80::1%eth0]:7788"))
        let back = try ResourceConfig.parse(tuned.renderTOML(), path: "t.toml").get()
        #expect(back == tuned)
        #expect(back.tuning.resyncBytesPerSecondMax == 3_000_000)
        #expect(tuned.renderTOML().contains("resync-rate-min = \"0B\""))
    }

    @Test func tuningIsOptionalAndDefaults() throws {
        let config = try ResourceConfig.parse(Self.local(), path: "r0.toml").get()
        let t = config.tuning
        #expect(t.bitmapGranularityBytes == 4096)
        #expect(t.activityLogExtents == 1237)
        #expect(t.activityLogExtentBytes == 4 << 20)
        #expect(ResourceConfig.Tuning.bitmapGranularityBytesRange == 4096...(1 << 20))
        #expect(ResourceConfig.Tuning.activityLogExtentBytesRange == (4 << 20)...(1 << 30))
        #expect(t.resyncBytesPerSecondMin == 10 << 20)
        #expect(t.resyncBytesPerSecondMax == 4 << 30)
        #expect(t.pingIntervalMillis == 1000)
        #expect(t.peerTimeoutMillis == 6000)
        #expect(t.connectRetryMillis == 500)
        #expect(t.buffersMax == 2048)
        #expect(config.witness == nil)
        #expect(config.nodes[1].controlPath == "/run/tandem/r0-beta.sock")
    }

    @Test func tuningValuesAndSizeForms() throws {
        let text = Self.example([
            8: "bitmap-granularity = 65536",
            10: "activity-log-extent-size = \"1 GiB\"",
            11: "resync-rate-min = \"0\"",
            12: "resync-rate-max = \"2G\"",
            13: "ping-interval-ms = 250",
            14: "peer-timeout-ms = 251",
            16: "max-buffers = 32\npoll-us = 0\nnbd-send-buffer = \"0\"\nlink-send-buffer = \"1MiB\"",
        ])
        let t = try ResourceConfig.parse(text, path: "r0.toml").get().tuning
        #expect(t.bitmapGranularityBytes == 65536)
        #expect(t.activityLogExtentBytes == 1 << 30)
        #expect(t.resyncBytesPerSecondMin == 0)
        #expect(t.resyncBytesPerSecondMax == 2 << 30)
        #expect(t.pingIntervalMillis == 250)
        #expect(t.peerTimeoutMillis == 251)
        #expect(t.buffersMax == 32)
        #expect(t.pollMicros == 0)
        #expect(t.nbdSendBufferBytes == 0)
        let defaults = try ResourceConfig.parse(Self.example, path: "r0.toml").get().tuning
        #expect(defaults.pollMicros == Limits.pollMicrosDefault)
        #expect(defaults.nbdSendBufferBytes == Limits.nbdSendBufferBytesDefault)
        #expect(t.linkSendBufferBytes == 1 << 20)
        #expect(defaults.linkSendBufferBytes == Limits.linkSendBufferBytesDefault)
    }

    // MARK: Sizes and addresses

    @Test func sizes() throws {
        func size(_ text: String) throws -> Int {
            let config = try ResourceConfig.parse(Self.local([1: "resource = \"r0\"\n[tuning]\nresync-rate-min = 0\nresync-rate-max = \"\(text)\""]), path: "s").get()
            return config.tuning.resyncBytesPerSecondMax
        }
        #expect(try size("1048576") == 1 << 20)
        #expect(try size("4096KiB") == 4 << 20)
        #expect(try size("4096 KiB") == 4 << 20)
        #expect(try size("8M") == 8 << 20)
        #expect(try size("8MiB") == 8 << 20)
        #expect(try size("3G") == 3 << 30)
        #expect(try size("1TiB") == 1 << 40)
        #expect(try size("1T") == 1 << 40)
        #expect(try size("2097152B") == 2 << 20)
        #expect(ResourceConfig.sizeText(4096) == "4KiB")
        #expect(ResourceConfig.sizeText(1536 << 10) == "1536KiB")
        #expect(ResourceConfig.sizeText(3 << 40) == "3TiB")
        #expect(ResourceConfig.sizeText(1000) == "1000B")
        #expect(ResourceConfig.sizeText(0) == "0B")
    }

    static let sizeTypos: [(String, String, String)] = [
        ("4KB", "did you mean 'KiB'? (sizes are binary", "\"4KiB\""),
        ("4kib", "did you mean 'KiB'?", "\"4KiB\""),
        ("4 Kb", "did you mean 'KiB'?", "\"4KiB\""),
        ("4Mb", "did you mean 'MiB'?", "\"4MiB\""),
        ("4 megabytes", "did you mean 'MiB'?", "\"4MiB\""),
        ("4bytes", "did you mean 'B'?", "\"4B\""),
        ("4GIB", "did you mean 'GiB'?", "\"4GiB\""),
        ("4  KiB", "unknown unit ' KiB'", "units are B, KiB"),
        ("4XiB", "unknown unit 'XiB'", "units are B, KiB"),
        ("1.5KiB", "is not a whole number", "\"1536B\""),
        ("0.5MiB", "is not a whole number", "\"512KiB\""),
        ("1.3B", "is not a whole number", "whole number of bytes"),
        ("-4KiB", "is negative", "0 or more"),
        ("KiB", "is not a size", "e.g. \"4KiB\""),
        ("", "is not a size", "e.g. \"4KiB\""),
        ("99999999999999999999", "is too large", "smaller"),
        ("20000000TiB", "is too large", "smaller"),
    ]

    @Test(arguments: sizeTypos)
    func sizeErrors(_ text: String, _ message: String, _ fix: String) {
        // 4KiB-ish values are out of range for resync-rate-max; only the unit matters here.
        let found = errors(Self.example([12: "resync-rate-max = \(TOML.quoted(text))"]))
        guard let e = found.first else { return }
        #expect(found.count == 1, "\(found)")
        #expect(e.line == 12)
        #expect(e.message.hasPrefix("'resync-rate-max' "), "\(e)")
        #expect(e.message.contains(message) || e.fix.contains(message), "\(e)")
        #expect(e.fix.contains(fix), "\(e)")
    }

    static let goodAddresses: [(String, String, String)] = [
        ("127.0.0.1:7788", "127.0.0.1:7788", "127.0.0.1"),
        ("0.0.0.0:1", "0.0.0.0:1", "0.0.0.0"),
        ("[::1]:7788", "[::1]:7788", "::1"),
        ("[::]:10809", "[::]:10809", "::"),
        ("[2001:0DB8:0:0:0:0:0:1]:65535", "[2001:db8::1]:65535", "2001:db8::1"),
        ("[2001:db8:0:0:1:0:0:1]:80", "[2001:db8::1:0:0:1]:80", "2001:db8::1:0:0:1"),
        ("[1:2:3:4:5:6:7:8]:80", "[1:2:3:4:5:6:7:8]:80", "1:2:3:4:5:6:7:8"),
        ("[1:0:3:4:5:6:7:8]:80", "[1:0:3:4:5:6:7:8]:80", "1:0:3:4:5:6:7:8"),
        ("[::ffff:192.0.2.1]:80", "[::ffff:c000:201]:80", "::ffff:c000:201"),
        ("[::192.0.2.1]:80", "[::c000:201]:80", "::c000:201"),
        ("[fe80::1%eth0]:7788", "[fe80::1%eth0]:7788", "fe80::1%eth0"),
        ("Alpha.Example.org:7788", "alpha.example.org:7788", "alpha.example.org"),
        ("localhost:1", "localhost:1", "localhost"),
        ("node-1:7788", "node-1:7788", "node-1"),
    ]

    @Test(arguments: goodAddresses)
    func addresses(_ text: String, _ description: String, _ host: String) throws {
        let a = try #require(ResourceConfig.Address(text))
        #expect(a.description == description)
        #expect(a.hostText == host)
        #expect(ResourceConfig.Address(a.description) == a)
    }

    static let badAddresses: [(String, String, String)] = [
        ("127.0.0.1", "has no port", "\"127.0.0.1:7788\""),
        ("127.0.0.1:", "has no port after ':'", "HOST:PORT"),
        ("::1:7788", "needs brackets around its IPv6 address", "\"[::1]:7788\""),
        ("2001:db8::1", "is an IPv6 address without a port", "\"[2001:db8::1]:7788\""),
        ("[::1]", "has no port", "\"[::1]:7788\""),
        ("[::1]7788", "something other than ':PORT'", "[::1]:7788"),
        ("[::1:7788", "has '[' but no ']'", "[IPv6]:PORT"),
        ("[1.2.3.4]:80", "puts an IPv4 address in brackets", "\"1.2.3.4:80\""),
        ("[1::2::3]:80", "invalid IPv6 address '1::2::3'", "[2001:db8::10]"),
        ("[1:2:3:4:5:6:7:8:9]:80", "invalid IPv6 address", "[2001:db8::10]"),
        ("[1:2:3:4:5:6:7::8]:80", "invalid IPv6 address", "[2001:db8::10]"),
        ("[12345::1]:80", "invalid IPv6 address", "[2001:db8::10]"),
        ("[fe80::1%]:80", "invalid IPv6 zone", "%eth0"),
        ("256.1.1.1:80", "invalid IPv4 address '256.1.1.1'", "0 to 255"),
        ("1.2.3:80", "invalid IPv4 address", "0 to 255"),
        ("01.2.3.4:80", "invalid IPv4 address", "without leading zeros"),
        ("my_host:80", "invalid host name 'my_host'", "letters, digits"),
        ("-host:80", "invalid host name", "letters, digits"),
        ("a..b:80", "invalid host name", "letters, digits"),
        (":80", "has no host", "HOST:PORT"),
        ("host:0", "invalid port '0'", "1 to 65535"),
        ("host:65536", "invalid port '65536'", "1 to 65535"),
        ("host:http", "invalid port 'http'", "1 to 65535"),
        ("host:-1", "invalid port '-1'", "1 to 65535"),
        ("", "is empty", "HOST:PORT"),
        ("host :80", "contains a space", "HOST:PORT"),
        ("tcp://host:80", "is not HOST:PORT", "HOST:PORT"),
    ]

    @Test(arguments: badAddresses)
    func addressErrors(_ text: String, _ message: String, _ fix: String) {
        #expect(ResourceConfig.Address(text) == nil)
        let found = errors(Self.example([21: "address = \(TOML.quoted(text))"]))
        guard let e = found.first else { return }
        #expect(found.count == 1, "\(found)")
        #expect(e.line == 21)
        #expect(e.message.hasPrefix("'address' \(TOML.quoted(text)) "), "\(e)")
        #expect(e.message.contains(message), "\(e)")
        #expect(e.fix.contains(fix), "\(e)")
    }

    // MARK: Validation errors, one kind at a time

    @Test func errorDescriptionFormat() {
        let found = errors(Self.example([21: "adress = \"192.0.2.10:7788\""]))
        #expect(found.map(\.description) == [
            "r0.toml:18: [[node]] 'alpha' is missing 'address' (fix: add address = \"192.0.2.10:7788\")",
            "r0.toml:21: unknown key 'adress' in [[node]]; did you mean 'address'? (fix: rename 'adress' to 'address')",
        ])
        #expect(found[1].column == 1)
        let all = ConfigErrors(found)
        #expect(all.description == found.map(\.description).joined(separator: "\n"))
    }

    @Test func syntaxErrorsCarryPathAndLine() {
        let found = errors(Self.example([33: "device = \"/var/lib/tandem/r0.img"]))
        #expect(found.count == 1)
        #expect(found.first?.description == "r0.toml:33: unterminated string (fix: close the string with '\"' on the same line)")
        #expect(found.first?.column == 10)
        expectOne(Self.example([36: "address = \"192.0.2.12:7788\""]), line: 36,
                  "duplicate key 'address' (first set on line 32)")
        expectOne(Self.example([29: "[node]"]), line: 29, "is an array of tables (first [[node]] on line 18)")
    }

    @Test func unknownKeys() {
        expectOne(Self.example([9: "activity-log-extent = 1237"]), line: 9,
                  "unknown key 'activity-log-extent' in [tuning]; did you mean 'activity-log-extents'?")
        expectOne(Self.example([13: "ping_interval_ms = 1000"]), line: 13,
                  "did you mean 'ping-interval-ms'?", fix: "rename 'ping_interval_ms' to 'ping-interval-ms'")
        expectOne(Self.example([15: "connect-retry = 500"]), line: 15, "did you mean 'connect-retry-ms'?")
        expectOne(Self.example([5: "ca = \"/ca.pem\"\ncrl = \"/crl.pem\""]), line: 6,
                  "unknown key 'crl' in [tls]", fix: "remove it; the keys in [tls] are ca")
        expectOne(Self.example([7: "[tunning]"]), line: 7,
                  "unknown table [tunning] at the top level; did you mean [tuning]?", fix: "rename [tunning] to [tuning]")
        expectOne(Self.example([1: "colour = \"blue\""]), line: 1, "unknown key 'colour' at the top level")
        expectOne(Self.example([25: "contol = \"/run/tandem/r0-alpha.sock\""]), line: 25, "did you mean 'control'?")
        expectOne(Self.example([45: "\"cert path\" = \"/x\"\ncert = \"/etc/tandem/pki/gamma-cert.pem\""]), line: 45,
                  "unknown key '\"cert path\"' in [[node]]")
    }

    @Test func misplacedKeys() {
        // `resource` written after a header lands in that table, and is then missing at the top.
        let found = errors(Self.example([2: "", 5: "ca = \"/etc/tandem/pki/ca-cert.pem\"\nresource = \"r0\""]))
        #expect(found.map(\.line) == [1, 6])
        #expect(found[0].message == "missing 'resource' (the resource's name)")
        #expect(found[1].message == "key 'resource' belongs at the top level, not in [tls]")
        #expect(found[1].fix.contains("above the first [table] header"))
        expectOne(Self.example([26: "cert = \"/etc/tandem/pki/alpha-cert.pem\"\nca = \"/ca.pem\""]), line: 27,
                  "key 'ca' belongs in [tls], not in [[node]]", fix: "move it into [tls]")
        expectOne(Self.example([20: "id = 0\nmax-buffers = 64"]), line: 21, "key 'max-buffers' belongs in [tuning]")
    }

    @Test func wrongTypes() {
        expectOne(Self.example([20: "id = \"0\""]), line: 20, "'id' must be an integer, got a string",
                  fix: "remove the quotes: id = 0")
        expectOne(Self.example([2: "resource = 7"]), line: 2, "'resource' must be a string, got an integer",
                  fix: "put it in quotes: resource = \"7\"")
        expectOne(Self.example([9: "activity-log-extents = true"]), line: 9,
                  "'activity-log-extents' must be an integer, got a boolean", fix: "write activity-log-extents = 1237")
        expectOne(Self.example([8: "bitmap-granularity = [4096]"]), line: 8,
                  "'bitmap-granularity' must be a size (bytes, or a string such as \"4KiB\"), got an array")
        expectOne(Self.example([21: "address = { host = \"a\", port = 1 }"]), line: 21, "'address' must be a string, got a table")
        expectOne(Self.example([4: "tls = \"yes\"", 5: ""]), line: 4, "'tls' must be a table, got a string")
        expectOne(Self.example([4: "[[tls]]"]), line: 4, "'tls' must be a single table, not an array of tables",
                  fix: "write [tls]")
        expectOne(Self.local([4: "[node]", 13: "[node.extra]"]), line: 4,
                  "[node] defines a single table; nodes are an array of tables", fix: "write [[node]]")
        expectOne("resource = \"r0\"\nnode = [1]\n[tls]\nca = \"/ca.pem\"\n", line: 2, "each node must be a table, got an integer")
        expectOne(Self.example([8: "bitmap-granularity = -4096"]), line: 8, "'bitmap-granularity' is negative")
    }

    @Test func missingKeys() {
        expectOne(Self.example([21: ""]), line: 18, "[[node]] 'alpha' is missing 'address'")
        expectOne(Self.example([30: ""]), line: 29, "[[node]] is missing 'name'", fix: "add name = \"alpha\"")
        expectOne(Self.example([31: ""]), line: 29, "[[node]] 'beta' is missing 'id'", fix: "add id = 0")
        expectOne(Self.example([33: ""]), line: 29, "[[node]] 'beta' is missing 'device'")
        expectOne(Self.example([34: ""]), line: 29, "[[node]] 'beta' is missing 'metadata'")
        expectOne(Self.example([35: ""]), line: 29, "[[node]] 'beta' is missing 'nbd'")
        expectOne(Self.example([37: ""]), line: 29, "[[node]] 'beta' is missing 'cert'")
        expectOne(Self.example([46: ""]), line: 40, "[[node]] 'gamma' is missing 'key'")
        expectOne(Self.example([5: ""]), line: 4, "[tls] is missing 'ca'", fix: "add ca = \"/etc/tandem/pki/ca-cert.pem\"")
        expectOne(Self.example([2: ""]), line: 1, "missing 'resource'")
        expectOne(Self.example([4: "", 5: ""]), line: 1, "missing [tls]")
        let onlyTop = "resource = \"r0\"\n[tls]\nca = \"/ca.pem\"\n"
        expectOne(onlyTop, line: 1, "no [[node]] sections")
        // An empty file lists everything that is missing, all on line 1.
        let empty = errors("")
        #expect(empty.count == 3)
        #expect(empty.allSatisfy { $0.line == 1 })
    }

    @Test func names() {
        expectOne(Self.example([2: "resource = \"R0.main\""]), line: 2,
                  "resource name \"R0.main\" may contain only a-z, 0-9, '_' and '-'", fix: "resource = \"r0-main\"")
        expectOne(Self.example([2: "resource = \"\""]), line: 2, "resource name \"\" is empty")
        expectOne(Self.example([2: "resource = \"\(String(repeating: "r", count: 65))\""]), line: 2,
                  "is longer than 64 characters")
        expectOne(Self.example([19: "name = \"Alpha One\""]), line: 19, "node name \"Alpha One\" may contain only",
                  fix: "name = \"alpha-one\"")
        // 64 characters are fine, but a default control path of two long names does not fit a
        // socket address (gamma has no control key; alpha and beta do).
        let resource = String(repeating: "r", count: 64), node = String(repeating: "n", count: 64)
        let socket = "/run/tandem/\(resource)-\(node).sock"
        expectOne(Self.example([2: "resource = \"\(resource)\"", 41: "name = \"\(node)\""]), line: 40,
                  "the default control socket \(socket) is 146 bytes; a Unix socket path holds at most 107",
                  fix: "add control = ")
    }

    @Test func duplicates() {
        expectOne(Self.example([30: "name = \"alpha\""]), line: 30,
                  "node name 'alpha' is used twice (first on line 19)")
        expectOne(Self.example([42: "id = 0"]), line: 42,
                  "node id 0 is used twice (first by node 'alpha' on line 20)", fix: "e.g. 2")
        expectOne(Self.local([16: "address = \"127.0.0.1:7788\""]), line: 16,
                  "'address' 127.0.0.1:7788 is also the 'address' of node 'alpha' (line 4), on the same host",
                  fix: "\"127.0.0.1:7789\"")
        expectOne(Self.local([19: "nbd = \"127.0.0.1:10809\""]), line: 19,
                  "'nbd' 127.0.0.1:10809 is also the 'nbd' of node 'alpha' (line 4), on the same host")
        expectOne(Self.local([19: "nbd = \"127.0.0.1:7788\""]), line: 19,
                  "'nbd' 127.0.0.1:7788 is also the 'address' of node 'alpha'")
        expectOne(Self.local([19: "nbd = \"0.0.0.0:10809\""]), line: 19,
                  "'nbd' 0.0.0.0:10809 is also the 'nbd' of node 'alpha'")
        expectOne(Self.local([16: "address = \"localhost:7788\""]), line: 16,
                  "'address' localhost:7788 is also the 'address' of node 'alpha'")
        expectOne(Self.local([21: "key = \"/pki/beta-key.pem\"\ncontrol = \"/run/tandem/r0-alpha.sock\""]), line: 22,
                  "'control' /run/tandem/r0-alpha.sock is also the control socket of node 'alpha' (line 4), on the same host")
        expectOne(Self.local([12: "key = \"/pki/alpha-key.pem\"\ncontrol = \"/run/tandem/r0-beta.sock\""]), line: 14,
                  "the default control socket /run/tandem/r0-beta.sock of node 'beta' is also the control socket of node 'alpha'")
        expectOne(Self.local([17: "device = \"/srv/alpha.img\""]), line: 17,
                  "'device' /srv/alpha.img is also the 'device' of node 'alpha' (line 4), on the same host")
        expectOne(Self.local([18: "metadata = \"/srv/alpha.img\""]), line: 18,
                  "'metadata' /srv/alpha.img is also the 'device' of node 'alpha'")
        expectOne(Self.local([10: "nbd = \"127.0.0.1:7788\""]), line: 10,
                  "'nbd' 127.0.0.1:7788 is the same listener as this node's 'address' 127.0.0.1:7788")
        expectOne(Self.local([9: "metadata = \"/srv/alpha.img\""]), line: 9,
                  "'metadata' is the same file as 'device' (/srv/alpha.img)", fix: "\"/srv/alpha.img.meta\"")
        // 127.0.0.1 and 127.0.0.2 are both this host, but distinct listeners.
        #expect((try? ResourceConfig.parse(Self.local([16: "address = \"127.0.0.2:7788\""]), path: "r").get()) != nil)
    }

    @Test func sameNamesOnDifferentHostsAreFine() throws {
        // The example's data nodes share nbd, device and metadata paths: they are on two hosts.
        let config = try ResourceConfig.parse(Self.example([36: "control = \"/run/tandem/r0-alpha.sock\""]), path: "r").get()
        #expect(config.nodes[0].nbd == config.nodes[1].nbd)
        #expect(config.nodes[0].controlPath == config.nodes[1].controlPath)
    }

    @Test func addressRules() {
        expectOne(Self.example([21: "address = \"0.0.0.0:7788\""]), line: 21,
                  "'address' 0.0.0.0:7788 is a wildcard; peers need an address they can connect to")
        expectOne(Self.example([44: "address = \"[::]:7788\""]), line: 44, "is a wildcard")
        expectOne(Self.example([24: "nbd = \"10809\""]), line: 24, "'nbd' \"10809\" has no port", fix: "\"10809:10809\"")
    }

    @Test func ranges() {
        expectOne(Self.example([20: "id = 32"]), line: 20, "'id' must be from 0 to 31, got 32")
        expectOne(Self.example([20: "id = -1"]), line: 20, "'id' must be from 0 to 31, got -1")
        expectOne(Self.example([8: "bitmap-granularity = \"3KiB\""]), line: 8,
                  "'bitmap-granularity' must be a power of two from 4KiB to 1MiB, got 3KiB",
                  fix: "write bitmap-granularity = \"4KiB\"")
        expectOne(Self.example([8: "bitmap-granularity = \"2MiB\""]), line: 8, "got 2MiB", fix: "= \"1MiB\"")
        expectOne(Self.example([8: "bitmap-granularity = \"48KiB\""]), line: 8, "power of two", fix: "= \"32KiB\"")
        expectOne(Self.example([8: "bitmap-granularity = \"56KiB\""]), line: 8, "power of two", fix: "= \"64KiB\"")
        let extents = ResourceConfig.Tuning.activityLogExtentsRange
        expectOne(Self.example([9: "activity-log-extents = 5"]), line: 9,
                  "'activity-log-extents' must be from \(extents.lowerBound) to \(extents.upperBound), got 5",
                  fix: "activity-log-extents = \(extents.lowerBound)")
        expectOne(Self.example([9: "activity-log-extents = 65536"]), line: 9, "got 65536", fix: "= \(extents.upperBound)")
        expectOne(Self.example([10: "activity-log-extent-size = \"1MiB\""]), line: 10,
                  "'activity-log-extent-size' must be a power of two from 4MiB to 1GiB, got 1MiB")
        expectOne(Self.example([12: "resync-rate-max = \"2TiB\""]), line: 12,
                  "'resync-rate-max' must be from 1MiB to 1TiB, got 2TiB")
        expectOne(Self.example([13: "ping-interval-ms = 50"]), line: 13, "'ping-interval-ms' must be from 100 to 60000, got 50")
        expectOne(Self.example([15: "connect-retry-ms = 0"]), line: 15, "'connect-retry-ms' must be from 10 to 60000")
        expectOne(Self.example([16: "max-buffers = 1_000_000"]), line: 16,
                  "'max-buffers' must be from 32 to 131072, got 1000000", fix: "max-buffers = 131072")
        expectOne(Self.example([16: "poll-us = 5000"]), line: 16,
                  "'poll-us' must be from 0 to 1000, got 5000", fix: "poll-us = 1000")
        expectOne(Self.example([16: "nbd-send-buffer = \"1GiB\""]), line: 16,
                  "'nbd-send-buffer' must be from 0B to 64MiB, got 1GiB")
        expectOne(Self.example([14: "peer-timeout-ms = 9999999999"]), line: 14, "'peer-timeout-ms' must be from 200 to 600000")
    }

    @Test func relations() {
        expectOne(Self.example([14: "peer-timeout-ms = 1000"]), line: 14,
                  "'peer-timeout-ms' (1000) must be greater than 'ping-interval-ms' (1000)",
                  fix: "peer-timeout-ms = 6000")
        // With peer-timeout left at its default, the error points at the ping interval.
        expectOne(Self.example([13: "ping-interval-ms = 7000", 14: ""]), line: 13,
                  "'peer-timeout-ms' (6000) must be greater than 'ping-interval-ms' (7000)")
        expectOne(Self.example([11: "resync-rate-min = \"8GiB\""]), line: 11,
                  "'resync-rate-min' (8GiB) is more than 'resync-rate-max' (4GiB)", fix: "\"4GiB\" or less")
        // An invalid value is reported once, not again through a relation.
        expectOne(Self.example([13: "ping-interval-ms = \"1s\"", 14: "peer-timeout-ms = 500"]), line: 13,
                  "'ping-interval-ms' must be an integer")
    }

    @Test func rolesAndCounts() {
        expectOne(Self.example([43: "role = \"witnes\""]), line: 43,
                  "'role' must be \"data\" or \"witness\", got \"witnes\"; did you mean \"witness\"?",
                  fix: "role = \"witness\"")
        expectOne(Self.example([43: "role = \"witness\"\ndevice = \"/x.img\""]), line: 44,
                  "a witness has no 'device' (it stores no data)")
        let gammaData = errors(Self.example([43: "role = \"data\""]))
        #expect(gammaData.map(\.line) == [40, 40, 40, 40])
        #expect(gammaData.map(\.message) == [
            "[[node]] 'gamma' is missing 'device'", "[[node]] 'gamma' is missing 'metadata'",
            "[[node]] 'gamma' is missing 'nbd'", "a resource has exactly 2 data nodes; node 'gamma' is data node 3",
        ])
        let three = Self.example([
            43: "device = \"/var/lib/tandem/r0.img\"\nmetadata = \"/var/lib/tandem/r0.meta\"\nnbd = \"0.0.0.0:10809\"",
        ])
        expectOne(three, line: 40, "a resource has exactly 2 data nodes; node 'gamma' is data node 3",
                  fix: "role = \"witness\"")
        func witness(_ name: String, _ id: Int) -> String {
            "[[node]]\nname = \"\(name)\"\nid = \(id)\nrole = \"witness\"\naddress = \"127.0.0.1:\(7790 + id)\"\n"
                + "cert = \"/pki/\(name)-cert.pem\"\nkey = \"/pki/\(name)-key.pem\"\n"
        }
        expectOne(Self.local() + witness("w1", 2) + witness("w2", 3), line: 29,
                  "a resource has at most 1 witness; the first is on line 22", fix: "remove this [[node]]")
        // One data node: reported once, at the data node.
        expectOne(Self.local([17: "role = \"witness\"", 18: "", 19: ""]), line: 4,
                  "a resource has exactly 2 data nodes; this file has 1", fix: "add a [[node]] with device, metadata and nbd")
    }

    @Test func paths() {
        expectOne(Self.example([22: "device = \"var/lib/tandem/r0.img\""]), line: 22,
                  "'device' is not an absolute path: \"var/lib/tandem/r0.img\"", fix: "starting with '/'")
        expectOne(Self.example([5: "ca = \"\""]), line: 5, "'ca' is empty")
        expectOne(Self.example([26: "cert = \"/etc/\\u0000x\""]), line: 26, "'cert' contains a control character")
        let socket = "/run/" + String(repeating: "s", count: 100) + ".sock"
        expectOne(Self.example([25: "control = \"\(socket)\""]), line: 25,
                  "'control' is 110 bytes long; the limit is 107 (a Unix socket path)")
        let long = "/" + String(repeating: "d", count: 4095)
        expectOne(Self.example([23: "metadata = \"\(long)\""]), line: 23, "'metadata' is 4096 bytes long; the limit is 4095")
    }

    @Test func everyErrorIsCollectedInFileOrder() {
        let text = Self.example([
            2: "resource = \"R0\"",
            8: "bitmap-granularity = \"4KB\"",
            14: "peer-timeout-ms = 100",
            20: "id = \"zero\"",
            21: "adress = \"192.0.2.10:7788\"",
            31: "id = 99",
            35: "nbd = \"0.0.0.0\"",
            43: "role = \"arbiter\"",
        ])
        let found = errors(text)
        #expect(found.map(\.line) == [2, 8, 14, 18, 20, 21, 31, 35, 43], "\(found.map(\.description))")
        #expect(found.allSatisfy { !$0.fix.isEmpty && $0.path == "r0.toml" })
        #expect(found[3].message == "[[node]] 'alpha' is missing 'address'")
        #expect(found[8].message == "'role' must be \"data\" or \"witness\", got \"arbiter\"")
    }

    // MARK: Files

    @Test func checkFiles() throws {
        let config = try ResourceConfig.parse(Self.example, path: "r0.toml").get()
        let everything: Set<String> = [
            "/etc/tandem/pki/ca-cert.pem", "/etc/tandem/pki/alpha-cert.pem", "/etc/tandem/pki/alpha-key.pem",
            "/etc/tandem/pki/gamma-cert.pem", "/etc/tandem/pki/gamma-key.pem",
            "/var/lib/tandem/r0.img", "/var/lib/tandem", "/run/tandem",
        ]
        #expect(config.checkFiles(forNode: "alpha", fileExists: everything.contains).isEmpty)
        #expect(config.checkFiles(forNode: "gamma", fileExists: everything.contains).isEmpty)

        // beta's certificate is not on this host: beta cannot start here, alpha can.
        let beta = config.checkFiles(forNode: "beta", fileExists: everything.contains)
        #expect(beta.map(\.line) == [37, 38])
        #expect(beta[0].message == "the certificate of node 'beta' /etc/tandem/pki/beta-cert.pem does not exist")
        #expect(beta[0].fix.contains("tandem certs --dir DIR --node beta"))

        let missing = config.checkFiles(
            forNode: "alpha",
            fileExists: { everything.subtracting(["/etc/tandem/pki/ca-cert.pem", "/var/lib/tandem/r0.img", "/run/tandem"]).contains($0) },
            fileReadable: { $0 != "/etc/tandem/pki/alpha-key.pem" })
        #expect(missing.map(\.line) == [5, 22, 25, 27])
        #expect(missing.map(\.description) == [
            "r0.toml:5: the CA certificate ('ca' in [tls]) /etc/tandem/pki/ca-cert.pem does not exist "
                + "(fix: make it with 'tandem certs --dir DIR --node alpha', or correct the path)",
            "r0.toml:22: the device of node 'alpha' /var/lib/tandem/r0.img does not exist "
                + "(fix: create it (a file: truncate -s 10G /var/lib/tandem/r0.img), or correct the path)",
            "r0.toml:25: the directory /run/tandem of the control socket /run/tandem/r0-alpha.sock does not exist "
                + "(fix: create it: mkdir -p /run/tandem)",
            "r0.toml:27: the private key of node 'alpha' /etc/tandem/pki/alpha-key.pem exists but cannot be read "
                + "(fix: check its owner and mode: the node reads it as the user it runs as)",
        ])

        let noMetadataDir = config.checkFiles(forNode: "alpha", fileExists: { $0 != "/var/lib/tandem" && everything.contains($0) })
        #expect(noMetadataDir.map(\.line) == [23])

        // gamma's default control socket has no line of its own: its [[node]] line stands in.
        let gammaNoRun = config.checkFiles(forNode: "gamma", fileExists: { $0 != "/run/tandem" && everything.contains($0) })
        #expect(gammaNoRun.map(\.line) == [40])

        let unknown = config.checkFiles(forNode: "delta", fileExists: { _ in true })
        #expect(unknown.count == 1)
        #expect(unknown[0].line == 2)
        #expect(unknown[0].message == "resource 'r0' has no node named 'delta'; its nodes are 'alpha', 'beta', 'gamma'")
    }

    @Test func checkSizes() throws {
        let local = try ResourceConfig.parse(Self.local(), path: "r0.toml").get()
        let mib: UInt64 = 1 << 20
        var sizes: [String: UInt64] = ["/srv/alpha.img": 64 * mib, "/srv/beta.img": 64 * mib]
        var recorded: [String: UInt64] = [:]
        func check(_ config: ResourceConfig, _ node: String = "alpha") -> [ConfigError] {
            config.checkSizes(forNode: node, deviceBytes: { sizes[$0] }, recordedDeviceBytes: { recorded[$0] })
        }
        #expect(check(local).isEmpty)
        #expect(check(local, "delta").isEmpty)

        // Both data nodes on one host: their devices must be the same size.
        sizes["/srv/beta.img"] = 32 * mib
        let mismatch = check(local)
        #expect(mismatch.map(\.line) == [8])
        #expect(mismatch[0].message.contains("is 67108864 bytes, but the device of node 'beta' /srv/beta.img on the same host is 33554432 bytes"))
        #expect(mismatch[0].fix.hasPrefix("make them the same size (a file: truncate -s 67108864 /srv/beta.img)"))
        // On different hosts the other node's path names another machine's file.
        let apart = try ResourceConfig.parse(Self.local([16: "address = \"192.0.2.11:7789\""]), path: "r0.toml").get()
        #expect(check(apart).isEmpty)
        sizes["/srv/beta.img"] = 64 * mib

        sizes["/srv/alpha.img"] = 64 * mib + 512
        sizes["/srv/beta.img"] = 64 * mib + 512
        let odd = check(local)
        #expect(odd.map(\.line) == [8])
        #expect(odd[0].message == "the device of node 'alpha' /srv/alpha.img is 67109376 bytes, not a whole number of 4096-byte blocks")
        #expect(odd[0].fix == "grow it to 67112960 bytes (a file: truncate -s 67112960 /srv/alpha.img)")
        sizes["/srv/alpha.img"] = 0
        #expect(check(local).map(\.message) == ["the device of node 'alpha' /srv/alpha.img is empty (0 bytes)"])

        // The metadata was made for another size (the device was resized after tandem init).
        sizes["/srv/alpha.img"] = 64 * mib
        sizes["/srv/beta.img"] = 64 * mib
        recorded["/srv/alpha.meta"] = 32 * mib
        let resized = check(local)
        #expect(resized.map(\.line) == [9])
        #expect(resized[0].message == "the metadata file /srv/alpha.meta was made for a 33554432-byte device, but the device of node 'alpha' /srv/alpha.img is 67108864 bytes")
        #expect(resized[0].fix.contains("tandem init r0.toml --node alpha --force"))
        recorded = [:]

        // Too many granules for the bitmap: the fix names a granularity that covers the device.
        let huge: UInt64 = 1 << 46
        sizes["/srv/alpha.img"] = huge
        sizes["/srv/beta.img"] = huge
        let big = check(local)
        #expect(big.map(\.line) == [8])
        #expect(big[0].fix == "set bitmap-granularity = \"16KiB\" in [tuning]")
        let example = try ResourceConfig.parse(Self.example, path: "r0.toml").get()
        sizes["/var/lib/tandem/r0.img"] = huge
        #expect(check(example).map(\.line) == [8], "reported on the bitmap-granularity line when the file has one")
    }

    // MARK: Fuzz


    static let palette: [Unicode.Scalar] = [
        "[", "]", "{", "}", "=", "\"", "'", "#", ",", ".", "\n", "\r", "\t", " ", "\\", "a", "z", "0", "9", "-",
        "_", ":", "%", "/", "u", "\u{0}", "\u{7F}", "é", "\u{FEFF}", "\u{1F600}",
    ]

    /// One random edit of `text`.
    static func mutate(_ text: String, _ rng: inout SplitMix64) -> String {
        var s = Array(text.unicodeScalars)
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let op = Int.random(in: 0..<9, using: &rng)
        let at = s.isEmpty ? 0 : Int.random(in: 0..<s.count, using: &rng)
        switch op {
        case 0 where !s.isEmpty:
            s.remove(at: at)
        case 1:
            s.insert(palette.randomElement(using: &rng)!, at: at)
        case 2 where !s.isEmpty:
            s[at] = palette.randomElement(using: &rng)!
        case 3 where !lines.isEmpty:
            let n = Int.random(in: 0..<lines.count, using: &rng)
            lines.insert(lines[n], at: Int.random(in: 0...lines.count, using: &rng))
            return lines.joined(separator: "\n")
        case 4 where !lines.isEmpty:
            lines.remove(at: Int.random(in: 0..<lines.count, using: &rng))
            return lines.joined(separator: "\n")
        case 5 where lines.count > 1:
            lines.swapAt(Int.random(in: 0..<lines.count, using: &rng), Int.random(in: 0..<lines.count, using: &rng))
            return lines.joined(separator: "\n")
        case 6:
            s.removeSubrange(at...)
        case 7 where !s.isEmpty:
            // A digit somewhere becomes another digit: ids, ports, sizes drift out of range or collide.
            if let d = s.indices.filter({ ("0"..."9").contains(s[$0]) }).randomElement(using: &rng) {
                s[d] = Unicode.Scalar(UInt8.random(in: 0x30...0x39, using: &rng))
            }
        default:
            // A whole line of the example lands somewhere else (misplaced keys, duplicate tables).
            let line = exampleLines.randomElement(using: &rng)!
            lines.insert(line, at: Int.random(in: 0...lines.count, using: &rng))
            return lines.joined(separator: "\n")
        }
        return String(String.UnicodeScalarView(s))
    }

    @Test func randomMutationsNeverCrashAndStayInTheFile() {
        var rng = SplitMix64(seed: 0x7A4D_E11E)
        var accepted = 0
        var rejected = 0
        for round in 0..<2000 {
            var text = Self.example
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                text = Self.mutate(text, &rng)
            }
            let lineCount = text.unicodeScalars.filter { $0 == "\n" }.count + 1
            switch ResourceConfig.parse(text, path: "fuzz.toml") {
            case .success(let config):
                accepted += 1
                #expect(config.dataNodes.count == 2, "round \(round)")
                #expect(config.nodes.count <= 3, "round \(round)")
                #expect(ResourceConfig.parse(config.renderTOML(), path: "r") == .success(config), "round \(round)")
                for node in config.nodes {
                    for e in config.checkFiles(forNode: node.name, fileExists: { $0.count % 2 == 0 }) {
                        #expect((1...lineCount).contains(e.line), "round \(round): \(e)")
                    }
                }
            case .failure(let all):
                rejected += 1
                #expect(!all.errors.isEmpty)
                for e in all.errors {
                    #expect((1...lineCount).contains(e.line), "round \(round): \(e) in\n\(text)")
                    #expect(e.column >= 1, "round \(round): \(e)")
                    #expect(!e.message.isEmpty && !e.fix.isEmpty, "round \(round): \(e)")
                    #expect(e.description.hasPrefix("fuzz.toml:\(e.line): "))
                }
                let lines = all.errors.map(\.line)
                #expect(lines == lines.sorted(), "round \(round)")
            }
        }
        // Both outcomes are exercised, not just one.
        #expect(accepted > 100)
        #expect(rejected > 1000)
    }
}
