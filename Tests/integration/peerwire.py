"""Just enough of the peer protocol (Protocol/peer.md) to play a misbehaving peer in a test: a
TLS 1.3 endpoint with a node's own certificate, and frames built field by field, so values a
real node never sends (ids past 2^63, ranges past the device) arrive well formed."""

import socket
import ssl
import struct

MAGIC = 0x544E444D
VERSION = 1
HEADER = 32
BLOCK_HEADER = 56

HELLO, PING, PING_ACK, DATA, RESYNC_DATA, WRITE_ACK, VERIFY_DIGEST = 1, 2, 3, 16, 35, 19, 49
TRIM, FLUSH, FLUSH_ACK = 17, 20, 21
BLOCK_TYPES = {16, 17, 18, 35}


def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def frame(type_, sequence=0, payload=b"", flags=0, block=None):
    """One frame; `block` is (offset, epoch, length, result) for block messages."""
    payload_crc = crc32c(payload) if payload else 0
    header = struct.pack(">IHHHHIQII", MAGIC, VERSION, type_, flags, 0, len(payload), sequence, 0, payload_crc)
    if type_ in BLOCK_TYPES:
        header += struct.pack(">QQII", *block)
    header = header[:24] + struct.pack(">I", crc32c(header)) + header[28:]
    return header + payload


def verify_digest(id_, offset=0, length=4096, digests=b"\0\0\0\0"):
    """A CRC-32C verifyDigest for a 4 KiB range."""
    return frame(VERIFY_DIGEST, id_, struct.pack(">QIIBB", offset, length, 0, 1, 4) + digests)


def resync_data(id_, offset, payload):
    return frame(RESYNC_DATA, id_, payload, block=(offset, 0, len(payload), 0))


def data(id_, offset, payload, epoch=1):
    return frame(DATA, id_, payload, block=(offset, epoch, len(payload), 0))


def hello_as(their_hello, node_id, role=0):
    """A hello for node `node_id` made from the node's own (same resource, size, generations):
    enough to get past the handshake to the frames under test."""
    payload = bytearray(their_hello)
    payload[64] = node_id
    payload[65] = role
    return frame(HELLO, 0, bytes(payload))


def ping(id_):
    return frame(PING, id_)


def flush(id_):
    return frame(FLUSH, id_)


def trim(id_, offset, length, epoch=1):
    return frame(TRIM, id_, block=(offset, epoch, length, 0))


def read_frame(sock):
    """(type, sequence, payload) of the next frame on a TLS socket."""
    def exactly(n):
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("peer closed")
            out += chunk
        return out
    head = exactly(HEADER)
    magic, _, type_, _, _, length, sequence = struct.unpack(">IHHHHIQ", head[:24])
    assert magic == MAGIC, hex(magic)
    if type_ in BLOCK_TYPES:
        head += exactly(BLOCK_HEADER - HEADER)
    return type_, sequence, exactly(length)


def _context(server, pki, name):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(f"{pki}/{name}-cert.pem", f"{pki}/{name}-key.pem")
    ctx.load_verify_locations(f"{pki}/ca-cert.pem")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def dial(port, pki, name, timeout=10):
    """Connects to a node's peer port as node `name` (its certificate, so the node accepts)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return _context(False, pki, name).wrap_socket(raw)


class Listener:
    """Listens where a node dials its peer and answers as that peer (`name`'s certificate)."""

    def __init__(self, port, pki, name):
        self.ctx = _context(True, pki, name)
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(30)

    def accept(self):
        raw, _ = self.sock.accept()
        raw.settimeout(10)
        return self.ctx.wrap_socket(raw, server_side=True)

    def close(self):
        self.sock.close()


def until_closed(sock, timeout=10):
    """Reads (and drops) whatever the node sends until it closes the link: True, or False if it
    kept the link open for `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except socket.timeout:
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    finally:
        sock.close()
