/// Big-endian (network order) encoding shared by the NBD and peer protocols.
public extension Array where Element == UInt8 {
    mutating func appendBE(_ value: UInt64) {
        for shift in stride(from: 56, through: 0, by: -8) { append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
    }

    mutating func appendBE(_ value: UInt32) {
        for shift in stride(from: 24, through: 0, by: -8) { append(UInt8(truncatingIfNeeded: value >> UInt32(shift))) }
    }

    mutating func appendBE(_ value: UInt16) {
        append(UInt8(truncatingIfNeeded: value >> 8))
        append(UInt8(truncatingIfNeeded: value))
    }
}

/// Reads big-endian integers from a byte buffer, refusing to run past its end.
public struct ByteReader {
    public let bytes: UnsafeRawBufferPointer
    public private(set) var position = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var remaining: Int { bytes.count - position }

    public mutating func u8() -> UInt8? {
        guard remaining >= 1 else { return nil }
        defer { position += 1 }
        return bytes[position]
    }

    public mutating func u16() -> UInt16? {
        guard remaining >= 2 else { return nil }
        defer { position += 2 }
        return UInt16(bytes[position]) << 8 | UInt16(bytes[position + 1])
    }

    public mutating func u32() -> UInt32? {
        guard remaining >= 4 else { return nil }
        defer { position += 4 }
        return bytes.loadBE32(at: position)
    }

    public mutating func u64() -> UInt64? {
        guard remaining >= 8 else { return nil }
        defer { position += 8 }
        return bytes.loadBE64(at: position)
    }

    public mutating func bytes(_ count: Int) -> UnsafeRawBufferPointer? {
        guard count >= 0, remaining >= count else { return nil }
        defer { position += count }
        return UnsafeRawBufferPointer(rebasing: bytes[position..<position + count])
    }

    /// A UTF-8 string of `count` bytes (invalid UTF-8 is repaired, never trusted as a path).
    public mutating func string(_ count: Int) -> String? {
        guard let raw = bytes(count) else { return nil }
        return String(decoding: raw, as: UTF8.self)
    }
}

public extension UnsafeRawBufferPointer {
    @inline(__always)
    func loadBE16(at offset: Int) -> UInt16 {
        UInt16(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }

    @inline(__always)
    func loadBE32(at offset: Int) -> UInt32 {
        UInt32(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    @inline(__always)
    func loadBE64(at offset: Int) -> UInt64 {
        UInt64(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
}

public extension UnsafeMutableRawPointer {
    @inline(__always)
    func storeBE(_ value: UInt16, at offset: Int) { storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt16.self) }
    @inline(__always)
    func storeBE(_ value: UInt32, at offset: Int) { storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt32.self) }
    @inline(__always)
    func storeBE(_ value: UInt64, at offset: Int) { storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt64.self) }
}
