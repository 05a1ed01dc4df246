/// The replication link between two Tandem nodes: constants, message types and the values each
/// message carries. Protocol/peer.md is the specification; this file and PeerCodec.swift follow it
/// section by section ("Framing", "Messages").
///
/// Everything here is plain data: the codec turns it into bytes and back, and the replication
/// state machine (not this file) decides what to send when.
public enum PeerProtocol {
    /// "TNDM" in ASCII, the first four bytes of every frame (peer.md "Header").
    public static let magic: UInt32 = 0x544E_444D
    /// The frame format this build speaks. Every frame of a v1 link carries it, `hello` included.
    public static let version: UInt16 = 1
    /// The protocol versions this build can negotiate in `hello` (peer.md "Version negotiation").
    public static let versionMin: UInt16 = 1
    public static let versionMax: UInt16 = 1

    /// Bytes of the fixed header every frame starts with.
    public static let headerBytes = 32
    /// Bytes of the block extension that follows the header of `data`, `trim`, `zeroes` and
    /// `resyncData`. The header CRC covers it, so offset and length are trusted before any
    /// payload is received into an I/O buffer.
    public static let blockExtensionBytes = 24
    /// Header plus block extension: what `decodeHeader` consumes for a block message.
    public static let blockHeaderBytes = headerBytes + blockExtensionBytes
    /// Room that any header needs (what a send slot reserves for one frame's header).
    public static let headerBytesMax = blockHeaderBytes

    /// Largest payload of a control message (everything but `data` and `resyncData`).
    public static let controlPayloadBytesMax = 64 * 1024
    /// Largest payload of `data` and `resyncData`: one NBD request, never split.
    public static let dataPayloadBytesMax = Limits.nbdRequestBytesMax
    /// Largest frame on the link.
    public static let frameBytesMax = blockHeaderBytes + dataPayloadBytesMax

    /// Bytes of a resource name in `hello` (1 or more, from `[A-Za-z0-9._-]`).
    public static let resourceNameBytesMax = 64
    /// Bytes of UTF-8 text in `disconnect`.
    public static let disconnectTextBytesMax = 256
    /// History generation UUIDs in `hello`.
    public static let historyUUIDCount = 4
    /// Highest node id (DRBD's 32-node id space, of which a Tandem resource uses two).
    public static let nodeIDMax: UInt8 = 31

    /// Bytes of device one bitmap bit covers: a power of two in this range. Resync offsets and
    /// lengths are multiples of the smallest granularity.
    public static let bitmapGranularityBytesMin = Limits.blockSize
    public static let bitmapGranularityBytesMax = 1024 * 1024
    /// Bytes before the bit words of a `bitmapChunk` (first bit u64, bit count u32).
    public static let bitmapChunkPrefixBytes = 12
    /// Bits in one `bitmapChunk`: as many 64-bit words as fit in a control payload.
    public static let bitmapChunkBitsMax = (controlPayloadBytesMax - bitmapChunkPrefixBytes) / 8 * 64

    /// Bytes of device one verify digest covers.
    public static let digestBlockBytes = Limits.blockSize
    /// Bytes of device one `verifyRequest` may cover (1024 SHA-256 digests = 32 KiB of reply).
    public static let verifyBytesMax = 4 * 1024 * 1024
    /// Bytes before the digests of a `verifyDigest`.
    public static let verifyDigestPrefixBytes = 18

    /// Largest value of a result field (`writeAck`, `flushAck`, `barrierAck`, `resyncAck`, and
    /// the result of `resyncData` and `verifyDigest`): 0 or a Linux errno, which is at most
    /// MAX_ERRNO. Any larger value is a decoding error, so a receiver can negate it into an
    /// `Int32` without a trap.
    public static let resultMax: UInt32 = 4095

    /// Fixed part of the `hello` payload; the resource name follows it.
    public static let helloFixedBytes = 84
    /// The `stateChange` payload: generation UUIDs, role, disk state.
    public static let stateChangeBytes = 50

