import Glibc

/// Progress of a long operation (resync, verify, diff, apply) on stderr. On a terminal it is one
/// bar redrawn in place at most ten times a second:
///
///     resync  [##############----------------]  47%  30.1 MiB of 64.0 MiB  12.3 MiB/s
///
/// Otherwise (a log, a pipe, a test) it is a plain line each time another `stepPercent` is
/// reached, so a log gains at most 100 / stepPercent lines:
///
///     resync: 45% (28.8 MiB of 64.0 MiB)
final class ProgressReporter {
    let label: String
    let terminal: Bool
    let stepPercent: Int
    private let fd: Int32
    private var lastDrawNanos: UInt64 = 0
    private var lastPercent = -1
    private var startedNanos: UInt64
    private var drewBar = false
    private var finished = false

    /// `terminal` defaults to whether stderr is a terminal.
    init(label: String, fd: Int32 = 2, terminal: Bool? = nil, stepPercent: Int = 5) {
        self.label = label
        self.fd = fd
        self.terminal = terminal ?? (isatty(fd) == 1)
        self.stepPercent = max(1, stepPercent)
        startedNanos = Self.nowNanos()
    }

    /// Reports `done` of `total` bytes (a total of 0 counts as done).
    func update(done: UInt64, total: UInt64) {
        guard !finished else { return }
        let clamped = min(done, total)
        let percent = total == 0 ? 100 : Int(clamped * 100 / total)
        let now = Self.nowNanos()
        if terminal {
            guard now - lastDrawNanos >= 100_000_000 || percent == 100 else { return }
            lastDrawNanos = now
            let width = 30
            let filled = total == 0 ? width : Int(clamped * UInt64(width) / total)
            let seconds = Double(now - startedNanos) / 1e9
            let rate = seconds > 0.5 ? "  \(Self.size(UInt64(Double(clamped) / seconds)))/s" : ""
            let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
            let pad = String(repeating: " ", count: max(0, 3 - String(percent).count))
            emit("\r\u{1B}[K\(label)  [\(bar)] \(pad)\(percent)%  \(Self.size(clamped)) of \(Self.size(total))\(rate)")
            drewBar = true
        } else {
            let step = percent / stepPercent * stepPercent
            guard step > lastPercent else { return }
            lastPercent = step
            emit("\(label): \(step)% (\(Self.size(clamped)) of \(Self.size(total)))\n")
        }
    }

    /// Ends the bar (a newline on a terminal) and prints `summary` if given.
    func finish(_ summary: String? = nil) {
        guard !finished else { return }
        finished = true
        if terminal && drewBar { emit("\n") }
        if let summary { emit("\(label): \(summary)\n") }
    }

    private func emit(_ text: String) {
        var text = text
        text.withUTF8 { _ = write(fd, $0.baseAddress, $0.count) }
    }

    /// `12.3 MiB`, `4.0 KiB`, `512 B`.
    static func size(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 { return "\(bytes) B" }
        let tenths = Int((value * 10).rounded())
        return "\(tenths / 10).\(tenths % 10) \(units[unit])"
    }

    static func nowNanos() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}
