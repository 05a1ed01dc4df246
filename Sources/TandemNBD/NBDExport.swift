/// What a client may see of one export: its name, size, block sizes and what it supports.
public struct NBDExport: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var readOnly: Bool
    /// NBD_INFO_BLOCK_SIZE: minimum (alignment the backend needs), preferred, maximum payload.
    public var blockSizeMin: UInt32
    public var blockSizePreferred: UInt32
    public var blockSizeMax: UInt32
    /// Whether zeroing and trimming reach the backend as real operations (advertised as
    /// SEND_TRIM/SEND_WRITE_ZEROES/SEND_FAST_ZERO on writable exports).
    public var canTrim: Bool
    public var canZero: Bool
    public var canFastZero: Bool
    /// Changed-block bitmaps a client may select as `qemu:dirty-bitmap:<name>` contexts (the
    /// node's barriers); the list as it was when the client connected applies to it.
    public var dirtyBitmaps: [NBDDirtyBitmap] = []

    public init(
        name: String, description: String = "", size: UInt64, readOnly: Bool,
        blockSizeMin: UInt32, blockSizePreferred: UInt32 = 4096, blockSizeMax: UInt32,
        canTrim: Bool = true, canZero: Bool = true, canFastZero: Bool = true
    ) {
        precondition(blockSizeMin.nonzeroBitCount == 1 && blockSizeMin <= 65536, "spec: min is a power of 2 <= 64 KiB")
        precondition(blockSizePreferred.nonzeroBitCount == 1 && blockSizePreferred >= max(blockSizeMin, 512))
        precondition(blockSizeMax >= blockSizePreferred && blockSizeMax % blockSizeMin == 0)
        self.name = name
        self.description = description
        self.size = size
        self.readOnly = readOnly
        self.blockSizeMin = blockSizeMin
        self.blockSizePreferred = blockSizePreferred
        self.blockSizeMax = blockSizeMax
        self.canTrim = canTrim
        self.canZero = canZero
        self.canFastZero = canFastZero
    }

    /// Transmission flags, given whether structured replies were negotiated (DF needs them).
    public func transmissionFlags(structuredReplies: Bool) -> UInt16 {
        typealias F = NBD.TransmissionFlag
        var flags = F.hasFlags | F.sendFlush | F.sendFUA | F.canMultiConn | F.sendCache
        if structuredReplies { flags |= F.sendDF }
        if readOnly {
            flags |= F.readOnly
        } else {
            if canTrim { flags |= F.sendTrim }
            if canZero {
                flags |= F.sendWriteZeroes
                if canFastZero { flags |= F.sendFastZero }
            }
        }
        return flags
    }
}

/// How TLS is offered on the export (proto.md "TLS support").
public enum NBDTLSMode: Sendable, Equatable {
    /// No TLS: STARTTLS gets ERR_UNSUP.
    case none
    /// FORCEDTLS: nothing but STARTTLS and ABORT before TLS is up.
    case forced
}

/// A changed-block bitmap an export offers: the context `qemu:dirty-bitmap:<name>`, answered
/// by the server's source of changes for `key` (a barrier id).
public struct NBDDirtyBitmap: Sendable, Equatable {
    public var name: String
    public var key: UInt64

    public init(name: String, key: UInt64) {
        self.name = name
        self.key = key
    }
}

/// A meta context selected for a session (proto.md "Metadata querying").
public struct NBDMetaContext: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case baseAllocation
        case dirtyBitmap(key: UInt64)
    }

    public var id: UInt32
    public var name: String
    public var kind: Kind

    public init(id: UInt32, name: String, kind: Kind) {
        self.id = id
        self.name = name
        self.kind = kind
    }
}

/// What the handshake settled for one connection.
public struct NBDSession: Sendable, Equatable {
    public var export: NBDExport
    public var structuredReplies: Bool
    /// The meta contexts selected, in reply order (BLOCK_STATUS is allowed when not empty).
    public var contexts: [NBDMetaContext]
    public var transmissionFlags: UInt16

    public init(export: NBDExport, structuredReplies: Bool, contexts: [NBDMetaContext], transmissionFlags: UInt16) {
        self.export = export
        self.structuredReplies = structuredReplies
        self.contexts = contexts
        self.transmissionFlags = transmissionFlags
    }
}
