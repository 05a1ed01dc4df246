/// Text from outside the node (an NBD client's export name, a peer's or the witness's disconnect
/// text, a certificate's name) as it may appear in a log line or an error message. Every control
/// or invisible formatting character is escaped, so no input can end the line and forge the next
/// one, move a terminal's cursor, or hide what it says behind a bidirectional override; and the
/// text is cut at `limit` characters (a client may send 4 KiB of name).
public enum Printable {
    /// `text` escaped, in double quotes; `"…` ends a cut text.
    public static func quoted<S: StringProtocol>(_ text: S, limit: Int = 64) -> String {
        let (body, cut) = escape(text, limit: limit)
        return "\"" + body + (cut ? "\"…" : "\"")
    }

    /// `text` escaped, without quotes; `…` ends a cut text.
    public static func escaped<S: StringProtocol>(_ text: S, limit: Int = 256) -> String {
        let (body, cut) = escape(text, limit: limit)
        return cut ? body + "…" : body
    }

    private static func escape<S: StringProtocol>(_ text: S, limit: Int) -> (String, cut: Bool) {
        var out = ""
        var count = 0
        for scalar in text.unicodeScalars {
            if count == limit { return (out, true) }
            count += 1
            switch scalar {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                switch scalar.properties.generalCategory {
                case .control, .format, .lineSeparator, .paragraphSeparator, .privateUse, .surrogate, .unassigned:
                    out += "\\u{" + String(scalar.value, radix: 16, uppercase: true) + "}"
                default:
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return (out, false)
    }
}
