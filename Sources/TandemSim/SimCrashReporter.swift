#if canImport(Glibc)
import Glibc
#endif

/// A precondition the core (or the simulator) trips ends the process; this names the seeds that
/// were running, so the failure can be replayed. Runs started in parallel use different slots.
public enum SimCrashReporter {
    static let slots = 16
    nonisolated(unsafe) private static var running = [UInt64](repeating: 0, count: slots)
    nonisolated(unsafe) private static var active = [Bool](repeating: false, count: slots)

    static func begin(seed: UInt64, slot: Int) {
        running[slot % slots] = seed
        active[slot % slots] = true
    }

    static func end(slot: Int) {
        active[slot % slots] = false
    }

    /// Installs handlers for the signals a trap raises (SIGILL, SIGTRAP).
    public static func install() {
        #if canImport(Glibc)
        for sig in [SIGILL, SIGTRAP] {
            signal(sig) { sig in
                var text = "error: the simulator hit a trap (a precondition in ReplicaCore or the simulator) while running seed"
                for i in 0..<SimCrashReporter.slots where SimCrashReporter.active[i] { text += " \(SimCrashReporter.running[i])" }
                text += "; replay: tandem sim --seed N --verbose\n"
                text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
                signal(sig, SIG_DFL)
                raise(sig)
            }
        }
        #endif
    }
}