    /// Checks how the limits relate (called by the tests and, later, from `Limits.checkRelations`).
    public static func checkRelations() {
        precondition(headerBytes == 32 && blockExtensionBytes == 24, "peer.md fixes these sizes")
        precondition(dataPayloadBytesMax >= Limits.nbdRequestBytesMax, "an NBD write is never split")
        precondition(dataPayloadBytesMax <= Int(UInt32.max))
        precondition(helloFixedBytes + resourceNameBytesMax <= controlPayloadBytesMax)
        precondition(4 + disconnectTextBytesMax <= controlPayloadBytesMax)
        precondition(bitmapChunkPrefixBytes + bitmapChunkBitsMax / 8 <= controlPayloadBytesMax)
        precondition(verifyDigestPrefixBytes + verifyBytesMax / digestBlockBytes * PeerDigestAlgorithm.digestBytesMax
            <= controlPayloadBytesMax)
        precondition(verifyBytesMax <= dataPayloadBytesMax)
        precondition(bitmapGranularityBytesMin.nonzeroBitCount == 1 && bitmapGranularityBytesMax.nonzeroBitCount == 1)
        precondition(bitmapGranularityBytesMin % digestBlockBytes == 0)
        precondition(versionMin >= 1 && versionMin <= version && version <= versionMax)
        precondition(resultMax < UInt32(Int32.max), "a result negates into an Int32")
    }

    /// The version both sides speak: the highest in both ranges, or nil (peer.md "Version
    /// negotiation"; the side that finds no common version sends `disconnect(versionMismatch)`).
    public static func agreedVersion(local: PeerHello, peer: PeerHello) -> UInt16? {
        let low = max(local.versionMin, peer.versionMin)
        let high = min(local.versionMax, peer.versionMax)
        return low <= high ? high : nil
    }
}

/// Message types (peer.md "Messages"). The numbering groups them: 1–15 link, 16–31 writes,
/// 32–47 bitmap and resync, 48–63 verify. Any other value is a decoding error.
public enum PeerMessageType: UInt16, Sendable, CaseIterable {
    case hello = 1
    case ping = 2
    case pingAck = 3
    case stateChange = 4
    case disconnect = 5

    case data = 16
    case trim = 17
    case zeroes = 18
    case writeAck = 19
    case flush = 20
    case flushAck = 21
    case barrier = 22
    case barrierAck = 23
    /// A point-in-time barrier (a snapshot the secondary keeps restorable), in stream order.
    case snapshot = 24

    case bitmapChunk = 32
    case bitmapDone = 33
    case resyncRequest = 34
    case resyncData = 35
    case resyncAck = 36
    case resyncDone = 37

    case verifyRequest = 48
    case verifyDigest = 49

    /// Block messages carry the 24-byte block extension after the header.
    public var isBlock: Bool {
        switch self {
        case .data, .trim, .zeroes, .resyncData: return true
        default: return false
        }
    }

    /// Bytes `decodeHeader` consumes for this type (32, or 56 for block messages).
    public var headerBytes: Int { isBlock ? PeerProtocol.blockHeaderBytes : PeerProtocol.headerBytes }

    /// Header flag bits this type may carry; any other bit is a decoding error.
    public var allowedFlags: UInt16 {
        switch self {
        case .hello: return PeerFlags.Hello.all
        case .data, .trim: return PeerFlags.Write.fua | PeerFlags.Write.setsInSync
        case .zeroes: return PeerFlags.Write.fua | PeerFlags.Write.setsInSync | PeerFlags.Write.noHole
        case .resyncData: return PeerFlags.ResyncData.zero
        case .stateChange: return PeerFlags.State.all
        default: return 0
        }
    }

    /// The header sequence must be 0 for these (they have no identifier to carry).
    public var sequenceIsZero: Bool {
        switch self {
        case .hello, .disconnect, .barrier, .barrierAck, .snapshot, .bitmapChunk, .bitmapDone, .resyncDone: return true
        default: return false
        }
    }

