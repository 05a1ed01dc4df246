/// A strict subset of TOML 1.0 (https://toml.io/en/v1.0.0), enough for Tandem's resource files.
///
/// Supported: comments, bare and quoted keys, dotted keys, `[table]`, `[[array.of.tables]]`,
/// basic strings with escapes, literal strings, decimal integers, booleans, arrays (multi-line,
/// trailing comma) and inline tables. Not supported, each with an error that says so: floats,
/// dates and times, multi-line strings, hexadecimal, octal and binary integers.
///
/// We parse it ourselves rather than depend on a TOML package: a resource file is small, and the
/// operator deserves an error with the exact line, column and a fix. The parser stops at the
/// first error (what follows a syntax error is rarely meaningful). Every value remembers where it
/// starts. It is sans-I/O: the caller reads the file and passes its text.
public enum TOML {
    /// Parses a whole document into its root table.
    public static func parse(_ text: String) -> Result<TOMLTable, TOMLError> {
        let bytes = text.utf8.count
        if bytes > Limits.tomlFileBytesMax {
            return .failure(TOMLError(
                line: 1, column: 1,
                message: "the file is \(bytes) bytes; the limit is \(Limits.tomlFileBytesMax) bytes",
                fix: "a resource file is a few kilobytes: check that this is the right file"))
        }
        var parser = TOMLParser(text)
        do {
            return .success(try parser.document())
        } catch {
            return .failure(error)
        }
    }

    /// `text` as a TOML basic string, quotes included, escaped so that it parses back to `text`.
    public static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if isControl(scalar) {
                    out += "\\u" + hex(scalar.value, digits: 4)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    /// A key as it is written: bare when it can be, quoted otherwise.
    public static func key(_ key: String) -> String {
        if !key.isEmpty && key.unicodeScalars.allSatisfy(isBareKeyScalar) { return key }
        return quoted(key)
    }

    /// A dotted key path as it is written (`a."b c".d`).
    public static func keyPath(_ keys: [String]) -> String {
        keys.map(key).joined(separator: ".")
    }

    static func isBareKeyScalar(_ c: Unicode.Scalar) -> Bool {
        switch c {
        case "A"..."Z", "a"..."z", "0"..."9", "_", "-": return true
        default: return false
        }
    }

    /// Control characters may not appear raw in strings or comments (tab excepted, by the caller).
    static func isControl(_ c: Unicode.Scalar) -> Bool {
        c.value < 0x20 || c.value == 0x7F
    }

    static func hex(_ value: UInt32, digits: Int) -> String {
        let text = String(value, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, digits - text.count)) + text
    }
}

extension Limits {
    /// Bytes of the largest TOML file parsed; a resource file is a few kilobytes.
    public static let tomlFileBytesMax = 1 << 20
    /// Tables, arrays and inline tables nest at most this deep; it bounds the parser's recursion.
    public static let tomlNestingMax = 8
    /// Elements of one array, and tables of one array of tables.
    public static let tomlArrayLengthMax = 4096
}

/// A syntax error, with its 1-based line and column (columns count Unicode scalars) and a fix.
public struct TOMLError: Error, Sendable, Equatable, CustomStringConvertible {
    public var line: Int
    public var column: Int
    public var message: String
    /// What to change, in words an operator can act on.
    public var fix: String

    public init(line: Int, column: Int, message: String, fix: String) {
        self.line = line
        self.column = column
        self.message = message
        self.fix = fix
    }

    /// `line 7: duplicate key 'address' (first set on line 5)`
    public var description: String { "line \(line): \(message)" }
}

