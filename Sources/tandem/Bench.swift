import ArgumentParser
import Glibc
import TandemIO

/// `tandem bench`: the standard benchmark matrix, with this very binary as the Tandem under test.
///
/// The matrix (servers, jobs, fio, the replicated pair, tables, chart, JSON) is implemented once,
/// in the driver `tools/bench` (Python standard library only), which also runs on its own from
/// the repository. This command finds the driver, tells it which binary to benchmark and how it
/// was built, and replaces itself with it, so the driver owns the terminal, its signals and the
/// exit status. It builds nothing.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmark this tandem binary side by side with nbdkit, qemu-nbd and nbd-server.",
        discussion: """
            Runs fio's nbd engine on loopback against tandem serve (O_DIRECT and page cache), a \
            replicated pair over TLS, and the peers that are installed: 1 MiB sequential write \
            and read QD16, 4 KiB random write and read QD32, 4 KiB write QD1 (p50, p99), at 1 \
            and 4 connections. Prints a table with ratios to nbdkit, and writes JSON, the table \
            and an SVG chart to bench-results/. Progress goes to stderr.

            The servers are this binary: nothing is built. Every option belongs to the driver \
            (tools/bench in the source tree, or tandem-bench next to this binary), and \
            `tandem bench --help` lists them.

            Examples:
              tandem bench --quick
              tandem bench --size 4G --duration 60 --dir /mnt/nvme/scratch
              tandem bench --servers tandem-direct,qemu-nbd --jobs rand-write-4k --connections 4
            """,
        // `--help` goes to the driver, which documents every option it takes.
        helpNames: [])

    @Argument(parsing: .captureForPassthrough, help: "Options for the driver (tandem bench --help lists them).")
    var options: [String] = []

    /// Debian's interpreter: the driver uses its standard library only.
    static let python = "/usr/bin/python3"

    #if DEBUG
    static let build = "debug"
    #else
    static let build = "release"
    #endif

    func run() throws {
        guard let binary = Self.executablePath() else {
            throw fail("cannot read /proc/self/exe: \(SystemError.text(errno))")
        }
        guard let driver = Self.driverPath(binary: binary) else {
            throw fail("cannot find the benchmark driver: no tandem-bench next to \(binary) and no tools/bench in a source tree above it")
        }
        guard access(Self.python, X_OK) == 0 else {
            throw fail("tandem bench runs \(driver) with \(Self.python), which is missing (Debian package python3)")
        }
        setenv("TANDEM_BIN", binary, 1)
        setenv("TANDEM_BENCH_PROG", "tandem bench", 1)
        setenv("TANDEM_BENCH_BUILD", Self.build, 1)
        let argv = ([Self.python, driver] + options).map { strdup($0) } + [nil]
        execv(Self.python, argv)
        throw fail("cannot run \(Self.python) \(driver): \(SystemError.text(errno))")
    }

    /// The running binary, symlinks resolved.
    static func executablePath() -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        buffer[n] = 0
        return String(nulTerminated: buffer)
    }

    /// An installed driver next to the binary (`tandem-bench`), else `tools/bench` of the source
    /// tree the binary was built in (`.build/<triple>/<config>/tandem` sits below the package).
    static func driverPath(binary: String) -> String? {
        var directory = parent(binary)
        if isFile("\(directory)/tandem-bench") { return "\(directory)/tandem-bench" }
        while directory != "/" {
            if isFile("\(directory)/tools/bench") && isFile("\(directory)/Package.swift") {
                return "\(directory)/tools/bench"
            }
            directory = parent(directory)
        }
        return nil
    }

    static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
        return String(path[..<slash])
    }

    static func isFile(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }
}
