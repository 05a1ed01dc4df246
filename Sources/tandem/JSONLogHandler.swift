import Glibc
import Logging
import TandemNode

/// `--log-format json`: one JSON object per line on stderr, for journald, Loki, Elastic and the
/// like:
///
///     {"ts":"2025-01-02T03:04:05.678Z","level":"notice","label":"tandem","message":"promoted to primary in 812 µs","metadata":{}}
///
/// `ts` is UTC with milliseconds; `level` is swift-log's name (trace, debug, info, notice,
/// warning, error, critical); `metadata` holds the logger's metadata and the message's
/// (strings, arrays and objects as JSON). Each line goes out in one write(2), so lines from
/// different threads never interleave.
struct JSONLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    init(label: String) {
        self.label = label
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let explicit = event.metadata { merged.merge(explicit) { _, new in new } }
        var line = "{\"ts\":\"\(Self.timestamp())\",\"level\":\"\(event.level.rawValue)\",\"label\":\(jsonString(label)),"
        line += "\"message\":\(jsonString(event.message.description)),\"metadata\":\(Self.json(merged))}\n"
        line.withUTF8 { bytes in
            var done = 0
            while done < bytes.count {
                let n = write(2, bytes.baseAddress! + done, bytes.count - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return }
                done += n
            }
        }
    }

    static func json(_ metadata: Logger.Metadata) -> String {
        "{" + metadata.sorted { $0.key < $1.key }.map { "\(jsonString($0.key)):\(json($0.value))" }.joined(separator: ",") + "}"
    }

    static func json(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let s): return jsonString(s)
        case .stringConvertible(let c): return jsonString(c.description)
        case .array(let items): return "[" + items.map { json($0) }.joined(separator: ",") + "]"
        case .dictionary(let nested): return json(nested)
        }
    }

    /// `2025-01-02T03:04:05.678Z`.
    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var seconds = now.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ value: Int32, _ width: Int) -> String {
            let text = String(value)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(now.tv_nsec / 1_000_000), 3))Z"
    }
}