/// A value and where it starts in the file (1-based line and column).
public struct TOMLValue: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case string(String)
        case integer(Int64)
        case boolean(Bool)
        /// A `[...]` array, or the tables of a `[[name]]` array of tables.
        case array([TOMLValue])
        /// A `[name]` table or an inline table.
        case table(TOMLTable)
    }

    public var kind: Kind
    public var line: Int
    public var column: Int

    public init(_ kind: Kind, line: Int, column: Int) {
        self.kind = kind
        self.line = line
        self.column = column
    }

    public var string: String? {
        if case .string(let s) = kind { return s }
        return nil
    }

    public var integer: Int64? {
        if case .integer(let n) = kind { return n }
        return nil
    }

    public var boolean: Bool? {
        if case .boolean(let b) = kind { return b }
        return nil
    }

    public var array: [TOMLValue]? {
        if case .array(let a) = kind { return a }
        return nil
    }

    public var table: TOMLTable? {
        if case .table(let t) = kind { return t }
        return nil
    }

    /// The type for messages: "a string", "an integer", "a boolean", "an array", "a table".
    public var typeDescription: String {
        switch kind {
        case .string: return "a string"
        case .integer: return "an integer"
        case .boolean: return "a boolean"
        case .array: return "an array"
        case .table: return "a table"
        }
    }
}

/// A table: its entries in the order they were first defined, and where it was defined
/// (its header, or where it was first mentioned; line 1, column 1 for the root).
public struct TOMLTable: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        public var key: String
        /// Where the key was first written (for a table, in its first header or dotted key).
        public var line: Int
        public var column: Int
        public var value: TOMLValue
    }

    public private(set) var entries: [Entry] = []
    private var index: [String: Int] = [:]
    public var line: Int
    public var column: Int

    public init(line: Int, column: Int) {
        self.line = line
        self.column = column
    }

    public subscript(key: String) -> TOMLValue? {
        index[key].map { entries[$0].value }
    }

    public func entry(_ key: String) -> Entry? {
        index[key].map { entries[$0] }
    }

    public var keys: [String] { entries.map(\.key) }
    public var count: Int { entries.count }
    public var isEmpty: Bool { entries.isEmpty }

    /// Adds an entry; the key must be new (the parser reports duplicates before this).
    mutating func append(_ key: String, line: Int, column: Int, value: TOMLValue) {
        precondition(index[key] == nil, "TOMLTable: duplicate key \(key)")
        index[key] = entries.count
        entries.append(Entry(key: key, line: line, column: column, value: value))
    }
}

// MARK: - Parser

/// A table while its document is being read. A class, because `[a.b]` headers and dotted keys
/// reach into tables defined earlier; it becomes a `TOMLTable` value at the end.
private final class TableBuilder {
    /// How a table came to be, which decides whether it may be extended or defined later
    /// (TOML 1.0 "Table": a table is defined once; `[a.b]` defines `a` only implicitly).
    enum Origin {
        case root
        /// Created as the parent in a `[a.b]` header; a later `[a]` may still define it.
        case implicit
        /// Defined by its own `[a]` header.
        case header
        /// Created by a dotted key (`a.b = 1`); only dotted keys in the same section extend it.
        case dotted
        /// One element of an array of tables (`[[a]]`).
        case arrayElement
        /// An inline table; sealed once its `}` is read.
        case inline
    }

    enum Item {
        case value(TOMLValue)
        case table(TableBuilder)
        case tableArray([TableBuilder])
    }

    struct Slot {
        var item: Item
        var line: Int
        var column: Int
    }

    var origin: Origin
    let depth: Int
    var line: Int
    var column: Int
    var order: [String] = []
    var slots: [String: Slot] = [:]

    init(origin: Origin, depth: Int, line: Int, column: Int) {
        self.origin = origin
        self.depth = depth
        self.line = line
        self.column = column
    }

    func insert(_ key: String, _ item: Item, line: Int, column: Int) {
        precondition(slots[key] == nil)
        order.append(key)
        slots[key] = Slot(item: item, line: line, column: column)
    }

