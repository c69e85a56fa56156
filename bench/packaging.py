"""Benchmark: the whole packaging task's byte path against tar | tee | openssl dgst.

Builds a package from a generated tree (default 2 GB: 400 files of about 5 MB plus a few
of 100 MB, in nested directories) and times, in the same run on the same files,
alternating which goes first:

* ours:     what ``create_raw_data_package`` does with the bytes once it has its rows
            (``raw_data_package_manager._build_into_buffer``): ``write_tar_with_checksums``
            straight into the buffer location through ``open_write`` (temporary name,
            fsync, rename, fsync of the directory), every file's SHA-256 verified against
            its filed checksum (computed beforehand, untimed) and the tar's computed;
* baseline: ``tar -cf - -T LIST | tee BUF/TMP | openssl dgst -sha256``, then ``sync TMP``,
            ``mv TMP BUF/NAME``, ``sync BUF`` (one checksum only; the same fsyncs and the
            same final placement);
* before:   informative, the task as it was: the tar written at SOURCE (temporary name,
            fsync, rename), then copied into the buffer with 8 MiB reads, then removed.

The page cache cannot be dropped without root, so the source is read once untimed (warm
up; the rate of a second read is printed), then the runs alternate ``--runs`` times and
the best time of each is kept.  Outputs are removed and synced between runs (untimed).
Prints the targets (ours >= 0.9 x the baseline's throughput, and >= 465 MB/s), met or
missed, and the load average.

    python bench/packaging.py --size-gb 2 --dir /tmp/ccat-bench
"""

from __future__ import annotations

# `python bench/packaging.py` puts bench/ first on sys.path, where this file would shadow
# the `packaging` distribution that kombu imports.  Drop it before importing anything.
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_HERE = _Path(__file__).resolve().parent
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from ccat_data_transfer.core.storage import DiskStorage
from ccat_data_transfer.core.tarutil import (
    DEFAULT_BUFSIZE,
    TarMember,
    sha256_file,
    write_tar_with_checksums,
)
from ccat_data_transfer.core.tarutil.writing import _DEFAULT_LAYOUT, _LAYOUTS
from ccat_data_transfer.packaging import raw_packages as rdpm
from ccat_data_transfer.packaging import skeleton

MB = 1024 * 1024
MANIFEST = "manifest.json"


def generate(src: Path, size_gb: float) -> list[dict]:
    """Create the source tree once (reused when the manifest matches)."""
    manifest_path = src / MANIFEST
    target = int(size_gb * 1024**3)
    if manifest_path.exists():
        data = json.loads(manifest_path.read_text())
        if data.get("target") == target:
            return data["files"]
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    block = bytearray(os.urandom(MB))
    plan: list[int] = [100 * MB] * 4  # a few large files
    i = 0
    while sum(plan) < target:
        plan.append(4 * MB + (i * 7919 % 2048) * 1024)  # 4-6 MB, deterministic spread
        i += 1
    files = []
    counter = 0
    for n, size in enumerate(plan):
        rel = f"obs{n % 20:03d}/module{n % 3}/scan_{n:05d}.dat"
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left:
                counter += 1
                block[:8] = counter.to_bytes(8, "little")  # every MB differs
                k = min(left, MB)
                f.write(block[:k])
                left -= k
        files.append({"arcname": rel, "size": size})
    print(f"generated {len(files)} files, {sum(plan) / 1e9:.2f} GB in {src}", file=sys.stderr)
    for entry in files:  # expected checksums: precomputed, not timed
        entry["sha256"] = sha256_file(src / entry["arcname"])
    manifest_path.write_text(json.dumps({"target": target, "files": files}))
    return files


def warm_up(src: Path, files: list[dict]) -> None:
    buf = bytearray(8 * MB)
    for entry in files:
        with open(src / entry["arcname"], "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


CPU: dict[str, list[float]] = {}
RATIO_TARGET = 0.9
RATE_TARGET = 465.0  # MB/s
NAME = "raw_data_packages/bench/package.tar"


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _location(name: str, root: Path) -> SimpleNamespace:
    return SimpleNamespace(name=name, storage_type="DISK", path=str(root))


def _work(src: Path, buf: Path, files: list[dict]) -> skeleton.Work:
    members = [TarMember(e["arcname"], src / e["arcname"], e["size"], e["sha256"]) for e in files]
    return skeleton.Work(
        "package.tar",
        NAME,
        _location("bench_source", src),
        members,
        [_location("bench_buffer", buf)],
    )


def _tar_writer(bufsize: int, layout: str):
    def write(members, out):
        return write_tar_with_checksums(members, out, bufsize=bufsize, _layout=layout)

    return write


def run_ours(src: Path, buf: Path, files: list[dict], bufsize: int, layout: str, key: str) -> float:
    work = _work(src, buf, files)
    skeleton.write_tar_with_checksums = _tar_writer(bufsize, layout)
    c0 = _cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    _, result = rdpm._build_into_buffer(DiskStorage(src), work, 0)
    elapsed = time.perf_counter() - t0
    CPU.setdefault(key, []).append(_cpu(resource.RUSAGE_SELF) - c0)
    if result.mismatches or len(result.member_sha256) != len(files):
        raise SystemExit(f"checksum verification failed: {result.mismatches[:3]}")
    if result.size != (buf / NAME).stat().st_size or (src / NAME).exists():
        raise SystemExit("the tar is not where the task puts it")
    return elapsed


def run_before(src: Path, buf: Path, files: list[dict]) -> float:
    """The task before the tar was written once: at SOURCE, copied in 8 MiB reads."""
    work = _work(src, buf, files)
    skeleton.write_tar_with_checksums = write_tar_with_checksums
    source, buffer = DiskStorage(src), DiskStorage(buf)
    c0 = _cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    skeleton.write_tar(rdpm.RAW_DATA_PACKAGE, source, work)
    with source.open_read(NAME) as r, buffer.open_write(NAME) as w:
        while chunk := r.read(8 * MB):
            w.write(chunk)
    source.delete(NAME)
    elapsed = time.perf_counter() - t0
    CPU.setdefault("before", []).append(_cpu(resource.RUSAGE_SELF) - c0)
    return elapsed


def run_baseline(src: Path, listfile: Path, buf: Path) -> float:
    final = buf / NAME
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / ".package.tar.baseline-tmp"
    cmd = (
        f"tar -cf - -C {src} -T {listfile} | tee {tmp} | openssl dgst -sha256 > /dev/null"
        f" && sync {tmp} && mv {tmp} {final} && sync {final.parent}"
    )
    c0 = _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)
    elapsed = time.perf_counter() - t0
    CPU.setdefault("baseline", []).append(_cpu(resource.RUSAGE_CHILDREN) - c0)
    return elapsed


