"""Benchmark: packaging throughput of write_tar_with_checksums against tar | tee | openssl.

Builds a package from a generated tree (default 2 GB: 400 files of about 5 MB plus a few
of 100 MB, in nested directories) and times, in the same run on the same files:

* ours:     ``write_tar_with_checksums`` to a file, verifying every file's SHA-256 against
            checksums computed beforehand (untimed), as the raw data package manager does;
* baseline: ``tar -cf - -T LIST | tee OUT.tar | openssl dgst -sha256`` (one checksum only).

The page cache cannot be dropped without root, so the source is read once untimed (warm
up), then the two are run alternately ``--runs`` times each and the best time of each is
kept.  Dirty output pages are synced between runs (untimed) so every run starts clean.
The last line printed is ``ratio <ours/baseline>``.

    python bench/packaging.py --size-gb 2 --dir /tmp/ccat-bench
"""

from __future__ import annotations

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

from ccat_data_transfer.tarutil import (
    DEFAULT_BUFSIZE,
    TarMember,
    sha256_file,
    write_tar_with_checksums,
)
from ccat_data_transfer.tarutil.writing import _DEFAULT_LAYOUT, _LAYOUTS

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


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_ours(src: Path, files: list[dict], out: Path, bufsize: int, layout: str) -> float:
    members = [TarMember(e["arcname"], src / e["arcname"], e["size"], e["sha256"]) for e in files]
    c0 = _cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        result = write_tar_with_checksums(members, f, bufsize=bufsize, _layout=layout)
    elapsed = time.perf_counter() - t0
    CPU.setdefault(layout, []).append(_cpu(resource.RUSAGE_SELF) - c0)
    if result.mismatches or len(result.member_sha256) != len(files):
        raise SystemExit(f"checksum verification failed: {result.mismatches[:3]}")
    if result.size != out.stat().st_size:
        raise SystemExit("tar size reported differs from file size")
    return elapsed


def run_baseline(src: Path, listfile: Path, out: Path) -> float:
    cmd = f"tar -cf - -C {src} -T {listfile} | tee {out} | openssl dgst -sha256 > /dev/null"
    c0 = _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)
    elapsed = time.perf_counter() - t0
    CPU.setdefault("baseline", []).append(_cpu(resource.RUSAGE_CHILDREN) - c0)
    return elapsed


def settle(out: Path) -> None:
    out.unlink(missing_ok=True)
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="total source size (GB)")
    ap.add_argument("--dir", type=Path, default=None, help="work dir (kept for reuse)")
    ap.add_argument("--runs", type=int, default=2, help="runs of each, best is kept")
    ap.add_argument("--bufsize-mb", type=int, default=DEFAULT_BUFSIZE // MB)
    ap.add_argument(
        "--layouts",
        default="",
        help="also time these thread layouts once each (comma list or 'all'); informative",
    )
    args = ap.parse_args()

    work = args.dir or Path(tempfile.gettempdir()) / "ccat-bench-packaging"
    src, outdir = work / "src", work / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    files = generate(src, args.size_gb)
    total = sum(e["size"] for e in files)
    listfile = work / "files.txt"
    listfile.write_text("".join(e["arcname"] + "\n" for e in files))
    out = outdir / "package.tar"
    bufsize = args.bufsize_mb * MB

    warm_up(src, files)
    settle(out)
    ours, base = [], []
    for _ in range(args.runs):
        ours.append(run_ours(src, files, out, bufsize, _DEFAULT_LAYOUT))
        settle(out)
        base.append(run_baseline(src, listfile, out))
        settle(out)

    extra: dict[str, float] = {}
    layouts = _LAYOUTS if args.layouts == "all" else [x for x in args.layouts.split(",") if x]
    for layout in layouts:
        extra[layout] = run_ours(src, files, out, bufsize, layout)
        settle(out)

    gb = total / 1e9
    load = open("/proc/loadavg").read().split()[:3]
    print(
        f"{len(files)} files, {gb:.2f} GB, bufsize {args.bufsize_mb} MiB, "
        f"{os.cpu_count()} cpus, load {' '.join(load)}"
    )
    print(f"{'run':<40}{'best s':>8}{'GB/s':>7}{'cpu s':>7}   all runs (s)")
    rows = [
        (f"ours ({_DEFAULT_LAYOUT}, verify every file)", ours, _DEFAULT_LAYOUT),
        ("baseline tar|tee|openssl dgst -sha256", base, "baseline"),
    ]
    for name, times, key in rows:
        best = min(times)
        runs = " ".join(f"{t:.2f}" for t in times)
        cpu = min(CPU[key])
        print(f"{name:<40}{best:>8.2f}{gb / best:>7.2f}{cpu:>7.2f}   {runs}")
    for layout, t in extra.items():
        cpu = CPU[layout][-1]
        print(f"{'  layout ' + layout + ' (1 run)':<40}{t:>8.2f}{gb / t:>7.2f}{cpu:>7.2f}")
    print(f"ratio {min(ours) / min(base):.2f}")


if __name__ == "__main__":
    main()
