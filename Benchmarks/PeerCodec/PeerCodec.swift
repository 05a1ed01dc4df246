import Benchmark
import TandemCore

/// The peer link's per-write CPU work on each side: the primary computes the payload CRC-32C and
/// encodes the 56-byte `data` header (header + block extension, sealed by its own CRC); the
/// secondary decodes and validates that header before it commits a buffer to the payload. Nothing
/// here may allocate.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal], scalingFactor: .kilo, maxDuration: .seconds(2))

    for (label, bytes, scaling) in [("4 KiB", 4096, BenchmarkScalingFactor.kilo), ("1 MiB", 1 << 20, .one)] {
        Benchmark("Peer encode data header + payloadCRC, \(label)", configuration: .init(scalingFactor: scaling)) { benchmark in
            let payload = patternBuffer(bytes)
            let header = UnsafeMutableRawPointer.allocate(byteCount: PeerProtocol.headerBytesMax, alignment: 8)
            defer {
                payload.deallocate()
                header.deallocate()
            }
            benchmark.startMeasurement()
            var sequence: UInt64 = 1
            for _ in benchmark.scaledIterations {
                let crc = PeerEncoder.payloadCRC(UnsafeRawBufferPointer(payload))
                let block = PeerBlock(offset: sequence << 20, epoch: 3, length: UInt32(bytes))
                blackHole(PeerEncoder.encodeBlockHeader(
                    type: .data, flags: 0, sequence: sequence, block: block, payloadCRC: crc, into: header))
                sequence &+= 1
            }
            benchmark.stopMeasurement()
        }
    }

    // The header alone (its own CRC over 56 bytes included), to read the payload CRC's share off
    // the two above.
    Benchmark("Peer encode data header only (payload CRC given)") { benchmark in
        let header = UnsafeMutableRawPointer.allocate(byteCount: PeerProtocol.headerBytesMax, alignment: 8)
        defer { header.deallocate() }
        benchmark.startMeasurement()
        var sequence: UInt64 = 1
        for _ in benchmark.scaledIterations {
            let block = PeerBlock(offset: sequence << 20, epoch: 3, length: 4096)
            blackHole(PeerEncoder.encodeBlockHeader(
                type: .data, flags: 0, sequence: sequence, block: block, payloadCRC: 0x1234_5678, into: header))
            sequence &+= 1
        }
        benchmark.stopMeasurement()
    }

    Benchmark("Peer decode + validate data header") { benchmark in
        let header = UnsafeMutableRawPointer.allocate(byteCount: PeerProtocol.headerBytesMax, alignment: 8)
        defer { header.deallocate() }
        let count = PeerEncoder.encodeBlockHeader(
            type: .data, flags: PeerFlags.Write.fua, sequence: 42,
            block: PeerBlock(offset: 1 << 30, epoch: 3, length: 4096), payloadCRC: 0x1234_5678, into: header)
        let bytes = UnsafeRawBufferPointer(start: header, count: count)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            guard case .header(let h) = PeerDecoder.decodeHeader(bytes) else { fatalError("decodeHeader") }
            blackHole(h)
        }
        benchmark.stopMeasurement()
    }
}

/// `count` bytes of a fixed non-zero pattern; the caller deallocates.
func patternBuffer(_ count: Int) -> UnsafeMutableRawBufferPointer {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
    for i in 0..<count { buffer[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
    return buffer
}