    func freeze() -> TOMLTable {
        var table = TOMLTable(line: line, column: column)
        for key in order {
            let slot = slots[key]!
            let value: TOMLValue
            switch slot.item {
            case .value(let v):
                value = v
            case .table(let t):
                value = TOMLValue(.table(t.freeze()), line: t.line, column: t.column)
            case .tableArray(let ts):
                let elements = ts.map { TOMLValue(.table($0.freeze()), line: $0.line, column: $0.column) }
                value = TOMLValue(.array(elements), line: slot.line, column: slot.column)
            }
            table.append(key, line: slot.line, column: slot.column, value: value)
        }
        return table
    }
}

/// A key as written, with where it starts.
private struct KeyPart {
    var name: String
    var line: Int
    var column: Int
}

/// Recursive descent over Unicode scalars (not Characters: "\r\n" is one Character in Swift).
private struct TOMLParser {
    private let s: [Unicode.Scalar]
    private var i = 0
    private var line = 1
    private var lineStart = 0
    private let root = TableBuilder(origin: .root, depth: 0, line: 1, column: 1)

    init(_ text: String) {
        s = Array(text.unicodeScalars)
        if s.first == "\u{FEFF}" {
            // A byte-order mark is not part of the first line's columns.
            i = 1
            lineStart = 1
        }
    }

    private var column: Int { i - lineStart + 1 }
    private var peek: Unicode.Scalar? { i < s.count ? s[i] : nil }

    private func peek(_ offset: Int) -> Unicode.Scalar? {
        i + offset < s.count ? s[i + offset] : nil
    }

    private func error(_ message: String, fix: String) -> TOMLError {
        TOMLError(line: line, column: column, message: message, fix: fix)
    }

    private func error(at line: Int, _ column: Int, _ message: String, fix: String) -> TOMLError {
        TOMLError(line: line, column: column, message: message, fix: fix)
    }

    /// A scalar as it appears in a message: printable ones quoted, others as U+XXXX.
    private static func show(_ c: Unicode.Scalar) -> String {
        if c == "\n" || c == "\r" { return "the end of the line" }
        if TOML.isControl(c) || c == "\u{FEFF}" { return "U+" + TOML.hex(c.value, digits: 4) }
        return "'\(c)'"
    }

    // MARK: Document

    mutating func document() throws(TOMLError) -> TOMLTable {
        var current = root
        while i < s.count {
            skipBlanks()
            guard let c = peek else { break }
            switch c {
            case "#", "\n", "\r":
                break
            case "[":
                current = try header()
            default:
                try keyValue(into: current)
            }
            try endOfLine()
        }
        return root.freeze()
    }

    private mutating func skipBlanks() {
        while let c = peek, c == " " || c == "\t" { i += 1 }
    }

    /// Consumes a comment (from `#` up to, not including, the line break).
    private mutating func comment() throws(TOMLError) {
        precondition(peek == "#")
        while let c = peek, c != "\n", c != "\r" {
            if c != "\t" && TOML.isControl(c) {
                throw error("control character \(Self.show(c)) in a comment",
                            fix: "remove it; comments are plain text")
            }
            i += 1
        }
    }

    private mutating func newline() throws(TOMLError) {
        if peek == "\r" {
            guard peek(1) == "\n" else {
                throw error("carriage return without a line feed",
                            fix: "end lines with LF or CRLF")
            }
            i += 1
        }
        precondition(peek == "\n")
        i += 1
        line += 1
        lineStart = i
    }

    /// After a header or a key/value pair: blanks, an optional comment, then a line break or the end.
    private mutating func endOfLine() throws(TOMLError) {
        skipBlanks()
        if peek == "#" { try comment() }
        guard let c = peek else { return }
        if c == "\n" || c == "\r" { return try newline() }
        throw error("expected the end of the line, found \(Self.show(c))",
                    fix: "write one 'key = value' or '[table]' per line; start comments with '#'")
    }

