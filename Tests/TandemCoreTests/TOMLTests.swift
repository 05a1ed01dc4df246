import Testing
import TandemCore

/// The TOML subset of `TOML.swift`: what it accepts, what it refuses, and where it says so.
@Suite struct TOMLTests {
    private func parse(_ text: String) throws -> TOMLTable {
        try TOML.parse(text).get()
    }

    /// The error for `text`, which must not parse.
    private func failure(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> TOMLError? {
        switch TOML.parse(text) {
        case .success(let table):
            Issue.record("parsed, expected an error: \(table.keys)", sourceLocation: sourceLocation)
            return nil
        case .failure(let error):
            return error
        }
    }

    // MARK: Accepted

    @Test func scalars() throws {
        let t = try parse("""
            s = "tab\\there \\"quoted\\" back\\\\slash\\nline \\u00E9 \\U0001F600 \\b\\f\\r"
            lit = 'C:\\dir\\file "as is"'
            empty = ""
            emptyLit = ''
            n = 42
            plus = +17
            neg = -5
            zero = 0
            negZero = -0
            big = 1_000_000
            max = 9223372036854775807
            min = -9223372036854775808
            yes = true
            no = false
            """)
        #expect(t["s"]?.string == "tab\there \"quoted\" back\\slash\nline \u{E9} \u{1F600} \u{8}\u{C}\r")
        #expect(t["lit"]?.string == #"C:\dir\file "as is""#)
        #expect(t["empty"]?.string == "")
        #expect(t["emptyLit"]?.string == "")
        #expect(t["n"]?.integer == 42)
        #expect(t["plus"]?.integer == 17)
        #expect(t["neg"]?.integer == -5)
        #expect(t["zero"]?.integer == 0)
        #expect(t["negZero"]?.integer == 0)
        #expect(t["big"]?.integer == 1_000_000)
        #expect(t["max"]?.integer == Int64.max)
        #expect(t["min"]?.integer == Int64.min)
        #expect(t["yes"]?.boolean == true)
        #expect(t["no"]?.boolean == false)
        #expect(t.keys == ["s", "lit", "empty", "emptyLit", "n", "plus", "neg", "zero", "negZero", "big", "max", "min", "yes", "no"])
        #expect(t["n"]?.typeDescription == "an integer")
        #expect(t["s"]?.integer == nil)
    }

    @Test func commentsBlankLinesAndCRLF() throws {
        let t = try parse("# top\r\n\r\n  a = 1 # after\r\n\t# indented\r\n[t] # header comment\r\nb = \"x # not a comment\"\r\n# last, no newline")
        #expect(t["a"]?.integer == 1)
        #expect(t["t"]?.table?["b"]?.string == "x # not a comment")
        #expect(t["t"]?.table?.line == 5)
        #expect(t["t"]?.table?["b"]?.line == 6)
        #expect(try parse("").isEmpty)
        #expect(try parse("\n\n# only comments\n").isEmpty)
    }

    @Test func byteOrderMarkIsSkipped() throws {
        let t = try parse("\u{FEFF}a = 1\n")
        #expect(t["a"]?.integer == 1)
        #expect(t["a"]?.column == 5)
    }

    @Test func keys() throws {
        let t = try parse("""
            bare_key-1 = 1
            "quoted key" = 2
            'literal.key' = 3
            "" = 4
            1234 = 5
            a.b.c = 6
            a . "b" . d = 7
            site."google.com" = true
            """)
        #expect(t["bare_key-1"]?.integer == 1)
        #expect(t["quoted key"]?.integer == 2)
        #expect(t["literal.key"]?.integer == 3)
        #expect(t[""]?.integer == 4)
        #expect(t["1234"]?.integer == 5)
        let b = t["a"]?.table?["b"]?.table
        #expect(b?["c"]?.integer == 6)
        #expect(b?["d"]?.integer == 7)
        #expect(t["site"]?.table?["google.com"]?.boolean == true)
        #expect(TOML.key("bare-key_1") == "bare-key_1")
        #expect(TOML.key("with space") == "\"with space\"")
        #expect(TOML.key("") == "\"\"")
        #expect(TOML.keyPath(["a", "b.c"]) == "a.\"b.c\"")
    }

    @Test func tablesAndArraysOfTables() throws {
        let t = try parse("""
            top = 1
            [a.b]
            x = 1
            [a]
            y = 2
            [a.c]
            z = 3
            [[fruit]]
            name = "apple"
            [fruit.physical]
            color = "red"
            [[fruit.variety]]
            name = "red delicious"
            [[fruit.variety]]
            name = "granny smith"
            [[fruit]]
            name = "banana"
            [[fruit.variety]]
            name = "plantain"
            """)
        let a = try #require(t["a"]?.table)
        #expect(a.keys == ["b", "y", "c"])
        #expect(a.line == 4)  // the explicit [a], not the implicit mention on line 2
        #expect(a["b"]?.table?["x"]?.integer == 1)
        #expect(a["b"]?.line == 2)
        let fruit = try #require(t["fruit"]?.array)
        #expect(fruit.count == 2)
        #expect(fruit.map(\.line) == [8, 16])
        #expect(fruit[0].table?["name"]?.string == "apple")
        #expect(fruit[0].table?["physical"]?.table?["color"]?.string == "red")
        #expect(fruit[0].table?["variety"]?.array?.compactMap { $0.table?["name"]?.string } == ["red delicious", "granny smith"])
        #expect(fruit[1].table?["variety"]?.array?.count == 1)
        #expect(t.entry("fruit")?.line == 8)
    }

    @Test func subTableOfDottedTable() throws {
        // TOML 1.0's own example: a sub-table may be added under a table defined by dotted keys.
        let t = try parse("""
            [fruit]
            apple.color = "red"
            apple.taste.sweet = true
            [fruit.apple.texture]
            smooth = true
            """)
        let apple = t["fruit"]?.table?["apple"]?.table
        #expect(apple?["color"]?.string == "red")
        #expect(apple?["taste"]?.table?["sweet"]?.boolean == true)
        #expect(apple?["texture"]?.table?["smooth"]?.boolean == true)
    }

    @Test func arrays() throws {
        let t = try parse("""
            empty = []
            ints = [1, 2, 3]
            trailing = [1, 2,]
            multi = [
              "a",   # first
              'b',

              # a comment line
              "c",
            ]
            nested = [[1, 2], ["x"], []]
            mixed = [1, "two", true, {k = 1}]
            """)
        #expect(t["empty"]?.array == [])
        #expect(t["ints"]?.array?.compactMap(\.integer) == [1, 2, 3])
        #expect(t["trailing"]?.array?.count == 2)
        let multi = try #require(t["multi"]?.array)
        #expect(multi.compactMap(\.string) == ["a", "b", "c"])
        #expect(multi.map(\.line) == [5, 6, 9])
        #expect(t["multi"]?.line == 4)
        #expect(t["nested"]?.array?[0].array?.compactMap(\.integer) == [1, 2])
        #expect(t["nested"]?.array?[2].array == [])
        #expect(t["mixed"]?.array?[3].table?["k"]?.integer == 1)
        // The line after a multi-line array keeps its own number.
        let u = try parse("a = [\n1,\n2\n]\nb = 1\n")
        #expect(u["b"]?.line == 5)
    }

    @Test func inlineTables() throws {
        let t = try parse(#"point = { x = 1, y = -2, label.text = "p", deep = { z = true } }"# + "\nempty = {}\n")
        let p = try #require(t["point"]?.table)
        #expect(p.keys == ["x", "y", "label", "deep"])
        #expect(p["y"]?.integer == -2)
        #expect(p["label"]?.table?["text"]?.string == "p")
        #expect(p["deep"]?.table?["z"]?.boolean == true)
        #expect(t["empty"]?.table?.isEmpty == true)
    }

    @Test func positions() throws {
        let t = try parse("""
            # comment
            title = "x"   # trailing

            [server]
              port   = 8080
              hosts = ["a",
                       "b"]
            """)
        #expect(t["title"]?.line == 2)
        #expect(t["title"]?.column == 9)
        #expect(t.entry("title")?.column == 1)
        let server = try #require(t["server"]?.table)
        #expect(server.line == 4)
        #expect(server.column == 1)
        #expect(server["port"]?.line == 5)
        #expect(server["port"]?.column == 12)
        #expect(server.entry("port")?.column == 3)
        #expect(server["hosts"]?.array?[1].line == 7)
        #expect(server["hosts"]?.array?[1].column == 12)
        // Columns count Unicode scalars, not bytes.
        let u = try parse("\"é\" = 1\nk = \"日本\" # ok\n")
        #expect(u["é"]?.column == 7)
    }

    @Test func quotedRoundTrips() throws {
        let samples = ["plain", "", "quote \" and \\ backslash", "tab\tnewline\ncr\r", "ctl \u{0}\u{1}\u{1F}\u{7F}", "é 日本 \u{1F600}"]
        for s in samples {
            let t = try parse("k = \(TOML.quoted(s))\n\(TOML.key(s)) = 1\n")
            #expect(t["k"]?.string == s)
            #expect(t[s]?.integer == 1)
        }
    }

    @Test func nestingAndLengthLimits() throws {
        let deepest = String(repeating: "[", count: Limits.tomlNestingMax) + "1" + String(repeating: "]", count: Limits.tomlNestingMax)
        #expect(try parse("a = \(deepest)")["a"] != nil)
        let tooDeep = "[" + deepest + "]"
        #expect(failure("a = \(tooDeep)")?.message.contains("nest deeper than 8") == true)
        // Without the bound this would recurse 100 000 levels deep.
        #expect(failure("a = " + String(repeating: "[", count: 100_000))?.line == 1)

        let path8 = (1...Limits.tomlNestingMax).map { "t\($0)" }.joined(separator: ".")
        #expect(try parse("[\(path8)]\nk = 1") != TOMLTable(line: 1, column: 1))
        #expect(failure("[\(path8).t9]")?.message.contains("9 tables deep") == true)
        #expect(failure("[\(path8)]\nx.y = 1")?.message.contains("deeper than 8") == true)
        #expect(failure("[\(path8)]\nx = [1]")?.message.contains("deeper than 8") == true)

        let full = "a = [" + Array(repeating: "1", count: Limits.tomlArrayLengthMax).joined(separator: ",") + "]"
        #expect(try parse(full)["a"]?.array?.count == Limits.tomlArrayLengthMax)
        let over = "a = [" + Array(repeating: "1", count: Limits.tomlArrayLengthMax + 1).joined(separator: ",") + "]"
        #expect(failure(over)?.message.contains("more than 4096") == true)
        let tables = String(repeating: "[[t]]\n", count: Limits.tomlArrayLengthMax + 1)
        let e = failure(tables)
        #expect(e?.line == Limits.tomlArrayLengthMax + 1)
        #expect(e?.message.contains("more than 4096 tables") == true)

        let huge = "# " + String(repeating: "x", count: Limits.tomlFileBytesMax) + "\n"
        let big = failure(huge)
        #expect(big?.line == 1)
        #expect(big?.message.contains("limit is 1048576 bytes") == true)
    }

    // MARK: Refused, with exact positions

    /// (text, line, column, part of the message)
    static let invalid: [(String, Int, Int, String)] = [
        ("a = \"abc", 1, 5, "unterminated string"),
        ("x = 1\ny = 2\na = \"abc\nb = 1", 3, 5, "unterminated string"),
        ("a = 'abc", 1, 5, "unterminated string"),
        ("a = \"abc\\", 1, 9, "unterminated string"),
        ("a = \"a\\qb\"", 1, 7, "invalid escape '\\q'"),
        ("a = \"\\u12\"", 1, 6, "\\u needs exactly 4 hexadecimal digits"),
        ("a = \"\\U0000001\"", 1, 6, "\\U needs exactly 8 hexadecimal digits"),
        ("a = \"\\uD800\"", 1, 6, "\\uD800 is not a Unicode scalar value"),
        ("a = \"\\U00110000\"", 1, 6, "is not a Unicode scalar value"),
        ("a = \"bell\u{7}\"", 1, 10, "control character U+0007 in a string"),
        ("a = 'nul\u{0}'", 1, 9, "control character U+0000 in a string"),
        ("a = 1 # \u{1B}[31m", 1, 9, "control character U+001B in a comment"),
        ("a = \"\"\"multi\"\"\"", 1, 5, "multi-line strings"),
        ("a = '''multi'''", 1, 5, "multi-line literal strings"),
        ("a = 1\nb = 2\nc = 3\n\n\n\nb = 3", 7, 1, "duplicate key 'b' (first set on line 2)"),
        ("[t]\na = 1\n[t]", 3, 1, "table [t] is defined twice (first on line 1)"),
        ("[a.b]\n[a]\n[a]", 3, 1, "table [a] is defined twice (first on line 2)"),
        ("[t]\na = 1\n\n[t.a]", 4, 1, "'t.a' is already an integer (set on line 2)"),
        ("[[t]]\n[t]", 2, 1, "[t] is an array of tables (first [[t]] on line 1)"),
        ("[t]\n[[t]]", 2, 1, "[[t]] cannot add to [t], which is a table (line 1)"),
        ("a = [1, 2]\n[[a]]", 2, 1, "[[a]] cannot add to key 'a', which is an array set on line 1"),
        ("a = 1\n[a]", 2, 1, "'a' is already an integer (set on line 1)"),
        ("a = {x = 1}\n[a]", 2, 1, "'a' is an inline table (line 1)"),
        ("a = {x = 1}\n[a.b]", 2, 2, "'a' is an inline table (line 1)"),
        ("a.b = 1\n[a]", 2, 1, "table [a] was already defined by a dotted key on line 1"),
        ("[a]\nb.c = 1\n[a.b]", 3, 1, "table [a.b] was already defined by a dotted key on line 2"),
        ("a.b = 1\na.b.c = 2", 2, 3, "'a.b' was already defined on line 1"),
        ("[a.b.c]\nz = 9\n[a]\nb.c.t = 1", 4, 1, "'b' was already defined on line 1"),
        ("a = 1\na.b = 2", 2, 1, "'a' was already defined on line 1"),
        ("a = 1.5", 1, 5, "floating-point numbers are not supported"),
        ("a = 1e3", 1, 5, "floating-point numbers are not supported"),
        ("a = -inf", 1, 5, "floating-point numbers are not supported"),
        ("a = nan", 1, 5, "floating-point numbers are not supported"),
        ("a = 1979-05-27", 1, 5, "dates and times are not supported"),
        ("a = 07:32:00", 1, 5, "dates and times are not supported"),
        ("a = 0x1F", 1, 5, "only decimal integers are supported"),
        ("a = 0o17", 1, 5, "only decimal integers are supported"),
        ("a = 012", 1, 5, "leading zeros are not allowed"),
        ("a = 1__0", 1, 5, "'_' must sit between digits"),
        ("a = 1_", 1, 5, "'_' must sit between digits"),
        ("a = 12abc", 1, 5, "invalid integer '12abc'"),
        ("a = 1e-5", 1, 5, "floating-point numbers are not supported"),
        ("a = 0.address", 1, 5, "invalid integer '0.address'"),
        ("a = 1979-05-27T07:32:00Z", 1, 5, "dates and times are not supported"),
        ("a = 9223372036854775808", 1, 5, "does not fit in 64 bits"),
        ("a = True", 1, 5, "'True' is not a boolean"),
        ("a = hello", 1, 5, "'hello' is not a value; strings must be in quotes"),
        ("a = _1", 1, 5, "strings must be in quotes"),
        ("a = [1, 2", 1, 5, "unterminated array"),
        ("a = [\n1,\n2\n", 1, 5, "unterminated array"),
        ("a = [1 2]", 1, 8, "expected ',' or ']' in the array, found '2'"),
        ("a = [,]", 1, 6, "expected a value, found ','"),
        ("a = [1,,2]", 1, 8, "expected a value, found ','"),
        ("a = {x = 1,}", 1, 12, "trailing comma in an inline table"),
        ("a = {x = 1", 1, 5, "unterminated inline table"),
        ("a = {x = 1\n}", 1, 5, "unterminated inline table"),
        ("a = {x = 1 y = 2}", 1, 12, "expected ',' or '}' in the inline table, found 'y'"),
        ("a = {x = 1, x = 2}", 1, 13, "duplicate key 'x' (first set on line 1)"),
        ("a = 1 b = 2", 1, 7, "expected the end of the line, found 'b'"),
        ("a = \"x\" \"y\"", 1, 9, "expected the end of the line"),
        ("[t] x = 1", 1, 5, "expected the end of the line"),
        ("a", 1, 2, "key 'a' has no value"),
        ("a b = 1", 1, 3, "expected '=' after key 'a', found 'b'"),
        ("= 1", 1, 1, "missing key before '='"),
        ("a =", 1, 4, "expected a value at the end of the file"),
        ("a = # nothing", 1, 5, "expected a value"),
        ("a = \nb = 1", 1, 5, "expected a value"),
        ("a. = 1", 1, 4, "missing key before '='"),
        ("ä = 1", 1, 1, "expected a key, found 'ä'"),
        ("[a", 1, 3, "expected ']' to close the header [a]"),
        ("[[a]", 1, 4, "expected ']]' to close the header [[a]]"),
        ("[a]]", 1, 4, "expected the end of the line, found ']'"),
        ("[]", 1, 2, "expected a key, found ']'"),
        ("a = 1\r", 1, 6, "carriage return without a line feed"),
        ("a = 1\rb = 2", 1, 6, "carriage return without a line feed"),
    ]

    @Test(arguments: invalid)
    func refused(_ text: String, _ line: Int, _ column: Int, _ message: String) {
        guard let e = failure(text) else { return }
        #expect(e.line == line, "\(text.debugDescription): \(e)")
        #expect(e.column == column, "\(text.debugDescription): \(e)")
        #expect(e.message.contains(message), "\(text.debugDescription): \(e)")
        #expect(!e.fix.isEmpty)
        #expect(e.description == "line \(e.line): \(e.message)")
    }

    @Test func unquotedSizeSuggestsQuotes() {
        #expect(failure("size = 4KiB")?.fix.contains("in quotes: \"4KiB\"") == true)
    }

    @Test func errorFormat() {
        let e = failure("a = 1\nb = 1\n\n# c\n\nb = 2\n")
        #expect(e?.description == "line 6: duplicate key 'b' (first set on line 2)")
        #expect(failure("x = 1\n\ny = \"open\n")?.description == "line 3: unterminated string")
    }
}
