"""Benchmark: the read-buffer size curve (64 KiB .. 8 MiB) of the loops that move bytes.

On one page-cached file (default 1 GiB, read once untimed, then checked resident with
``mincore``-free means: a second untimed read must run at memory speed) it times, for each
buffer size, alternating the sizes run by run so load drifts hit every size alike:

* ``hash``:  ``readinto`` one reused buffer + ``hashlib.sha256`` (``Storage.sha256``,
  ``sha256_file``, the checksum read back after every copy);
* ``copy``:  ``readinto`` one reused buffer + ``os.write`` to a fresh file, no fsync (the
  last fallback of the local copy, and the S3 / paced stream loops);
* ``tar``:   ``write_tar_with_checksums`` of the file to ``/dev/null`` (the packaging
  loop: one read, two hashes in two threads, one write).

It prints, per size, the best wall time of ``--runs`` as MB/s and the CPU seconds (user +
system) of that run, and the load average at the start and the end.

    python bench/buffer_curve.py --size-mb 1024 --runs 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from ccat_data_transfer.core.tarutil import TarMember, write_tar_with_checksums

KIB = 1024
SIZES = [64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1024 * KIB, 2048 * KIB, 4096 * KIB, 8192 * KIB]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    block = bytearray(os.urandom(1 << 20))
    with open(path, "wb") as f:
        for i in range(size >> 20):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
    os.sync()


def read_all(path: Path) -> float:
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def run_hash(path: Path, size: int, out: Path) -> None:
    h = hashlib.sha256()
    mv = memoryview(bytearray(size))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])


def run_copy(path: Path, size: int, out: Path) -> None:
    mv = memoryview(bytearray(size))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(mv):
                view = mv[:n]
                while view:
                    view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    out.unlink()


def run_tar(path: Path, size: int, out: Path) -> None:
    member = TarMember("data.bin", path, path.stat().st_size)
    with open(os.devnull, "wb") as sink:
        write_tar_with_checksums([member], sink, bufsize=size)


LOOPS = {"hash": run_hash, "copy": run_copy, "tar": run_tar}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--loops", default="hash,copy,tar")
    args = ap.parse_args()
    work = args.dir / "ccat-bench-buffers"
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "source.bin", work / "copy.bin"
    total = args.size_mb << 20
    make_file(src, total)
    read_all(src)
    cached = read_all(src)
    load0 = open("/proc/loadavg").read().split()[:3]
    print(
        f"file {total / 1e9:.2f} GB, second read {total / 1e6 / cached:.0f} MB/s "
        f"(page-cached if several GB/s), {os.cpu_count()} cpus, load {' '.join(load0)}"
    )
    loops = [x for x in args.loops.split(",") if x]
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for run in range(args.runs):
        order = SIZES if run % 2 == 0 else SIZES[::-1]
        for size in order:
            for name in loops:
                c0, t0 = _cpu(), time.perf_counter()
                LOOPS[name](src, size, out)
                wall, cpu = time.perf_counter() - t0, _cpu() - c0
                if (name, size) not in best or wall < best[name, size][0]:
                    best[name, size] = (wall, cpu)
    head = "".join(f"{name + ' MB/s':>12}{'cpu s':>7}" for name in loops)
    print(f"{'buffer':>9}{head}")
    for size in SIZES:
        row = "".join(
            f"{total / 1e6 / best[n, size][0]:>12.0f}{best[n, size][1]:>7.2f}" for n in loops
        )
        print(f"{size // KIB:>6} KiB{row}")
    print(f"load at end {' '.join(open('/proc/loadavg').read().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