def settle(src: Path, buf: Path) -> None:
    for root in (src, buf):
        shutil.rmtree(root / "raw_data_packages", ignore_errors=True)
    os.sync()


def cached_rate(src: Path, files: list[dict]) -> float:
    t0 = time.perf_counter()
    warm_up(src, files)
    return sum(e["size"] for e in files) / 1e6 / (time.perf_counter() - t0)


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="total source size (GB)")
    ap.add_argument("--dir", type=Path, default=None, help="work dir (kept for reuse)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each, best is kept")
    ap.add_argument("--bufsize-mb", type=float, default=DEFAULT_BUFSIZE / MB)
    ap.add_argument(
        "--bufsizes",
        default="",
        help="also time ours with these read sizes in MiB once per run (comma list)",
    )
    ap.add_argument(
        "--layouts",
        default="",
        help="also time these thread layouts once each (comma list or 'all'); informative",
    )
    args = ap.parse_args()

    work = args.dir or Path(tempfile.gettempdir()) / "ccat-bench-packaging"
    src, buf = work / "src", work / "buffer"
    buf.mkdir(parents=True, exist_ok=True)
    files = generate(src, args.size_gb)
    total = sum(e["size"] for e in files)
    listfile = work / "files.txt"
    listfile.write_text("".join(e["arcname"] + "\n" for e in files))
    bufsize = int(args.bufsize_mb * MB)
    sizes = [float(x) for x in args.bufsizes.split(",") if x]

    warm_up(src, files)
    rate = cached_rate(src, files)
    settle(src, buf)
    load0 = load()
    ours, base, before = [], [], []
    extra: dict[str, list[float]] = {}
    for run in range(args.runs):
        order = ("ours", "baseline") if run % 2 == 0 else ("baseline", "ours")
        for name in order:
            if name == "ours":
                ours.append(run_ours(src, buf, files, bufsize, _DEFAULT_LAYOUT, "ours"))
            else:
                base.append(run_baseline(src, listfile, buf))
            settle(src, buf)
        before.append(run_before(src, buf, files))
        settle(src, buf)
        for mib in sizes:
            key = f"read size {mib:g} MiB"
            extra.setdefault(key, []).append(
                run_ours(src, buf, files, int(mib * MB), _DEFAULT_LAYOUT, key)
            )
            settle(src, buf)

    layouts = _LAYOUTS if args.layouts == "all" else [x for x in args.layouts.split(",") if x]
    for layout in layouts:
        key = f"layout {layout}"
        extra[key] = [run_ours(src, buf, files, bufsize, layout, key)]
        settle(src, buf)

    gb = total / 1e9
    print(
        f"{len(files)} files, {gb:.2f} GB, read size {args.bufsize_mb:g} MiB, "
        f"{os.cpu_count()} cpus, source page-cached (re-read {rate:.0f} MB/s), "
        f"load {load0} at start, {load()} at end"
    )
    print(f"{'run':<52}{'best s':>8}{'MB/s':>7}{'cpu s':>7}   all runs (s)")
    rows = [
        (f"ours: task into the buffer ({_DEFAULT_LAYOUT}, verify)", ours, "ours"),
        ("baseline: tar|tee|openssl dgst + sync + mv + sync", base, "baseline"),
        ("before: tar at SOURCE, 8 MiB-read copy (informative)", before, "before"),
    ]
    rows += [(f"  ours, {k} (informative)", v, k) for k, v in extra.items()]
    for name, times, key in rows:
        best = min(times)
        runs = " ".join(f"{t:.2f}" for t in times)
        cpu = min(CPU[key])
        print(f"{name:<52}{best:>8.2f}{total / 1e6 / best:>7.0f}{cpu:>7.2f}   {runs}")
    ours_rate, base_rate = total / 1e6 / min(ours), total / 1e6 / min(base)
    ratio = ours_rate / base_rate
    print(
        f"target throughput >= {RATIO_TARGET}x baseline: ratio {ratio:.2f} -> "
        f"{'met' if ratio >= RATIO_TARGET else 'missed'}"
    )
    print(
        f"target >= {RATE_TARGET:.0f} MB/s: {ours_rate:.0f} MB/s -> "
        f"{'met' if ours_rate >= RATE_TARGET else 'missed'} (baseline {base_rate:.0f} MB/s)"
    )


if __name__ == "__main__":
    main()