    /// The payload sizes this type may carry in v1 (exact for fixed layouts). `decodeHeader`
    /// checks it before anything is received, so no length field can make a peer buffer more.
    public var payloadBytesRange: ClosedRange<Int> {
        switch self {
        case .hello:
            return PeerProtocol.helloFixedBytes + 1 ... PeerProtocol.helloFixedBytes + PeerProtocol.resourceNameBytesMax
        case .ping, .pingAck, .trim, .zeroes, .flush, .resyncDone: return 0 ... 0
        case .stateChange: return PeerProtocol.stateChangeBytes ... PeerProtocol.stateChangeBytes
        case .disconnect: return 4 ... 4 + PeerProtocol.disconnectTextBytesMax
        case .data: return 1 ... PeerProtocol.dataPayloadBytesMax
        case .resyncData: return 0 ... PeerProtocol.dataPayloadBytesMax
        case .writeAck, .flushAck: return 4 ... 4
        case .barrier: return 8 ... 8
        case .barrierAck, .bitmapDone, .resyncAck: return 16 ... 16
        case .snapshot: return 17 ... 17 + Limits.barrierLabelBytesMax
        case .bitmapChunk: return PeerProtocol.bitmapChunkPrefixBytes + 8 ... PeerProtocol.controlPayloadBytesMax
        case .resyncRequest: return 12 ... 12
        case .verifyRequest: return 13 ... 13
        case .verifyDigest:
            return PeerProtocol.verifyDigestPrefixBytes ... PeerProtocol.verifyDigestPrefixBytes
                + PeerProtocol.verifyBytesMax / PeerProtocol.digestBlockBytes * PeerDigestAlgorithm.digestBytesMax
        }
    }
}

/// Header flag bits, by message type (peer.md "Header flags"). Each type has its own namespace.
public enum PeerFlags {
    public enum Hello {
        /// The device was created all-zero and has never been written: with the peer's also new
        /// and zeroed, the initial full sync is skipped.
        public static let newZeroed: UInt16 = 1 << 0
        /// This node was primary when it stopped without demoting (crash): its activity-log
        /// extents are out of sync with the peer whatever the UUIDs say.
        public static let crashedPrimary: UInt16 = 1 << 1
        /// The administrator resolved a split brain in the peer's favour: this node becomes sync
        /// target and its own changes are overwritten.
        public static let discardMyData: UInt16 = 1 << 2
        /// To a witness, from a secondary: as `State.rollingBack`, in the hello, so that a
        /// witness that restarted records the rollback before anything else (peer.md 11.1).
        public static let rollingBack: UInt16 = 1 << 3
        public static let all: UInt16 = newZeroed | crashedPrimary | discardMyData | rollingBack
    }

    /// `data`, `trim`, `zeroes`.
    public enum Write {
        /// The NBD request had FUA: the secondary acks only once the write is on stable storage.
        public static let fua: UInt16 = 1 << 0
        /// The write covers whole bitmap blocks that are out of sync (a resync is running): once
        /// written, the receiver may clear their bits (DRBD's DP_MAY_SET_IN_SYNC).
        public static let setsInSync: UInt16 = 1 << 1
        /// `zeroes` only: the range must be allocated (NBD_CMD_FLAG_NO_HOLE): zero it, do not punch.
        public static let noHole: UInt16 = 1 << 2
    }

    public enum ResyncData {
        /// The source range reads as zeros: no payload follows, and the target zeroes the range.
        public static let zero: UInt16 = 1 << 0
    }

    public enum State {
        /// Resync is paused by the administrator on the sending node.
        public static let resyncPaused: UInt16 = 1 << 0
        /// Application I/O is suspended on the sending node (fencing, quorum loss).
        public static let ioSuspended: UInt16 = 1 << 1
        /// This stateChange answers the peer's request with the same sequence.
        public static let reply: UInt16 = 1 << 2
        /// With `reply`: the request is refused.
        public static let refused: UInt16 = 1 << 3
        /// To a witness, from a primary: it writes without its peer, whose data is therefore
        /// outdated (the witness must not let the peer become primary).
        public static let peerOutdated: UInt16 = 1 << 4
        /// From a secondary that rolls back to a barrier (or rolled back, and its peer has not
        /// resynced from it yet): the peer's data is about to be older than this node's. As a
        /// request (nonzero id), to the peer: outdate yourself, then reply; to a witness: record
        /// it and promote the peer no more. In a witness's refusal of a promotion: refused
        /// because the peer rolls back (Protocol/barriers.md "Rollback and the witness").
        public static let rollingBack: UInt16 = 1 << 5
        public static let all: UInt16 = resyncPaused | ioSuspended | reply | refused | peerOutdated | rollingBack
    }
}

/// A node's role (peer.md "Roles and disk states").
public enum PeerRole: UInt8, Sendable, CaseIterable {
    case secondary = 0
    case primary = 1
}

