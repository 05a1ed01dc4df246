/// Every bound Tandem enforces, in one place, with the relations between them asserted.
///
/// A limit that is not here does not exist: queues, sizes and loops take their bounds from this
/// file, so a reader can see the whole resource envelope of a node at once (TigerBeetle's rule).
public enum Limits {
    /// Tandem's block: device sizes and (later) bitmap bits are multiples of it.
    public static let blockSize = 4096

    // MARK: NBD handshake

    /// Options one client may send before it must choose an export.
    public static let nbdOptionsPerHandshakeMax = 128
    /// Bytes of data in one option; a longer option closes the connection unread.
    public static let nbdOptionLengthMax = 16 * 1024
    /// Bytes in one string (export name, meta-context query), as the spec's 4096.
    public static let nbdStringLengthMax = 4096
    /// Meta-context queries in one LIST/SET_META_CONTEXT option.
    public static let nbdMetaContextQueriesMax = 32
    /// Information requests in one INFO/GO option.
    public static let nbdInfoRequestsMax = 64

    // MARK: NBD transmission

    /// Largest READ or WRITE payload (advertised as the maximum block size).
    public static let nbdRequestBytesMax = 32 * 1024 * 1024
    /// Requests one connection may have in flight; the next waits in the socket.
    public static let nbdRequestsInFlightMax = 128
    /// Extents in one BLOCK_STATUS reply.
    public static let nbdBlockStatusExtentsMax = 1024
    /// Concurrent NBD connections to one node (default; the CLI may lower it).
    public static let nbdConnectionsMax = 64
    /// Event loops (threads) of one `tandem serve`, each with its own ring and buffer pool.
    public static let serveLoopsMax = 16
    /// Loops `tandem serve` runs by default: one per CPU up to this.
    public static let serveLoopsDefaultMax = 4
    /// Milliseconds a loop of `tandem serve` may take to start its engine.
    public static let serveLoopStartMillisMax = 5000
    /// Bytes of a connection's plaintext receive buffer.
    public static let nbdReceiveBufferBytes = 256 * 1024
    /// Replies gathered into one sendmsg.
    public static let nbdRepliesPerSendMax = 64
    /// Seconds a client may take to finish the handshake.
    public static let nbdHandshakeTimeoutSeconds = 30
    /// Seconds a shutting-down node waits for in-flight requests before closing connections.
    public static let shutdownDrainSeconds = 10

    // MARK: TLS

    /// Bytes of ciphertext buffered per direction per connection.
    public static let tlsCiphertextBufferBytes = 256 * 1024
    /// Largest plaintext handed to one TLS record write.
    public static let tlsRecordPlaintextMax = 16 * 1024

    // MARK: I/O engine

    /// Submission-queue entries of the io_uring (completion queue is four times larger).
    public static let ringEntries = 1024
    /// Page-cache writes larger than this are written in pieces of this size. The page cache
    /// then holds no folio larger: a small write into a large ext4 folio walks all its block
    /// buffers (Linux 6.18): a 4 KiB random write into a file written in 1 MiB chunks cost
    /// 6.9-13 µs here, in 256 KiB chunks 3.2-4.5 µs, in 4 KiB ones 1.2-1.5 µs.
    public static let pageCacheWritePieceBytes = 256 << 10
    /// Completions reaped per loop iteration.
    public static let completionBatchMax = 256
    /// Worker threads of the thread-pool disk engine.
    public static let diskThreads = 8
    /// Disk operations queued to the thread pool or libaio at once: every request of every
    /// connection, so submission never has to wait for room.
    public static let diskQueueDepthMax = nbdConnectionsMax * nbdRequestsInFlightMax
    /// Microseconds a wait may poll for completions before its thread sleeps (`PollPolicy`):
    /// longer than a client's turnaround at queue depth 1 here (25-30 µs), an O_DIRECT 4 KiB
    /// write (60-90 µs) and the peer's ack on loopback, so those are caught without a cross-CPU
    /// wake-up. Against 50 µs, in three alternating runs each: replicated QD1 p50 median 163
    /// against 243 µs, 1 MiB and 4 KiB writes unchanged within the noise. 0 turns polling off.
    public static let pollMicrosDefault = 100
    public static let pollMicrosMax = 1000
    /// Seconds a control-socket or metrics connection has to send its whole request before it
    /// is closed.
    public static let streamRequestTimeoutSeconds = 10
    /// Seconds a clean stop of a connected primary waits for its final flush on both sides
    /// (`ReplicatedNode.settle`) before it stops anyway.
    public static let stopSettleSeconds = 5
    /// Timers the event loop tracks at once.
    public static let timersMax = 4096

    // MARK: Resync

    /// Resync runs a source has sent and not yet had acknowledged, at most (its resync slots,
    /// `ReplicaCore.Configuration.resyncInFlightMax`). A target holds the acks of written runs
    /// until a flush covers them, so it keeps at most this many: a source that sends more breaks
    /// the protocol (peer.md "Resync").
    public static let resyncRunsUnacknowledgedMax = 16

