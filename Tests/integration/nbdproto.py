"""A deliberately small, raw-socket NBD client (fixed newstyle) for feeding a
server malformed and edge-case traffic.  It trusts nothing and bounds every
wait with a socket timeout.  Constants follow NetworkBlockDevice/nbd doc/proto.md.
"""

import socket
import struct
import time

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk types
RT_NONE = 0
RT_OFFSET_DATA = 1
RT_OFFSET_HOLE = 2
RT_BLOCK_STATUS = 5
RT_ERROR = (1 << 15) | 1
RT_ERROR_OFFSET = (1 << 15) | 2
REPLY_FLAG_DONE = 1

# errno values on the wire (fixed by the protocol, not the host)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERRNO_NAMES = {EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL",
               ENOSPC: "ENOSPC", EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP",
               ESHUTDOWN: "ESHUTDOWN"}


class Closed(Exception):
    """The peer closed (or reset) the connection."""


class RawNBD:
    def __init__(self, host, port, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.server_flags = None
        self.export_size = None
        self.transmission_flags = None
        self.structured = False
        self.infos = {}

    # -- byte level -------------------------------------------------------
    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed(f"send failed: {e!r}") from e

    def recv_exact(self, n):
        chunks = []
        left = n
        while left:
            try:
                b = self.sock.recv(min(left, 1 << 20))
            except ConnectionResetError as e:
                raise Closed(f"reset after {n - left}/{n} bytes") from e
            if not b:
                raise Closed(f"EOF after {n - left}/{n} bytes")
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)

    def wait_closed(self, timeout=10.0):
        """Read and discard until EOF/reset; return the bytes seen.  Raises
        AssertionError if the peer is still open after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        seen = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"server did not close the connection within {timeout}s "
                    f"(received {len(seen)} bytes meanwhile: {bytes(seen[:64])!r})")
            self.sock.settimeout(left)
            try:
                b = self.sock.recv(65536)
            except ConnectionResetError:
                return bytes(seen)
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(self.timeout)
            if not b:
                return bytes(seen)
            seen += b

    # -- handshake --------------------------------------------------------
    def read_greeting(self):
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, f"bad server magic {magic:#x}"
        assert opt_magic == IHAVEOPT, f"not newstyle: {opt_magic:#x}"
        self.server_flags = flags
        return flags

    def send_client_flags(self, flags):
        self.send(struct.pack(">I", flags))

    def handshake(self, client_flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        flags = self.read_greeting()
        assert flags & FLAG_FIXED_NEWSTYLE, f"server lacks FIXED_NEWSTYLE: {flags:#x}"
        self.send_client_flags(client_flags)
        return flags

    def send_option(self, opt, data=b"", magic=IHAVEOPT, length=None):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, opt, length) + data)

    def recv_option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        assert length <= 1 << 24, f"absurd option reply length {length}"
        data = self.recv_exact(length) if length else b""
        return opt, rtype, data

    def option(self, opt, data=b""):
        """Send one option and collect replies up to the final one (ACK or an
        error).  Returns (final_type, [(type, data), ...])."""
        self.send_option(opt, data)
        replies = []
        while True:
            ropt, rtype, rdata = self.recv_option_reply()
            assert ropt == opt, f"reply for option {ropt}, expected {opt}"
            replies.append((rtype, rdata))
            if rtype == REP_ACK or rtype & REP_FLAG_ERROR:
                return rtype, replies

    @staticmethod
    def go_payload(name, infos=(INFO_BLOCK_SIZE,)):
        if isinstance(name, str):
            name = name.encode()
        return (struct.pack(">I", len(name)) + name
                + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))

    def structured_reply(self):
        rtype, _ = self.option(OPT_STRUCTURED_REPLY)
        assert rtype == REP_ACK, f"STRUCTURED_REPLY refused: {rtype:#x}"
        self.structured = True

    def go(self, name="tandem", infos=(INFO_BLOCK_SIZE,), opt=OPT_GO):
        """NBD_OPT_GO (or INFO).  Returns the final reply type; on ACK the export
        size/flags and info replies are recorded."""
        final, replies = self.option(opt, self.go_payload(name, infos))
        if final != REP_ACK:
            return final
        for rtype, rdata in replies:
            if rtype != REP_INFO:
                continue
            (itype,) = struct.unpack(">H", rdata[:2])
            self.infos[itype] = rdata[2:]
            if itype == INFO_EXPORT:
                self.export_size, self.transmission_flags = struct.unpack(">QH", rdata[2:12])
        assert self.export_size is not None, "GO/INFO ACKed without NBD_INFO_EXPORT"
        return final

    def block_size_info(self):
        raw = self.infos.get(INFO_BLOCK_SIZE)
        if raw is None:
            return None
        return struct.unpack(">III", raw[:12])

    def connect(self, name="tandem", structured=False):
        self.handshake()
        if structured:
            self.structured_reply()
        rtype = self.go(name)
        assert rtype == REP_ACK, f"GO {name!r} failed: {rtype:#x}"
        return self

    # -- transmission -----------------------------------------------------
    def send_request(self, cmd, offset=0, length=0, flags=0, cookie=1,
                     payload=b"", magic=REQUEST_MAGIC):
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)

    def recv_simple_reply(self, read_len=0):
        """Simple reply (no structured replies negotiated).  Returns
        (error, cookie, data).  Per the protocol, read data follows only when
        error == 0."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, f"bad simple reply magic {magic:#x}"
        data = b""
        if error == 0 and read_len:
            data = self.recv_exact(read_len)
        return error, cookie, data

    def _recv_after_magic(self, magic):
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return "simple", error, cookie, None
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        assert length <= (1 << 25) + 64, f"absurd chunk length {length}"
        payload = self.recv_exact(length) if length else b""
        return "chunk", (flags, rtype), cookie, payload

    def recv_chunk(self):
        """One structured reply chunk: (flags, type, cookie, payload)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        assert magic == STRUCTURED_REPLY_MAGIC, f"expected structured reply, magic {magic:#x}"
        _, (flags, rtype), cookie, payload = self._recv_after_magic(magic)
        return flags, rtype, cookie, payload

    def recv_reply(self, read_len_for=None):
        """Next complete reply of any kind.  `read_len_for` maps cookie -> read
        length for simple replies to reads (data follows a successful one).
        Returns dict(kind, cookie, error, data, chunks)."""
        read_len_for = read_len_for or {}
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        kind, a, cookie, payload = self._recv_after_magic(magic)
        if kind == "simple":
            data = b""
            n = read_len_for.get(cookie, 0)
            if a == 0 and n:
                data = self.recv_exact(n)
            return {"kind": "simple", "cookie": cookie, "error": a, "data": data, "chunks": []}
        chunks = []
        error = 0
        while True:
            flags, rtype = a
            chunks.append((rtype, payload))
            if rtype & (1 << 15):
                (err,) = struct.unpack(">I", payload[:4])
                error = error or err
            if flags & REPLY_FLAG_DONE:
                break
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            assert magic == STRUCTURED_REPLY_MAGIC, (
                f"simple reply (magic {magic:#x}) in the middle of a structured reply")
            _, a, c2, payload = self._recv_after_magic(magic)
            assert c2 == cookie, "interleaved chunks are not expected in this test"
        return {"kind": "structured", "cookie": cookie, "error": error, "data": None, "chunks": chunks}

    @staticmethod
    def assemble_read(offset, length, chunks):
        buf = bytearray(length)
        for rtype, payload in chunks:
            if rtype == RT_OFFSET_DATA:
                (off,) = struct.unpack(">Q", payload[:8])
                rel = off - offset
                assert 0 <= rel and rel + len(payload) - 8 <= length, "data chunk out of range"
                buf[rel:rel + len(payload) - 8] = payload[8:]
            elif rtype == RT_OFFSET_HOLE:
                off, hlen = struct.unpack(">QI", payload[:12])
                assert 0 <= off - offset and off - offset + hlen <= length, "hole chunk out of range"
        return bytes(buf)

    def request(self, cmd, offset=0, length=0, flags=0, cookie=1, payload=b""):
        """Send one request and wait for its (simple or structured) reply.
        Returns (error, data)."""
        self.send_request(cmd, offset, length, flags, cookie, payload)
        read_len = length if cmd == CMD_READ else 0
        r = self.recv_reply({cookie: read_len})
        assert r["cookie"] == cookie, f"cookie {r['cookie']:#x} != {cookie:#x}"
        self.last_reply_kind = r["kind"]
        if r["error"] or cmd != CMD_READ:
            return r["error"], b""
        if r["kind"] == "simple":
            assert not self.structured, "simple reply to READ after structured replies were negotiated"
            return 0, r["data"]
        return 0, self.assemble_read(offset, length, r["chunks"])

    def disconnect(self):
        try:
            self.send_request(CMD_DISC, cookie=0xD15C)
        except Closed:
            pass
        self.close()


def errname(e):
    return ERRNO_NAMES.get(e, str(e))