/// A node's disk state, DRBD's names and order (only `upToDate` may be primary).
public enum PeerDiskState: UInt8, Sendable, CaseIterable {
    /// No backing device (detached after an I/O error, or not attached yet).
    case diskless = 0
    /// The backing device failed; detaching.
    case failed = 1
    /// Being written by a resync as its target: not usable until the resync is done.
    case inconsistent = 2
    /// Consistent but known to be older than the peer's (the peer went on without it).
    case outdated = 3
    /// Consistent, and whether it is current is not known yet (before the handshake).
    case consistent = 4
    case upToDate = 5
}

/// Digest algorithms for online verify. Each digest covers `PeerProtocol.digestBlockBytes`.
public enum PeerDigestAlgorithm: UInt8, Sendable, CaseIterable {
    case crc32c = 1
    case sha256 = 2

    /// Bytes of one digest: 4 for CRC-32C (big-endian), 32 for SHA-256.
    public var digestBytes: Int {
        switch self {
        case .crc32c: return 4
        case .sha256: return 32
        }
    }

    public static let digestBytesMax = 32
}

/// Why a node closes the link (peer.md "Disconnect reasons"). Codes the receiver does not know
/// are still accepted: the link goes down either way, and the text explains.
public struct PeerDisconnectReason: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// Administrative disconnect or shutdown; the disconnecting primary outdates the secondary.
    public static let shutdown = PeerDisconnectReason(rawValue: 0)
    public static let versionMismatch = PeerDisconnectReason(rawValue: 1)
    /// Device sizes differ.
    public static let sizeMismatch = PeerDisconnectReason(rawValue: 2)
    /// Resource name, node id or bitmap granularity do not match the configuration.
    public static let configMismatch = PeerDisconnectReason(rawValue: 3)
    /// Both sides changed the data since they last agreed; an administrator must choose.
    public static let splitBrain = PeerDisconnectReason(rawValue: 4)
    /// The generation UUIDs share no history: these are not two copies of one device.
    public static let unrelatedData = PeerDisconnectReason(rawValue: 5)
    /// Both would be primary, or the role change was refused.
    public static let roleConflict = PeerDisconnectReason(rawValue: 6)
    /// A frame failed to decode or broke the protocol (a message out of place).
    public static let protocolError = PeerDisconnectReason(rawValue: 7)
    /// The peer did not answer in time (ping or acknowledgement).
    public static let timeout = PeerDisconnectReason(rawValue: 8)
    /// The sender's backing device failed and it cannot go on replicating.
    public static let diskFailure = PeerDisconnectReason(rawValue: 9)
    /// Neither side may become sync source (both outdated or inconsistent).
    public static let noUpToDateData = PeerDisconnectReason(rawValue: 10)
    /// The sender rolls its device back to a barrier (`tandem rollback`): its image becomes the
    /// newest generation, so the receiver's data is outdated until it resyncs from the sender,
    /// and it must not be promoted (by the witness either) meanwhile. The link comes back.
    public static let rollback = PeerDisconnectReason(rawValue: 11)
}

// MARK: Message values

/// Generation UUIDs (peer.md "Generation UUIDs"); the low bit of `current` is set while primary.
public struct PeerGenerationUUIDs: Sendable, Equatable {
    public var current: UInt64
    /// The current UUID at the moment the peer was lost (0 when the bitmap is clean).
    public var bitmap: UInt64
    /// Older current UUIDs, newest first; exactly `PeerProtocol.historyUUIDCount`, 0 when unused.
    public var history: [UInt64]

    public init(current: UInt64, bitmap: UInt64, history: [UInt64]) {
        self.current = current
        self.bitmap = bitmap
        self.history = history
    }
}

/// The first message each side sends (peer.md "hello").
public struct PeerHello: Sendable, Equatable {
    public var versionMin: UInt16
    public var versionMax: UInt16
    public var nodeID: UInt8
    public var role: PeerRole
    public var diskState: PeerDiskState
    /// `PeerFlags.Hello` bits.
    public var flags: UInt16
    /// 1 to 64 bytes of `[A-Za-z0-9._-]`.
    public var resourceName: String
    /// Usable size of the replicated device; a multiple of `Limits.blockSize`.
    public var deviceSizeBytes: UInt64
    /// Bytes per bitmap bit: a power of two from 4 KiB to 1 MiB; both sides must agree.
    public var bitmapGranularityBytes: UInt32
    public var uuids: PeerGenerationUUIDs
    /// Bits set in the sender's dirty bitmap: the automatic split-brain policies compare them.
    public var outOfSyncBits: UInt64
    /// Wall-clock time (Unix milliseconds) the sender last became primary, 0 if unknown or never
    /// (the `discard-younger-primary` policy).
    public var primarySinceMillis: UInt64

