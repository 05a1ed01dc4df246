/// Numbers from the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`).
public enum NBD {
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    public static let optionMagic: UInt64 = 0x4948_4156_454f_5054  // "IHAVEOPT"
    public static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef

    public static let requestHeaderBytes = 28
    public static let simpleReplyBytes = 16
    public static let structuredChunkHeaderBytes = 20

    /// Handshake flags (server) and client flags.
    public enum HandshakeFlag {
        public static let fixedNewstyle: UInt16 = 1 << 0
        public static let noZeroes: UInt16 = 1 << 1
    }

    public enum ClientFlag {
        public static let fixedNewstyle: UInt32 = 1 << 0
        public static let noZeroes: UInt32 = 1 << 1
        public static let known: UInt32 = fixedNewstyle | noZeroes
    }

    public enum Option: UInt32, Sendable {
        case exportName = 1
        case abort = 2
        case list = 3
        case startTLS = 5
        case info = 6
        case go = 7
        case structuredReply = 8
        case listMetaContext = 9
        case setMetaContext = 10
    }

    public enum Reply {
        public static let ack: UInt32 = 1
        public static let server: UInt32 = 2
        public static let info: UInt32 = 3
        public static let metaContext: UInt32 = 4
        public static let errUnsupported: UInt32 = 0x8000_0001
        public static let errPolicy: UInt32 = 0x8000_0002
        public static let errInvalid: UInt32 = 0x8000_0003
        public static let errPlatform: UInt32 = 0x8000_0004
        public static let errTLSRequired: UInt32 = 0x8000_0005
        public static let errUnknown: UInt32 = 0x8000_0006
        public static let errShutdown: UInt32 = 0x8000_0007
        public static let errBlockSizeRequired: UInt32 = 0x8000_0008
        public static let errTooBig: UInt32 = 0x8000_0009
    }

    public enum Info {
        public static let export: UInt16 = 0
        public static let name: UInt16 = 1
        public static let description: UInt16 = 2
        public static let blockSize: UInt16 = 3
    }

    public enum TransmissionFlag {
        public static let hasFlags: UInt16 = 1 << 0
        public static let readOnly: UInt16 = 1 << 1
        public static let sendFlush: UInt16 = 1 << 2
        public static let sendFUA: UInt16 = 1 << 3
        public static let rotational: UInt16 = 1 << 4
        public static let sendTrim: UInt16 = 1 << 5
        public static let sendWriteZeroes: UInt16 = 1 << 6
        public static let sendDF: UInt16 = 1 << 7
        public static let canMultiConn: UInt16 = 1 << 8
        public static let sendResize: UInt16 = 1 << 9
        public static let sendCache: UInt16 = 1 << 10
        public static let sendFastZero: UInt16 = 1 << 11
    }

    public enum Command: UInt16, Sendable {
        case read = 0
        case write = 1
        case disconnect = 2
        case flush = 3
        case trim = 4
        case cache = 5
        case writeZeroes = 6
        case blockStatus = 7
    }

    public enum CommandFlag {
        public static let fua: UInt16 = 1 << 0
        public static let noHole: UInt16 = 1 << 1
        public static let dontFragment: UInt16 = 1 << 2
        public static let reqOne: UInt16 = 1 << 3
        public static let fastZero: UInt16 = 1 << 4
    }

    public enum ChunkType {
        public static let none: UInt16 = 0
        public static let offsetData: UInt16 = 1
        public static let offsetHole: UInt16 = 2
        public static let blockStatus: UInt16 = 5
        public static let error: UInt16 = 0x8001
        public static let errorOffset: UInt16 = 0x8002
    }

    public static let chunkFlagDone: UInt16 = 1

    /// Error values on the wire (Linux numbering, as the spec fixes them).
    public enum Errno: UInt32, Sendable {
        case ok = 0
        case perm = 1
        case io = 5
        case nomem = 12
        case inval = 22
        case nospc = 28
        case overflow = 75
        case notsup = 95
        case shutdown = 108

        /// Maps a local errno to what the spec allows on the wire; anything unexpected is EIO.
        public init(localErrno: Int32) {
            switch localErrno {
            case 1, 13, 30: self = .perm  // EPERM, EACCES, EROFS
            case 12: self = .nomem
            case 22: self = .inval
            case 28, 27, 122: self = .nospc  // ENOSPC, EFBIG, EDQUOT
            case 75: self = .overflow
            case 95: self = .notsup  // EOPNOTSUPP
            case 108: self = .shutdown
            default: self = .io
            }
        }
    }

    /// Meta context ids this server hands out: `base:allocation` is always 1, dirty bitmaps get
    /// 2, 3, ... in the order a SET_META_CONTEXT selected them.
    public static let baseAllocationContextID: UInt32 = 1
    public static let baseAllocationName = "base:allocation"
    /// base:allocation extent flags.
    public static let stateHole: UInt32 = 1 << 0
    public static let stateZero: UInt32 = 1 << 1
    /// qemu's changed-block contexts, `qemu:dirty-bitmap:<name>` (qemu docs/interop/nbd.rst):
    /// one flag, set where the extent is dirty.
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"
    public static let stateDirty: UInt32 = 1 << 0
}
