"""Hostile NBD client for nbd's tests: libnbd with strict mode off sends
requests a well-behaved client never would and checks each gets the
protocol's error, after which the connection still works.

usage: /usr/bin/python3 hostile_libnbd.py RW_URI RO_URI
"""
import errno
import sys

import nbd

rw_uri, ro_uri = sys.argv[1], sys.argv[2]
MAX = 32 << 20


def expect(code, fn, what):
    try:
        fn()
    except nbd.Error as e:
        if e.errno not in (code, errno.errorcode.get(code)):
            sys.exit(f"{what}: expected errno {code}, got {e.errno} ({e.string})")
        return
    sys.exit(f"{what}: no error")


def open_handle(uri):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


h = open_handle(rw_uri)
size = h.get_size()
h.pwrite(b"\x5a" * 4096, 0)

expect(errno.EINVAL, lambda: h.pread(512, size), "read past end")
expect(errno.EINVAL, lambda: h.pread(512, size - 256), "read across end")
expect(errno.EINVAL, lambda: h.pread(512, (1 << 64) - 256), "read with offset overflow")
expect(errno.ENOSPC, lambda: h.pwrite(b"x" * 512, size - 100), "write across end")
expect(errno.EINVAL, lambda: h.pread(MAX + 1, 0), "read above max block size")
expect(errno.EINVAL, lambda: h.pwrite(bytes(MAX + 4096), 0), "write above max block size")
expect(errno.EINVAL, lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), "read with block-status flag")
expect(errno.EINVAL, lambda: h.trim(512, size), "trim past end")
expect(errno.EINVAL, lambda: h.zero(4096, size - 1), "zero across end")
expect(errno.EINVAL, lambda: h.cache(4096, size), "cache past end")
expect(errno.EINVAL, lambda: h.block_status(0, 0, lambda *a: 0), "zero-length block status")
expect(errno.EINVAL, lambda: h.block_status(512, size, lambda *a: 0), "block status past end")

# After all that the same connection still answers correctly.
assert h.pread(4096, 0) == b"\x5a" * 4096, "data changed by refused requests"
h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 0) == bytes(4096)
h.flush()
seen = []
h.block_status(size, 0, lambda ctx, off, ents, err: seen.append((ctx, ents)) or 0)
assert seen and seen[0][0] == "base:allocation", seen

ro = open_handle(ro_uri)
assert ro.is_read_only()
before = ro.pread(4096, 0)
expect(errno.EPERM, lambda: ro.pwrite(b"y" * 4096, 0), "write to read-only export")
expect(errno.EPERM, lambda: ro.trim(4096, 0), "trim on read-only export")
expect(errno.EPERM, lambda: ro.zero(4096, 0), "zero on read-only export")
assert ro.pread(4096, 0) == before, "read-only export changed"

ro.shutdown()
h.shutdown()

# A fresh client is served normally.
h2 = open_handle(rw_uri)
h2.pwrite(b"\x77" * 8192, 8192)
assert h2.pread(8192, 8192) == b"\x77" * 8192
h2.shutdown()
print("ok")