    /// SO_SNDBUF of an NBD client's socket (the kernel doubles it for its bookkeeping): 0 leaves
    /// the kernel's autotuning, which grows it to `net.ipv4.tcp_wmem`'s maximum (4 MiB here).
    /// Bounded, a large reply waits in the server's buffer rather than the socket, and the client
    /// copies what it receives while it is still in the CPU's cache, as the read window
    /// (`NBDConnection.readWindowBytes`) keeps it for the server's own copies. 1 MiB reads at
    /// 1 connection, alternating runs on 2 cores: 3612-4177 MiB/s autotuned, 4100-4127 at
    /// 128 KiB, 4317-4821 at 256 KiB, 4705-5030 at 384-512 KiB, 3868-4202 at 768 KiB and
    /// 3918-4000 at 1 MiB (nbdkit 4873-4977). It also caps what one connection has in flight
    /// on a long path: 1 MiB is 8 Gbit/s at a 1 ms round trip (`--send-buffer-kib 0` to leave it
    /// to the kernel).
    public static let nbdSendBufferBytesDefault = 512 << 10
    /// The largest send buffer either setting takes.
    public static let socketSendBufferBytesMax = 64 << 20

    // MARK: Replication link

    /// SO_SNDBUF of the replication link's socket, both ends (the resource file's
    /// `link-send-buffer`; 0: the kernel's autotuning). The TLS records a node sends wait in its
    /// own buffer instead of piling up in the socket, and the peer decrypts them while they are
    /// still in the CPU's cache. A pair's 1 MiB writes through the page cache on 2 cores,
    /// alternating runs: 1008-1621 MiB/s autotuned, 1703-2044 at 256 KiB, 1661-1672 at 512 KiB,
    /// 1192-1670 at 128 KiB, 1300-1486 at 64 KiB; the two nodes' CPU per write 0.95-1.52 ms
    /// autotuned, 0.77-0.85 ms at 256 KiB. 4 KiB random and QD1 writes unchanged.
    public static let linkSendBufferBytesDefault = 256 << 10

    /// Writes a primary keeps in its transfer log (acknowledged by the peer, not yet covered by a
    /// peer flush; 32 bytes each, 2 MiB). At half of it the primary asks the peer for a flush,
    /// so this sets how often the secondary writes back its page cache under a stream of small
    /// writes, and what it may lose in a power cut (marked out of sync, resynced at the next
    /// connect). Under 4 KiB random writes through the page cache the secondary's flushes took
    /// 38% of its CPU with 8192 entries and 23% with this bound, and a pair ran 46k and 53k IOPS
    /// at 1 and 4 connections against 51k and 63k (`tandem bench`, session 14).
    public static let transferLogEntriesMax = 65536

    /// Peer requests a secondary holds at once: replicated writes not yet done (on the disk, or
    /// queued behind an overlapping write or a barrier), flushes waiting for earlier writes or on
    /// the disk, and barriers not yet acknowledged. A legitimate primary can come close (every
    /// client request of every connection, `diskQueueDepthMax`, plus its own transfer-log
    /// flushes and one barrier per epoch), so the node does not drop it there: at this bound it
    /// stops reading the link until completions free room (back-pressure; the primary's requests
    /// wait in its send queue and socket). The core refuses a request past it as a protocol
    /// error, which only a node that did not stop reading can meet. Half the disk queue, so the
    /// secondary's resync writes and flushes, verify and served reads keep operation slots.
    public static let peerRequestsPendingMax = diskQueueDepthMax / 2

    /// Frames one link queues to send: every request the node can have in flight (a primary's
    /// client writes and flushes; a secondary's answers to `peerRequestsPendingMax` requests),
    /// each at most one frame, plus room for resync, verify and control traffic. Full only when
    /// the peer stops reading: the link then closes (peer.md 2.5).
    public static let peerSendQueueFramesMax = diskQueueDepthMax + 1024

    /// Checks how the limits relate; a node calls it once at start.
    public static func checkRelations() {
        precondition(nbdRequestBytesMax >= 32 * 1024 * 1024, "spec: SHOULD allow >= 32 MiB")
        precondition(nbdStringLengthMax <= nbdOptionLengthMax)
        precondition(nbdReceiveBufferBytes >= 28 * nbdRequestsInFlightMax)
        precondition(diskQueueDepthMax >= nbdRequestsInFlightMax)
        precondition(completionBatchMax <= ringEntries)
        // Every resync run in flight is one disk write on the target, then one held ack.
        precondition(resyncRunsUnacknowledgedMax > 0 && resyncRunsUnacknowledgedMax <= diskQueueDepthMax)
        // Each pending peer write or flush is at most one local operation; what else a secondary
        // submits (resync writes and their flush) needs room beside them.
        precondition(peerRequestsPendingMax > 0 && peerRequestsPendingMax + resyncRunsUnacknowledgedMax + 1 <= diskQueueDepthMax)
        precondition(peerSendQueueFramesMax > diskQueueDepthMax && peerSendQueueFramesMax > peerRequestsPendingMax + resyncRunsUnacknowledgedMax)
        precondition(tlsCiphertextBufferBytes >= 2 * (tlsRecordPlaintextMax + 256))
        checkMetadataRelations()
        checkBarrierRelations()
        PeerProtocol.checkRelations()
    }
}