    /// Blanks, comments and line breaks, as allowed between the elements of an array.
    private mutating func skipBlanksAndLines() throws(TOMLError) {
        while true {
            skipBlanks()
            guard let c = peek else { return }
            if c == "#" {
                try comment()
            } else if c == "\n" || c == "\r" {
                try newline()
            } else {
                return
            }
        }
    }

    // MARK: Keys

    private mutating func keyPath() throws(TOMLError) -> [KeyPart] {
        var parts: [KeyPart] = []
        while true {
            skipBlanks()
            let keyLine = line, keyColumn = column
            guard let c = peek else {
                throw error("expected a key at the end of the file", fix: "complete or remove the last line")
            }
            let name: String
            switch c {
            case "\"":
                name = try basicString()
            case "'":
                name = try literalString()
            case _ where TOML.isBareKeyScalar(c):
                var bare = String.UnicodeScalarView()
                while let k = peek, TOML.isBareKeyScalar(k) {
                    bare.append(k)
                    i += 1
                }
                name = String(bare)
            case "=":
                throw error("missing key before '='", fix: "write 'key = value'")
            default:
                throw error(
                    "expected a key, found \(Self.show(c))",
                    fix: "bare keys use A-Z a-z 0-9 '_' '-'; put any other key in quotes")
            }
            parts.append(KeyPart(name: name, line: keyLine, column: keyColumn))
            skipBlanks()
            guard peek == "." else { return parts }
            i += 1
        }
    }

    // MARK: Tables

