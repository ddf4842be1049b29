#!/usr/bin/env python3
# Page-cache history A/B, no VHDX code: two raw files, 1 MiB preads on A then B at the
# same offset, fresh, then after only B was used for a while (A idle), then again.
# Usage: cachestate.py DIR SIZE_MIB IDLE_SECONDS   (e.g. /var/tmp/cs 512 60)
import os, time, sys, random
d = sys.argv[1]; size = int(sys.argv[2]) << 20
A, B = f"{d}/a.img", f"{d}/b.img"
buf = bytearray(1 << 20); mv = memoryview(buf)
def fill(p):
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    for i in range(size >> 20): os.pwrite(fd, b"\x5a" * (1 << 20), i << 20)
    os.fsync(fd); return fd
def ab(fa, fb, write=False, passes=3):
    ta = tb = 0
    for _ in range(passes):
        for i in range(size >> 20):
            t = time.perf_counter_ns()
            if write: os.pwrite(fa, mv, i << 20)
            else: os.preadv(fa, [mv], i << 20)
            t2 = time.perf_counter_ns()
            if write: os.pwrite(fb, mv, i << 20)
            else: os.preadv(fb, [mv], i << 20)
            tb += time.perf_counter_ns() - t2; ta += t2 - t
    return tb / ta  # A speed relative to B (B time / A time)
fa, fb = fill(A), fill(B)
print("fresh: read A/B %.3f write A/B %.3f" % (ab(fa, fb), ab(fa, fb, True)))
os.fsync(fa); os.fsync(fb)
# hammer B only (random 4K writes and reads), leave A cold
t0 = time.time(); pages = size // 4096; small = b"\xa5" * 4096
while time.time() - t0 < float(sys.argv[3]):
    off = random.randrange(pages) * 4096
    os.pwrite(fb, small, off); os.pread(fb, 4096, random.randrange(pages) * 4096)
os.fsync(fb)
print("after B hammered, A idle: read A/B %.3f" % ab(fa, fb))
print("again: read A/B %.3f write A/B %.3f" % (ab(fa, fb), ab(fa, fb, True)))
