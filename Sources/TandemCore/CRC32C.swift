import CTandemCRC

/// CRC-32C (Castagnoli): the reflected polynomial 0x82F63B78, initial value and final xor
/// 0xFFFFFFFF, as in iSCSI (RFC 3720 appendix B.4), ext4, btrfs and DRBD's on-disk metadata.
/// Castagnoli's polynomial detects more error patterns in blocks of metadata size than the
/// Ethernet CRC-32, and it is the one CPUs accelerate (SSE 4.2 `crc32`, ARMv8 `crc32c`), should
/// Tandem ever need the speed.
///
/// Table-driven, slicing-by-8: eight bytes per step through eight 256-entry tables (Intel's
/// "slicing-by-8", Kounavis and Berry 2008), about a byte per cycle without special instructions.
/// Nothing allocates once the tables exist.
///
/// ```
/// let crc = CRC32C.checksum(bytes)            // one shot
/// var running = CRC32C(); running.update(a); running.update(b)
/// running.value == CRC32C.checksum(b, seed: CRC32C.checksum(a))
/// ```
public struct CRC32C: Equatable, Sendable {
    /// The reflected Castagnoli polynomial.
    public static let polynomial: UInt32 = 0x82F6_3B78

    /// Eight tables of 256 entries, table `k` at `k * 256`. Table 0 is the classic byte-at-a-time
    /// table; table `k` advances a byte through `k` more zero bytes, which lets one step fold eight
    /// bytes with eight independent lookups.
    static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for i in 0..<256 {
            var crc = UInt32(i)
            for _ in 0..<8 { crc = (crc & 1) != 0 ? (crc >> 1) ^ polynomial : crc >> 1 }
            t[i] = crc
        }
        for k in 1..<8 {
            for i in 0..<256 {
                let previous = t[(k - 1) * 256 + i]
                t[k * 256 + i] = (previous >> 8) ^ t[Int(previous & 0xFF)]
            }
        }
        return t
    }()

    /// The running register, kept inverted as the algorithm defines it.
    private var register: UInt32

    /// Starts a checksum; `seed` is the checksum of bytes that came before, so checksums chain.
    public init(seed: UInt32 = 0) {
        register = ~seed
    }

    /// The checksum of every byte passed to `update` so far.
    public var value: UInt32 { ~register }

    /// Adds `bytes` to the checksum.
    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        register = CRC32C.advance(register, bytes)
    }

    /// The checksum of `bytes`, continuing from `seed` (the checksum of the bytes before them).
    public static func checksum(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        ~advance(~seed, bytes)
    }

    /// The checksum of `bytes`, continuing from `seed`.
    public static func checksum(_ bytes: [UInt8], seed: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, seed: seed) }
    }

    /// Whether the CPU's CRC-32C instruction does the work (SSE 4.2): about four times the
    /// table's speed, and every replicated byte is checksummed on both sides.
    public static let hardware = ctandem_crc32c_hardware() != 0

    /// Folds `bytes` into the (inverted) register.
    private static func advance(_ start: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        if hardware, let base = bytes.baseAddress, bytes.count > 0 {
            return ctandem_crc32c_update(start, base, bytes.count)
        }
        return advanceByTable(start, bytes)
    }

    /// The portable path (slicing-by-8), also the reference the hardware path is tested against.
    static func advanceByTable(_ start: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var crc = start
        let count = bytes.count
        guard count > 0 else { return crc }
        tables.withUnsafeBufferPointer { t in
            var at = 0
            // The first byte of the eight is the oldest, so it goes through the most tables (7).
            while count - at >= 8 {
                let word = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self)) ^ UInt64(crc)
                crc = t[7 * 256 + Int(word & 0xFF)]
                    ^ t[6 * 256 + Int((word >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((word >> 16) & 0xFF)]
                    ^ t[4 * 256 + Int((word >> 24) & 0xFF)]
                    ^ t[3 * 256 + Int((word >> 32) & 0xFF)]
                    ^ t[2 * 256 + Int((word >> 40) & 0xFF)]
                    ^ t[1 * 256 + Int((word >> 48) & 0xFF)]
                    ^ t[Int(word >> 56)]
                at += 8
            }
            while at < count {
                crc = t[Int((crc ^ UInt32(bytes[at])) & 0xFF)] ^ (crc >> 8)
                at += 1
            }
        }
        return crc
    }
}