    public init(
        versionMin: UInt16 = PeerProtocol.versionMin, versionMax: UInt16 = PeerProtocol.versionMax,
        nodeID: UInt8, role: PeerRole, diskState: PeerDiskState, flags: UInt16, resourceName: String,
        deviceSizeBytes: UInt64, bitmapGranularityBytes: UInt32, uuids: PeerGenerationUUIDs,
        outOfSyncBits: UInt64 = 0, primarySinceMillis: UInt64 = 0
    ) {
        self.outOfSyncBits = outOfSyncBits
        self.primarySinceMillis = primarySinceMillis
        self.versionMin = versionMin
        self.versionMax = versionMax
        self.nodeID = nodeID
        self.role = role
        self.diskState = diskState
        self.flags = flags
        self.resourceName = resourceName
        self.deviceSizeBytes = deviceSizeBytes
        self.bitmapGranularityBytes = bitmapGranularityBytes
        self.uuids = uuids
    }

    /// Whether `name` may be a resource name: the wire refuses anything else.
    public static func isValidResourceName<Bytes: Collection>(_ name: Bytes) -> Bool where Bytes.Element == UInt8 {
        guard !name.isEmpty, name.count <= PeerProtocol.resourceNameBytesMax else { return false }
        return name.allSatisfy { b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A)
                || b == 0x2E || b == 0x5F || b == 0x2D
        }
    }
}

/// The block extension of a block message (peer.md "Block extension").
public struct PeerBlock: Sendable, Equatable {
    /// Byte offset on the device.
    public var offset: UInt64
    /// The write epoch of `data`, `trim` and `zeroes`; 0 in `resyncData`.
    public var epoch: UInt64
    /// Bytes of device the message covers (for `data`, also the payload length).
    public var length: UInt32
    /// `resyncData` only: 0, or the errno of the source's failed read (then nothing follows).
    public var result: UInt32

    public init(offset: UInt64, epoch: UInt64 = 0, length: UInt32, result: UInt32 = 0) {
        self.offset = offset
        self.epoch = epoch
        self.length = length
        self.result = result
    }

    /// The payload bytes a block message of `type` and `flags` carries with this extension.
    public func payloadLength(type: PeerMessageType, flags: UInt16) -> Int {
        switch type {
        case .data: return Int(length)
        case .resyncData: return result == 0 && flags & PeerFlags.ResyncData.zero == 0 ? Int(length) : 0
        case .trim, .zeroes: return 0
        default: preconditionFailure("\(type) has no block extension")
        }
    }
}

/// An application write as replicated (`data`, `trim`, `zeroes`); `id` is the header sequence.
public struct PeerWrite: Sendable, Equatable {
    public var id: UInt64
    public var offset: UInt64
    public var length: UInt32
    public var epoch: UInt64
    /// `PeerFlags.Write` bits.
    public var flags: UInt16

    public init(id: UInt64, offset: UInt64, length: UInt32, epoch: UInt64, flags: UInt16 = 0) {
        self.id = id
        self.offset = offset
        self.length = length
        self.epoch = epoch
        self.flags = flags
    }
}

/// A resync block from source to target; `id` is 0 when pushed, the request's id when answering
/// a `resyncRequest`.
public struct PeerResyncData: Sendable, Equatable {
    public var id: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// 0, or the errno of the source's read (no payload; the range stays out of sync).
    public var result: UInt32
    /// `PeerFlags.ResyncData` bits.
    public var flags: UInt16

    public init(id: UInt64, offset: UInt64, length: UInt32, result: UInt32 = 0, flags: UInt16 = 0) {
        self.id = id
        self.offset = offset
        self.length = length
        self.result = result
        self.flags = flags
    }
}

/// The sender's whole state after a change of role, disk state, flags or generation UUIDs
/// (peer.md "stateChange"); `id` is the header sequence.
public struct PeerStateChange: Sendable, Equatable {
    /// 0 for an announcement; a request's id in the request and in its reply.
    public var id: UInt64
    public var role: PeerRole
    public var diskState: PeerDiskState
    /// `PeerFlags.State` bits.
    public var flags: UInt16
    public var uuids: PeerGenerationUUIDs

