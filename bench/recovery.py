"""Benchmark: how long a ``kill -9`` of a worker delays its work, at the DEFAULT liveness
settings (HEARTBEAT_SECONDS 30 x HEARTBEAT_MISSED_BEATS 4, RECOVERY_SERVICE_SLEEP_TIME
30, TRANSFER_RETRY_BASE_SECONDS 30, QUEUED_RESEND_SECONDS and
BROKER_VISIBILITY_TIMEOUT_SECONDS 300).

A real cluster as in tests/operations/test_distributed_faults.py (PostgreSQL, Redis, one worker per
site at its default concurrency, ``run --no-init``, ``recovery``): one observation is
filed, the telescope site's worker is killed (SIGKILL, its whole process group) while the
package's primary transfer runs on a slow link, and started again at once.  Printed: the
seconds from the kill to the transfer being reset (a new attempt counted) and to its
completion, against the bound the settings give:

    last beat <= HEARTBEAT_SECONDS before the kill; reset once the beat is older than
    HEARTBEAT_SECONDS x HEARTBEAT_MISSED_BEATS, seen at the next recovery pass (every
    RECOVERY_SERVICE_SLEEP_TIME); the new attempt is due TRANSFER_RETRY_BASE_SECONDS
    later and dispatched at the next transfer cycle (TRANSFER_MANAGER_SLEEP_TIME).

Run: ``.venv/bin/python bench/recovery.py`` (about 4 minutes; PostgreSQL at
127.0.0.1:5432 and Redis at 127.0.0.1:6379 as for the tests).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/packaging.py would shadow
# the `packaging` distribution kombu imports; the tests folder gives the cluster helpers.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "tests"))

from sqlalchemy import select  # noqa: E402

from ccat_data_transfer.operations.simulator import InstrumentSimulator  # noqa: E402
from ccat_ops_db import models as m  # noqa: E402
from helpers_cluster import open_cluster, wait  # noqa: E402

DEFAULTS = {
    "HEARTBEAT_SECONDS": 30,
    "HEARTBEAT_MISSED_BEATS": 4,
    "RECOVERY_SERVICE_SLEEP_TIME": 30,
    "TRANSFER_RETRY_BASE_SECONDS": 30,
    "TRANSFER_MANAGER_SLEEP_TIME": 5,
    "QUEUED_RESEND_SECONDS": 300,
    "BROKER_VISIBILITY_TIMEOUT_SECONDS": 300,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link-mb-per-s", type=float, default=2.0)
    parser.add_argument("--file-mb", type=int, default=8)
    args = parser.parse_args()
    d = DEFAULTS
    window = d["HEARTBEAT_SECONDS"] * d["HEARTBEAT_MISSED_BEATS"]
    low = window - d["HEARTBEAT_SECONDS"]
    high = window + d["RECOVERY_SERVICE_SLEEP_TIME"]
    with tempfile.TemporaryDirectory(prefix="ccat-bench-recovery-") as tmp:
        with open_cluster(Path(tmp), **{k: str(v) for k, v in d.items()}) as cluster:
            db = cluster.db
            cluster.start_worker(
                "ccat", CCAT_DATA_TRANSFER_TRANSFER_BANDWIDTH_LIMIT_MB_PER_S=str(args.link_mb_per_s)
            )
            for site in ("cologne", "us"):
                cluster.start_worker(site)
            cluster.start_managers()
            cluster.start("recovery", ["recovery"])
            sim = InstrumentSimulator(
                db=db, observations=1, files_per_module=2, modules_per_instrument=1,
                file_size=args.file_mb << 20, run_id="bench",
            )  # fmt: skip
            sim.step()

            def running() -> int | None:
                with db.session_scope() as s:
                    return s.scalar(
                        select(m.DataTransfer.id).where(
                            m.DataTransfer.status == m.Status.IN_PROGRESS
                        )
                    )

            wait(cluster, "the transfer running", running, 180, every=0.1)
            time.sleep(1.0)
            transfer_id = running()
            killed = time.monotonic()
            cluster.kill("worker-ccat", signal.SIGKILL)
            cluster.start_worker(
                "ccat", CCAT_DATA_TRANSFER_TRANSFER_BANDWIDTH_LIMIT_MB_PER_S=str(args.link_mb_per_s)
            )

            def row() -> m.DataTransfer:
                with db.session_scope() as s:
                    t = s.get(m.DataTransfer, transfer_id)
                    s.expunge(t)
                    return t

            reset = wait(cluster, "the reset", lambda: row().retry_count >= 1, 600, every=0.5)
            done = wait(
                cluster, "the transfer done", lambda: row().status == m.Status.COMPLETED, 600
            )
            print(f"stall window {window} s; reset expected {low}-{high} s after the kill")
            print(f"reset {reset:.1f} s after the kill (retry counted: {row().retry_count})")
            print(f"transfer completed {time.monotonic() - killed:.1f} s after the kill")
            print(f"(the new attempt itself took about {done:.1f} s after the reset)")


if __name__ == "__main__":
    main()
