import Testing
@testable import TandemCore

/// Text from outside the node in logs: no control or invisible character gets through, plain
/// names read as before, long text is cut.
struct PrintableTests {
    @Test func plainNamesReadAsBefore() {
        #expect(Printable.quoted("tandem") == "\"tandem\"")
        #expect(Printable.quoted("") == "\"\"")
        #expect(Printable.escaped("alpha.example-1_b") == "alpha.example-1_b")
        #expect(Printable.quoted("dísk ✓ 名前") == "\"dísk ✓ 名前\"")
    }

    @Test func aNewlineCannotForgeALogLine() {
        let forged = "evil\n2026-11-27T00:00:00Z critical tandem: fake\r\u{1B}[31m\u{7F}\u{85}"
        let shown = Printable.quoted(forged, limit: 200)
        #expect(shown == "\"evil\\n2026-11-27T00:00:00Z critical tandem: fake\\r\\u{1B}[31m\\u{7F}\\u{85}\"")
        #expect(!shown.unicodeScalars.contains { $0.properties.generalCategory == .control })
    }

    @Test func quotesBackslashesAndInvisibleFormattingAreEscaped() {
        #expect(Printable.quoted("a\"b\\c\td") == "\"a\\\"b\\\\c\\td\"")
        // Bidirectional overrides, zero-width characters and line separators hide or reorder text.
        #expect(Printable.escaped("x\u{202E}y\u{200B}z\u{2028}w\u{E000}") == "x\\u{202E}y\\u{200B}z\\u{2028}w\\u{E000}")
        // Repaired UTF-8 (what String(decoding:) makes of bad bytes) stays visible as U+FFFD.
        #expect(Printable.escaped(String(decoding: [0x61, 0xFF, 0x62] as [UInt8], as: UTF8.self)) == "a\u{FFFD}b")
    }

    @Test func longTextIsCut() {
        let long = String(repeating: "x", count: 5000)
        #expect(Printable.quoted(long) == "\"" + String(repeating: "x", count: 64) + "\"…")
        #expect(Printable.escaped(long, limit: 3) == "xxx…")
        #expect(Printable.escaped("xxx", limit: 3) == "xxx")
        // The limit counts characters of the input, an escape counts as one.
        #expect(Printable.escaped("\n\n\n\n", limit: 2) == "\\n\\n…")
    }
}