    /// `[a.b]` or `[[a.b]]`; returns the table that the following key/value pairs go into.
    private mutating func header() throws(TOMLError) -> TableBuilder {
        let headerLine = line, headerColumn = column
        i += 1
        let isArray = peek == "["
        if isArray { i += 1 }
        let path = try keyPath()
        let names = path.map(\.name)
        let shown = isArray ? "[[\(TOML.keyPath(names))]]" : "[\(TOML.keyPath(names))]"
        guard peek == "]", !isArray || peek(1) == "]" else {
            throw error("expected '\(isArray ? "]]" : "]")' to close the header \(shown)",
                        fix: "write the header as \(shown) on a line of its own")
        }
        i += isArray ? 2 : 1
        if path.count > Limits.tomlNestingMax {
            throw error(at: headerLine, headerColumn,
                        "\(shown) nests \(path.count) tables deep; the limit is \(Limits.tomlNestingMax)",
                        fix: "use a flatter structure")
        }

        var table = root
        for (n, part) in path.dropLast().enumerated() {
            if let slot = table.slots[part.name] {
                switch slot.item {
                case .table(let t):
                    table = t
                case .tableArray(let ts):
                    table = ts.last!
                case .value(let v):
                    let prefix = TOML.keyPath(Array(names[...n]))
                    throw error(at: part.line, part.column, valueIsNotATable(prefix, v, slot.line, shown),
                                fix: "rename the table or the key")
                }
            } else {
                let t = TableBuilder(origin: .implicit, depth: table.depth + 1, line: part.line, column: part.column)
                table.insert(part.name, .table(t), line: part.line, column: part.column)
                table = t
            }
        }

        let last = path[path.count - 1]
        let full = TOML.keyPath(names)
        if isArray {
            guard let slot = table.slots[last.name] else {
                let t = TableBuilder(origin: .arrayElement, depth: table.depth + 1, line: headerLine, column: headerColumn)
                table.insert(last.name, .tableArray([t]), line: last.line, column: last.column)
                return t
            }
            switch slot.item {
            case .tableArray(var ts):
                if ts.count >= Limits.tomlArrayLengthMax {
                    throw error(at: headerLine, headerColumn,
                                "more than \(Limits.tomlArrayLengthMax) tables in \(shown)",
                                fix: "remove some")
                }
                let t = TableBuilder(origin: .arrayElement, depth: table.depth + 1, line: headerLine, column: headerColumn)
                ts.append(t)
                table.slots[last.name]!.item = .tableArray(ts)
                return t
            case .table(let t):
                throw error(at: headerLine, headerColumn,
                            "\(shown) cannot add to [\(full)], which is a table (line \(t.line)), not an array of tables",
                            fix: "write [\(full)] once, or write every section as \(shown)")
            case .value(let v):
                throw error(at: headerLine, headerColumn,
                            "\(shown) cannot add to key '\(full)', which is \(v.typeDescription) set on line \(slot.line)",
                            fix: "rename the key or the array of tables")
            }
        }

        guard let slot = table.slots[last.name] else {
            let t = TableBuilder(origin: .header, depth: table.depth + 1, line: headerLine, column: headerColumn)
            table.insert(last.name, .table(t), line: last.line, column: last.column)
            return t
        }
        switch slot.item {
        case .table(let t):
            switch t.origin {
            case .implicit:
                t.origin = .header
                t.line = headerLine
                t.column = headerColumn
                return t
            case .dotted:
                throw error(at: headerLine, headerColumn,
                            "table \(shown) was already defined by a dotted key on line \(slot.line)",
                            fix: "keep its keys in one place: either under \(shown) or as dotted keys")
            case .root, .header, .arrayElement, .inline:
                throw error(at: headerLine, headerColumn,
                            "table \(shown) is defined twice (first on line \(t.line))",
                            fix: "merge the two \(shown) sections into one")
            }
        case .tableArray(let ts):
            throw error(at: headerLine, headerColumn,
                        "\(shown) is an array of tables (first [[\(full)]] on line \(ts[0].line))",
                        fix: "write [[\(full)]] to add another table to it")
        case .value(let v):
            throw error(at: headerLine, headerColumn, valueIsNotATable(full, v, slot.line, shown),
                        fix: "rename the table or the key")
        }
    }

    private func valueIsNotATable(_ key: String, _ value: TOMLValue, _ setLine: Int, _ shown: String) -> String {
        if value.table != nil {
            return "'\(key)' is an inline table (line \(setLine)), which \(shown) cannot extend"
        }
        return "'\(key)' is already \(value.typeDescription) (set on line \(setLine)), so \(shown) cannot be a table"
    }

    // MARK: Key/value pairs

    private mutating func keyValue(into table: TableBuilder) throws(TOMLError) {
        let path = try keyPath()
        let names = path.map(\.name)
        guard peek == "=" else {
            let what = TOML.keyPath(names)
            if let c = peek, c != "\n", c != "\r", c != "#" {
                throw error("expected '=' after key '\(what)', found \(Self.show(c))",
                            fix: "write '\(what) = value'; put keys with spaces in quotes")
            }
            throw error("key '\(what)' has no value", fix: "write '\(what) = value'")
        }
        i += 1
        skipBlanks()

        var target = table
        for (n, part) in path.dropLast().enumerated() {
            if let slot = target.slots[part.name] {
                guard case .table(let t) = slot.item, t.origin == .dotted else {
                    throw error(at: part.line, part.column,
                                "'\(TOML.keyPath(Array(names[...n])))' was already defined on line \(slot.line); "
                                    + "the dotted key '\(TOML.keyPath(names))' cannot add to it",
                                fix: "put '\(TOML.keyPath(Array(names[(n + 1)...])))' where "
                                    + "'\(TOML.keyPath(Array(names[...n])))' is defined")
                }
                target = t
            } else {
                if target.depth + 1 > Limits.tomlNestingMax {
                    throw error(at: part.line, part.column,
                                "'\(TOML.keyPath(names))' nests deeper than \(Limits.tomlNestingMax) tables",
                                fix: "use a flatter structure")
                }
                let t = TableBuilder(origin: .dotted, depth: target.depth + 1, line: part.line, column: part.column)
                target.insert(part.name, .table(t), line: part.line, column: part.column)
                target = t
            }
        }
        let last = path[path.count - 1]
        if let slot = target.slots[last.name] {
            throw error(at: last.line, last.column,
                        "duplicate key '\(TOML.key(last.name))' (first set on line \(slot.line))",
                        fix: "keep one of the two")
        }
        let value = try value(depth: target.depth + 1)
        target.insert(last.name, .value(value), line: last.line, column: last.column)
    }

    // MARK: Values

    /// A value; an array or inline table opened here is `depth` levels deep.
    private mutating func value(depth: Int) throws(TOMLError) -> TOMLValue {
        let valueLine = line, valueColumn = column
        guard let c = peek else {
            throw error("expected a value at the end of the file", fix: "complete the last line")
        }
        switch c {
        case "\"":
            return TOMLValue(.string(try basicString()), line: valueLine, column: valueColumn)
        case "'":
            return TOMLValue(.string(try literalString()), line: valueLine, column: valueColumn)
        case "[", "{":
            if depth > Limits.tomlNestingMax {
                throw error("arrays and tables nest deeper than \(Limits.tomlNestingMax) levels",
                            fix: "use a flatter structure")
            }
            return c == "[" ? try array(depth: depth) : try inlineTable(depth: depth)
        case "\n", "\r", "#":
            throw error("expected a value", fix: "write the value after '='; strings go in quotes")
        default:
            return try bareValue()
        }
    }

    /// Booleans and integers, and clear errors for what TOML has but this subset does not.
    private mutating func bareValue() throws(TOMLError) -> TOMLValue {
        let valueLine = line, valueColumn = column
        var token = String.UnicodeScalarView()
        while let c = peek, TOML.isBareKeyScalar(c) || c == "+" || c == "." || c == ":" {
            token.append(c)
            i += 1
        }
        let text = String(token)
        guard let first = token.first else {
            throw error("expected a value, found \(Self.show(peek!))",
                        fix: "write a string in quotes, an integer, true or false, [an array] or {a table}")
        }
        func fail(_ message: String, _ fix: String) -> TOMLError {
            TOMLError(line: valueLine, column: valueColumn, message: message, fix: fix)
        }
        if text == "true" { return TOMLValue(.boolean(true), line: valueLine, column: valueColumn) }
        if text == "false" { return TOMLValue(.boolean(false), line: valueLine, column: valueColumn) }
        if text.lowercased() == "true" || text.lowercased() == "false" {
            throw fail("'\(text)' is not a boolean", "booleans are lowercase: \(text.lowercased())")
        }
        let unsigned = (first == "+" || first == "-") ? String(text.dropFirst()) : text
        if ["inf", "nan"].contains(unsigned) {
            throw fail("floating-point numbers are not supported", "write a whole number")
        }
        guard let lead = unsigned.unicodeScalars.first, ("0"..."9").contains(lead) else {
            throw fail("'\(text)' is not a value; strings must be in quotes",
                       "write \(TOML.quoted(text))")
        }
        if unsigned.hasPrefix("0x") || unsigned.hasPrefix("0o") || unsigned.hasPrefix("0b") {
            throw fail("only decimal integers are supported, not '\(text)'", "write the number in decimal")
        }
        let looksLikeFloat = unsigned.unicodeScalars.allSatisfy { ("0"..."9").contains($0) || "_.eE+-".unicodeScalars.contains($0) }
        if looksLikeFloat && (unsigned.contains(".") || unsigned.contains("e") || unsigned.contains("E")) {
            throw fail("floating-point numbers are not supported ('\(text)')", "write a whole number")
        }
        if unsigned.contains(":") || unsigned.dropFirst().contains("-") || unsigned.contains("T") {
            throw fail("dates and times are not supported", "write it as a string: \(TOML.quoted(text))")
        }
        // Decimal: digits, single underscores between digits, no leading zero (TOML 1.0 "Integer").
        var digits = ""
        var previous: Unicode.Scalar = "_"
        for c in unsigned.unicodeScalars {
            if c == "_" {
                guard previous != "_" else {
                    throw fail("invalid integer '\(text)': '_' must sit between digits", "remove the '_'")
                }
            } else if ("0"..."9").contains(c) {
                digits.unicodeScalars.append(c)
            } else {
                throw fail("invalid integer '\(text)'",
                           "write a decimal integer, or put a string (such as a size with a unit) in quotes: \(TOML.quoted(text))")
            }
            previous = c
        }
        if previous == "_" {
            throw fail("invalid integer '\(text)': '_' must sit between digits", "remove the trailing '_'")
        }
        if digits.count > 1 && digits.hasPrefix("0") {
            let trimmed = digits.drop { $0 == "0" }
            throw fail("invalid integer '\(text)': leading zeros are not allowed",
                       "write \(first == "-" ? "-" : "")\(trimmed.isEmpty ? "0" : String(trimmed))")
        }
        guard let value = Int64(first == "-" ? "-" + digits : digits) else {
            throw fail("integer '\(text)' does not fit in 64 bits", "use a smaller number")
        }
        return TOMLValue(.integer(value), line: valueLine, column: valueColumn)
    }

    private mutating func basicString() throws(TOMLError) -> String {
        let startLine = line, startColumn = column
        precondition(peek == "\"")
        i += 1
        if peek == "\"" && peek(1) == "\"" {
            throw error(at: startLine, startColumn,
                        "multi-line strings (\"\"\") are not supported",
                        fix: "write the string on one line; use \\n for a line break")
        }
        var out = String.UnicodeScalarView()
        while true {
            guard let c = peek, c != "\n", c != "\r" else {
                throw error(at: startLine, startColumn, "unterminated string",
                            fix: "close the string with '\"' on the same line")
            }
            i += 1
            if c == "\"" { break }
            if c == "\\" {
                out.append(try escape())
            } else if c != "\t" && TOML.isControl(c) {
                i -= 1
                throw error("control character \(Self.show(c)) in a string",
                            fix: "write it as \\u\(TOML.hex(c.value, digits: 4))")
            } else {
                out.append(c)
            }
        }
        return String(out)
    }

    /// The scalar an escape stands for; `i` is just past the backslash.
    private mutating func escape() throws(TOMLError) -> Unicode.Scalar {
        let escapeLine = line, escapeColumn = column - 1
        guard let e = peek, e != "\n", e != "\r" else {
            throw error(at: escapeLine, escapeColumn, "unterminated string (it ends with a backslash)",
                        fix: "write \\\\ for a backslash and close the string with '\"'")
        }
        i += 1
        switch e {
        case "b": return "\u{08}"
        case "t": return "\t"
        case "n": return "\n"
        case "f": return "\u{0C}"
        case "r": return "\r"
        case "\"": return "\""
        case "\\": return "\\"
        case "u", "U":
            let count = e == "u" ? 4 : 8
            var value: UInt32 = 0
            for _ in 0..<count {
                guard let h = peek, let digit = Self.hexValue(h) else {
                    throw error(at: escapeLine, escapeColumn,
                                "\\\(e) needs exactly \(count) hexadecimal digits",
                                fix: "write \\\(e)\(String(repeating: "X", count: count)), e.g. \\\(e)\(count == 4 ? "00E9" : "0001F600")")
                }
                value = value << 4 | digit
                i += 1
            }
            guard let scalar = Unicode.Scalar(value) else {
                throw error(at: escapeLine, escapeColumn,
                            "\\\(e)\(TOML.hex(value, digits: count)) is not a Unicode scalar value",
                            fix: "use a code point outside the surrogates D800-DFFF and at most 10FFFF")
            }
            return scalar
        default:
            throw error(at: escapeLine, escapeColumn, "invalid escape '\\\(e)' in a string",
                        fix: "escapes are \\\" \\\\ \\n \\t \\r \\b \\f \\uXXXX \\UXXXXXXXX; "
                            + "a literal string in single quotes takes backslashes as they are")
        }
    }

    private static func hexValue(_ c: Unicode.Scalar) -> UInt32? {
        switch c {
        case "0"..."9": return c.value - 0x30
        case "a"..."f": return c.value - 0x61 + 10
        case "A"..."F": return c.value - 0x41 + 10
        default: return nil
        }
    }

    private mutating func literalString() throws(TOMLError) -> String {
        let startLine = line, startColumn = column
        precondition(peek == "'")
        i += 1
        if peek == "'" && peek(1) == "'" {
            throw error(at: startLine, startColumn,
                        "multi-line literal strings (''') are not supported",
                        fix: "write the string on one line")
        }
        var out = String.UnicodeScalarView()
        while true {
            guard let c = peek, c != "\n", c != "\r" else {
                throw error(at: startLine, startColumn, "unterminated string",
                            fix: "close the string with \"'\" on the same line")
            }
            if c == "'" {
                i += 1
                break
            }
            if c != "\t" && TOML.isControl(c) {
                throw error("control character \(Self.show(c)) in a string",
                            fix: "use a basic string in double quotes and write it as \\u\(TOML.hex(c.value, digits: 4))")
            }
            out.append(c)
            i += 1
        }
        return String(out)
    }

    private mutating func array(depth: Int) throws(TOMLError) -> TOMLValue {
        let startLine = line, startColumn = column
        precondition(peek == "[")
        i += 1
        var elements: [TOMLValue] = []
        while true {
            try skipBlanksAndLines()
            guard let c = peek else {
                throw error(at: startLine, startColumn, "unterminated array (no ']')",
                            fix: "close the array with ']'")
            }
            if c == "]" {
                i += 1
                break
            }
            if elements.count == Limits.tomlArrayLengthMax {
                throw error("array has more than \(Limits.tomlArrayLengthMax) elements", fix: "remove some")
            }
            elements.append(try value(depth: depth + 1))
            try skipBlanksAndLines()
            guard let next = peek else {
                throw error(at: startLine, startColumn, "unterminated array (no ']')",
                            fix: "close the array with ']'")
            }
            if next == "," {
                i += 1
            } else if next == "]" {
                i += 1
                break
            } else {
                throw error("expected ',' or ']' in the array, found \(Self.show(next))",
                            fix: "separate elements with ','")
            }
        }
        return TOMLValue(.array(elements), line: startLine, column: startColumn)
    }

    /// `{ a = 1, b.c = "x" }`: on one line, no trailing comma (TOML 1.0 "Inline Table").
    private mutating func inlineTable(depth: Int) throws(TOMLError) -> TOMLValue {
        let startLine = line, startColumn = column
        precondition(peek == "{")
        i += 1
        let table = TableBuilder(origin: .inline, depth: depth, line: startLine, column: startColumn)
        skipBlanks()
        if peek == "}" {
            i += 1
            return TOMLValue(.table(table.freeze()), line: startLine, column: startColumn)
        }
        while true {
            skipBlanks()
            if peek == nil || peek == "\n" || peek == "\r" || peek == "#" {
                throw error(at: startLine, startColumn,
                            "unterminated inline table (no '}' on its line)",
                            fix: "close it with '}' on the same line; use a [table] for longer tables")
            }
            try keyValue(into: table)
            skipBlanks()
            guard let c = peek, c != "\n", c != "\r", c != "#" else {
                throw error(at: startLine, startColumn,
                            "unterminated inline table (no '}' on its line)",
                            fix: "close it with '}' on the same line; use a [table] for longer tables")
            }
            i += 1
            if c == "}" { break }
            guard c == "," else {
                i -= 1
                throw error("expected ',' or '}' in the inline table, found \(Self.show(c))",
                            fix: "separate pairs with ','")
            }
            skipBlanks()
            if peek == "}" {
                throw error("trailing comma in an inline table", fix: "remove the ',' before '}'")
            }
        }
        return TOMLValue(.table(table.freeze()), line: startLine, column: startColumn)
    }
}