    public init(id: UInt64 = 0, role: PeerRole, diskState: PeerDiskState, flags: UInt16 = 0, uuids: PeerGenerationUUIDs) {
        self.id = id
        self.role = role
        self.diskState = diskState
        self.flags = flags
        self.uuids = uuids
    }
}

/// Part of a bitmap sent on connect: bit `firstBit + i` is bit `i % 64` of `words[i / 64]`.
public struct PeerBitmapChunk: Sendable, Equatable {
    /// A multiple of 64.
    public var firstBit: UInt64
    /// 1 ... `PeerProtocol.bitmapChunkBitsMax`; bits past it in the last word are zero.
    public var bitCount: UInt32
    /// `(bitCount + 63) / 64` words, little-endian on the wire.
    public var words: [UInt64]

    public init(firstBit: UInt64, bitCount: UInt32, words: [UInt64]) {
        self.firstBit = firstBit
        self.bitCount = bitCount
        self.words = words
    }
}

/// The digests of a verified range (peer.md "verifyDigest").
public struct PeerVerifyDigest: Sendable, Equatable {
    /// The `verifyRequest`'s id.
    public var id: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// 0, or the errno of the target's read (then there are no digests).
    public var result: UInt32
    public var algorithm: PeerDigestAlgorithm
    /// `length / digestBlockBytes` digests of `algorithm.digestBytes` each, back to back.
    public var digests: [UInt8]

    public init(id: UInt64, offset: UInt64, length: UInt32, result: UInt32 = 0,
                algorithm: PeerDigestAlgorithm, digests: [UInt8]) {
        self.id = id
        self.offset = offset
        self.length = length
        self.result = result
        self.algorithm = algorithm
        self.digests = digests
    }
}

/// One decoded message. Block messages appear here too (the simulator and the tests use them);
/// the node's data path uses `PeerHeader.block` and receives payloads into its own buffers.
public enum PeerMessage: Sendable, Equatable {
    case hello(PeerHello)
    case ping(id: UInt64)
    case pingAck(id: UInt64)
    case stateChange(PeerStateChange)
    case disconnect(reason: PeerDisconnectReason, text: String)

    case data(PeerWrite, payload: [UInt8])
    case trim(PeerWrite)
    case zeroes(PeerWrite)
    /// `result` is 0 or an errno of the secondary's write.
    case writeAck(id: UInt64, result: UInt32)
    case flush(id: UInt64)
    case flushAck(id: UInt64, result: UInt32)
    /// Closes `epoch`: no more writes of it follow.
    case barrier(epoch: UInt64)
    /// All `writes` writes of `epoch` are on the secondary's stable storage (`result` 0), or an
    /// errno says they may not be.
    case barrierAck(epoch: UInt64, writes: UInt32, result: UInt32)
    case snapshot(BarrierInfo)

    case bitmapChunk(PeerBitmapChunk)
    /// The sender's whole bitmap has `totalBits` bits of which `setBits` are set.
    case bitmapDone(totalBits: UInt64, setBits: UInt64)
    /// `id` is nonzero and comes back in the answering `resyncData`.
    case resyncRequest(id: UInt64, offset: UInt64, length: UInt32)
    case resyncData(PeerResyncData, payload: [UInt8])
    case resyncAck(id: UInt64, offset: UInt64, length: UInt32, result: UInt32)
    case resyncDone

    case verifyRequest(id: UInt64, offset: UInt64, length: UInt32, algorithm: PeerDigestAlgorithm)
    case verifyDigest(PeerVerifyDigest)

    public var type: PeerMessageType {
        switch self {
        case .hello: return .hello
        case .ping: return .ping
        case .pingAck: return .pingAck
        case .stateChange: return .stateChange
        case .disconnect: return .disconnect
        case .data: return .data
        case .trim: return .trim
        case .zeroes: return .zeroes
        case .writeAck: return .writeAck
        case .flush: return .flush
        case .flushAck: return .flushAck
        case .barrier: return .barrier
        case .barrierAck: return .barrierAck
        case .snapshot: return .snapshot
        case .bitmapChunk: return .bitmapChunk
        case .bitmapDone: return .bitmapDone
        case .resyncRequest: return .resyncRequest
        case .resyncData: return .resyncData
        case .resyncAck: return .resyncAck
        case .resyncDone: return .resyncDone
        case .verifyRequest: return .verifyRequest
        case .verifyDigest: return .verifyDigest
        }
    }
}
