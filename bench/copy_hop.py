"""Benchmark: one copy hop between two disk locations against ``cp`` + ``sync``.

On a page-cached source file (read once untimed; the second read's rate is printed so
you can see it is memory speed) it times, alternating run by run, in the same run:

* ours:      ``CopyMethod.transfer`` between two ``DiskStorage`` roots (the transfer and
             archive hops): kernel copy into a temporary name, fsync, rename, fsync of
             the directory;
* baseline:  ``cp SRC TMP && sync TMP && mv TMP DST && sync DIR`` (the same fsyncs and
             the same final placement);
* before:    the copy as it was before (a new 8 MiB ``read`` per chunk into the atomic
             write), informative, once per run;
* and, informative, ours + the hop's read-back SHA-256 against baseline + ``openssl dgst
  -sha256`` of what landed.

Every output is removed and synced between runs (untimed).  Prints each best time in
s/GB, the ratio and whether the target (ours <= 1.1 x baseline) is met, with the load
average at the start and the end.

    python bench/copy_hop.py --size-gb 2 --runs 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ccat_data_transfer.core.storage import DiskStorage
from ccat_data_transfer.core.transfer_methods import CopyMethod

TARGET = 1.1
MB = 1 << 20


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def make_source(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    block = bytearray(os.urandom(MB))
    with open(path, "wb") as f:
        for i in range(size // MB):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
    os.sync()


def cached_read_rate(path: Path) -> float:
    buf = bytearray(MB)
    for _ in range(2):
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return path.stat().st_size / 1e6 / (time.perf_counter() - t0)


def ours(src: DiskStorage, dst: DiskStorage, verify: bool) -> float:
    t0 = time.perf_counter()
    with open(os.devnull, "w") as log:
        CopyMethod().transfer(src, "pkg.tar", dst, "pkg.tar", log)
    if verify:
        dst.sha256("pkg.tar")
    return time.perf_counter() - t0


def before(src: DiskStorage, dst: DiskStorage) -> float:
    t0 = time.perf_counter()
    with src.open_read("pkg.tar") as r, dst.open_write("pkg.tar") as w:
        while chunk := r.read(8 * MB):
            w.write(chunk)
    return time.perf_counter() - t0


def baseline(src: Path, dst_dir: Path, verify: bool) -> float:
    final, tmp = dst_dir / "pkg.tar", dst_dir / ".pkg.tar.cp-tmp"
    script = f"cp {src} {tmp} && sync {tmp} && mv {tmp} {final} && sync {dst_dir}"
    if verify:
        script += f" && openssl dgst -sha256 {final} > /dev/null"
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True)
    return time.perf_counter() - t0


def settle(dst_dir: Path) -> None:
    for p in dst_dir.iterdir():
        p.unlink()
    os.sync()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    work = args.dir / "ccat-bench-copy"
    src = DiskStorage(work / "src", create=True)
    dst = DiskStorage(work / "dst", create=True)
    size = int(args.size_gb * 1e9) // MB * MB
    make_source(src.root / "pkg.tar", size)
    settle(dst.root)
    rate = cached_read_rate(src.root / "pkg.tar")
    load0 = load()
    times: dict[str, list[float]] = {}
    for run in range(args.runs):
        order = ["ours", "baseline"] if run % 2 == 0 else ["baseline", "ours"]
        for name in [*order, "before", "ours+sha256", "baseline+dgst"]:
            if name == "ours":
                t = ours(src, dst, False)
            elif name == "ours+sha256":
                t = ours(src, dst, True)
            elif name == "before":
                t = before(src, dst)
            else:
                t = baseline(src.root / "pkg.tar", dst.root, name == "baseline+dgst")
            times.setdefault(name, []).append(t)
            settle(dst.root)
    gb = size / 1e9
    print(
        f"one hop of {gb:.2f} GB between two directories of one ext4 filesystem; source "
        f"page-cached (second read {rate:.0f} MB/s); {os.cpu_count()} cpus; "
        f"load {load0} at start, {load()} at end"
    )
    print(f"{'run':<58}{'best s/GB':>10}   all runs (s)")
    rows = [
        ("ours: CopyMethod (kernel copy, fsync, rename)", "ours"),
        ("baseline: cp + sync FILE + mv + sync DIR", "baseline"),
        ("before: 8 MiB read() per chunk (informative)", "before"),
        ("ours + read-back sha256 (informative)", "ours+sha256"),
        ("baseline + openssl dgst -sha256 (informative)", "baseline+dgst"),
    ]
    for label, key in rows:
        runs = " ".join(f"{t:.2f}" for t in times[key])
        print(f"{label:<58}{min(times[key]) / gb:>10.2f}   {runs}")
    ratio = min(times["ours"]) / min(times["baseline"])
    verdict = "met" if ratio <= TARGET else "missed"
    print(f"target ours <= {TARGET}x baseline: ratio {ratio:.2f} -> {verdict}")
    vratio = min(times["ours+sha256"]) / min(times["baseline+dgst"])
    print(f"with verification: ratio {vratio:.2f} (informative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
