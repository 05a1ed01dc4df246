"""Changed-block tracking on a running pair: the primary's NBD export offers a
`qemu:dirty-bitmap:<barrier>` meta context per barrier it created, and real clients (nbdinfo,
libnbd, qemu-img) read exactly the chunks written since that barrier: through the replication
link, while the link is down, and none after the primary restarts (it does not remember)."""

import json
import signal

import nbd

from conftest import KiB, MiB, TANDEM_BIN, free_port, run
from test_barriers_online import barrier_pair, create_barrier, tandem
from test_replication import SIZE, make_pair, qemu_io  # noqa: F401 (fixture)

CHUNK = 64 * KiB  # the default chunk-size, the tracker's granule on a 64 MiB device


def granules(ranges):
    """Byte ranges (offset, length) as the sorted, merged granule-aligned ranges a tracker at
    CHUNK granularity reports dirty."""
    marked = sorted({g for off, length in ranges for g in range(off // CHUNK, (off + length - 1) // CHUNK + 1)})
    out = []
    for g in marked:
        if out and out[-1][0] + out[-1][1] == g * CHUNK:
            out[-1] = (out[-1][0], out[-1][1] + CHUNK)
        else:
            out.append((g * CHUNK, CHUNK))
    return out


def dirty_by_libnbd(uri, context, size=SIZE):
    """(offset, length) of the dirty extents of `context`, with base:allocation selected too (a
    reply then carries one chunk per context); checks the extents cover the device in order."""
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context(context)
    h.connect_uri(uri)
    try:
        assert h.can_meta_context(context) and h.can_meta_context("base:allocation")
        extents, seen, off = [], set(), 0
        while off < size:
            got = []

            def cb(name, offset, entries, err):
                seen.add(name)
                if name == context:
                    assert offset == off
                    got.extend(zip(entries[0::2], entries[1::2]))
                return 0
            h.block_status(min(size - off, 32 * MiB), off, cb)
            assert got, "no extents for the bitmap"
            for length, flags in got:
                assert flags in (0, 1), flags
                extents.append((off, length, flags))
                off += length
        assert seen == {context, "base:allocation"}
    finally:
        h.shutdown()
    assert off == size
    return merge_dirty(extents)


def merge_dirty(extents):
    out = []
    for off, length, flags in extents:
        if not flags & 1:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


def dirty_by_nbdinfo(uri, context):
    cp = run(["nbdinfo", "--json", f"--map={context}", uri])
    rows = json.loads(cp.stdout_text)
    assert sum(r["length"] for r in rows) == SIZE
    return merge_dirty((r["offset"], r["length"], r["type"]) for r in rows)


def contexts_listed(uri, *queries):
    """NBD_OPT_LIST_META_CONTEXT with `queries` (none: a bare LIST of everything)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    h.opt_abort()
    return names


def test_backup_tools_read_just_the_changes_since_each_barrier(make_pair, tmp_path):
    p = barrier_pair(make_pair, tmp_path)
    qemu_io(p.uri, "write -P 0x11 0 16M", "flush")  # before any barrier: never reported
    first = create_barrier(p, "before-upgrade")
    assert contexts_listed(p.uri) == ["base:allocation", f"qemu:dirty-bitmap:{first}", "qemu:dirty-bitmap:before-upgrade"]
    assert dirty_by_libnbd(p.uri, f"qemu:dirty-bitmap:{first}") == [], "nothing written since the barrier"

    # Writes of every kind, aligned and not, through NBD.
    writes = [(5 * MiB, MiB), (20 * MiB + 4 * KiB, 4 * KiB), (30 * MiB, 128 * KiB), (40 * MiB, 64 * KiB), (63 * MiB + 60 * KiB, 8 * KiB)]
    qemu_io(p.uri, "write -P 0x22 5M 1M", "write -P 0x23 20484k 4k", "discard 30M 128k", "write -z 40M 64k",
            "write -P 0x24 64572k 8k", "flush")
    expected = granules(writes)
    assert dirty_by_libnbd(p.uri, f"qemu:dirty-bitmap:{first}") == expected
    assert dirty_by_nbdinfo(p.uri, f"qemu:dirty-bitmap:{first}") == expected
    assert dirty_by_libnbd(p.uri, "qemu:dirty-bitmap:before-upgrade") == expected, "the label names the barrier too"

    # qemu-img reads the bitmap through x-dirty-bitmap: dirty extents show as "data": false.
    port = p.uri.split(":")[2].split("/")[0]
    cp = run(["qemu-img", "map", "--output=json", "--image-opts",
              f"driver=nbd,export=r0,server.type=inet,server.host=127.0.0.1,server.port={port},"
              f"x-dirty-bitmap=qemu:dirty-bitmap:{first}"])
    by_qemu = merge_dirty((e["start"], e["length"], 0 if e["data"] else 1) for e in json.loads(cp.stdout_text))
    assert by_qemu == expected, cp.stdout_text

    # A second barrier: its context shows only what came after it; the first's grows.
    second = create_barrier(p, "second")
    qemu_io(p.uri, "write -P 0x31 8M 64k", "write -P 0x32 20M 4k", "flush")
    assert dirty_by_libnbd(p.uri, f"qemu:dirty-bitmap:{second}") == granules([(8 * MiB, 64 * KiB), (20 * MiB, 4 * KiB)])
    both = granules(writes + [(8 * MiB, 64 * KiB), (20 * MiB, 4 * KiB)])
    assert dirty_by_libnbd(p.uri, f"qemu:dirty-bitmap:{first}") == both
    assert contexts_listed(p.uri, "qemu:dirty-bitmap:") == [
        f"qemu:dirty-bitmap:{first}", f"qemu:dirty-bitmap:{second}", "qemu:dirty-bitmap:before-upgrade", "qemu:dirty-bitmap:second"]
    listing = json.loads(tandem(p, "barrier", "list", "--node", "alpha", "--json").stdout_text)
    assert [b["dirty_bitmap"] for b in listing["barriers"]] == [f"qemu:dirty-bitmap:{first}", f"qemu:dirty-bitmap:{second}"]

    # Writes while the secondary is gone count as well.
    p.stop("beta", signal.SIGKILL)
    p.wait_for("alpha", "link to beta down")
    qemu_io(p.uri, "write -P 0x41 50M 192k", "flush")
    both = granules(writes + [(8 * MiB, 64 * KiB), (20 * MiB, 4 * KiB), (50 * MiB, 192 * KiB)])
    assert dirty_by_libnbd(p.uri, f"qemu:dirty-bitmap:{first}") == both
    assert dirty_by_nbdinfo(p.uri, f"qemu:dirty-bitmap:{second}") == granules([(8 * MiB, 64 * KiB), (20 * MiB, 4 * KiB), (50 * MiB, 192 * KiB)])

    # Every chunk whose bytes differ from the barrier's image (beta keeps it) is reported.
    since = p.mark("alpha")
    p.up("beta")
    p.wait_in_sync(since=since)
    image_port = free_port()
    tandem(p, "barrier", "export", "--node", "beta", str(first), "--listen", f"127.0.0.1:{image_port}")
    export = tmp_path / "at-first.img"
    run(["nbdcopy", f"nbd://127.0.0.1:{image_port}/r0@{first}", str(export)], timeout=120)
    old, now = export.read_bytes(), (tmp_path / "alpha.img").read_bytes()
    differing = {g for g in range(SIZE // CHUNK) if old[g * CHUNK:(g + 1) * CHUNK] != now[g * CHUNK:(g + 1) * CHUNK]}
    reported = {o // CHUNK for off, length in dirty_by_libnbd(p.uri, f"qemu:dirty-bitmap:{first}") for o in range(off, off + length, CHUNK)}
    assert differing and differing <= reported, f"unreported changes: {sorted(differing - reported)}"

    # A restarted primary remembers no barrier: it offers no context rather than a wrong one.
    assert p.stop("alpha") == 0
    p.up("alpha", "--primary")
    p.wait_in_sync()
    assert contexts_listed(p.uri) == ["base:allocation"]
    h = nbd.NBD()
    h.add_meta_context(f"qemu:dirty-bitmap:{first}")
    h.connect_uri(p.uri)
    assert not h.can_meta_context(f"qemu:dirty-bitmap:{first}")
    h.shutdown()
    cp = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{first}", p.uri], check=False)
    assert cp.returncode != 0


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_tracking_a_1_tib_device_takes_at_most_16_mib(make_pair, tmp_path):
    """On a sparse 1 TiB device the tracker takes 128 KiB granules and 16 MiB, once the first
    barrier exists; the node stays far below the 128 MiB target."""
    p = make_pair()
    text = p.resource.read_text()
    for name in ("alpha", "beta"):
        meta = f'metadata = "{tmp_path}/{name}.meta"\n'
        text = text.replace(meta, meta + f'undo = "{tmp_path}/{name}.undo"\n')
        with open(tmp_path / f"{name}.img", "r+b") as f:
            f.truncate(1 << 40)
    p.resource.write_text(text)
    for name in ("alpha", "beta"):
        run([TANDEM_BIN, "init", p.resource, "--node", name, "--zeroed", "--force"])
    p.up("beta")
    p.up("alpha", "--primary")
    p.wait_in_sync()
    before = rss_bytes(p.procs["alpha"].pid)
    first = create_barrier(p, "big")
    p.wait_for("alpha", r"changed-block tracking: 8388608 granules of 131072 bytes, 16777216 bytes of memory")
    qemu_io(p.uri, "write -P 0x61 512G 4k", "write -P 0x62 1023G 256k", "flush")
    grown = rss_bytes(p.procs["alpha"].pid) - before
    assert grown <= 20 * MiB, f"alpha grew by {grown} bytes"
    assert rss_bytes(p.procs["alpha"].pid) < 128 * MiB
    h = nbd.NBD()
    h.add_meta_context(f"qemu:dirty-bitmap:{first}")
    h.connect_uri(p.uri)
    got = []
    h.block_status(1 << 30, 512 << 30, lambda name, off, entries, err: got.extend(zip(entries[0::2], entries[1::2])) or 0)
    h.shutdown()
    assert got[0] == (128 * KiB, 1) and got[1][1] == 0, got[:4]
