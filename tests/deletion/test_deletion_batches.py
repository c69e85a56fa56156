"""Deletion at scale, by its rules: an EMERGENCY cycle works one batch per pass (never one
list of every expired id) and still deletes exactly what may go, and a copy's history is
found through the batch-membership table, not by searching the batches' id lists."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import func, select, update

from ccat_data_transfer import deletion_manager as dm
from ccat_data_transfer.deletion import steps
from ccat_ops_db import models as m
from helpers_lifecycle import (
    copy_row,
    make_package_at,
    object_exists,
    run_deletion_cycle,
    scheduled_batch_rows,
    set_buffer_status,
)

S = m.PhysicalCopyStatus
LEFT = {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT}


def _batch_rows(session) -> list[list[int]]:
    return [json.loads(r.copy_ids) for r in scheduled_batch_rows(session)]


def _expired_package(system, session, files: int, **kw):
    return make_package_at(
        system,
        session,
        LEFT,
        files=files,
        file_status=S.DELETION_POSSIBLE,
        deletion_possible_at=m.utcnow() - timedelta(minutes=61),
        **kw,
    )


def _emergency(system, override_settings, **settings) -> None:
    override_settings(
        RETENTION_PERIOD_MINUTES=60,
        DELETION_BATCH_SIZE=2,
        DELETION_CRITICAL_BATCH_MULTIPLIER=1,
        **settings,
    )
    with system.session() as s:
        set_buffer_status(s, "primecam_raw_data", used_bytes=99, total_bytes=100)


def test_emergency_deletes_in_batches_what_may_go_and_keeps_the_rest(
    system, override_settings, monkeypatch
):
    """In EMERGENCY every expired copy that may go is deleted in one cycle, one batch (of
    DELETION_BATCH_SIZE) per pass - no selection or claim asks for more; files of a package
    that is not ARCHIVED, or frozen, stay whatever the pressure."""
    _emergency(system, override_settings)
    asked: list[int | None] = []
    for name in ("claim_expired", "deletion_possible_selection"):
        real = getattr(steps, name)

        def spy(*args, _real=real):
            asked.append(args[-1])  # the limit of the pass
            return _real(*args)

        monkeypatch.setattr(steps, name, spy)
    with system.session() as s:
        ok = _expired_package(system, s, files=5)
        unarchived = _expired_package(system, s, files=2, state=m.PackageState.TRANSFERRING)
        frozen = _expired_package(system, s, files=2)
        s.get(m.RawDataPackage, frozen.package_id).frozen_at = m.utcnow()
    summary = run_deletion_cycle(system)
    assert summary["buffer_states"]["primecam_raw_data"] == "emergency"
    for cid, rel in zip(ok.file_copy_ids, ok.file_paths, strict=True):
        assert copy_row(system, cid).status == S.DELETED
        assert not object_exists(system, "primecam_raw_data", rel)
    for kept in (unarchived, frozen):
        for cid, rel in zip(kept.file_copy_ids, kept.file_paths, strict=True):
            assert copy_row(system, cid).status == S.DELETION_POSSIBLE
            assert object_exists(system, "primecam_raw_data", rel)
    with system.session() as s:
        batches = _batch_rows(s)
    assert [len(ids) for ids in batches] == [2, 2, 1]
    assert sorted(i for ids in batches for i in ids) == sorted(ok.file_copy_ids)
    assert asked and set(asked) == {2}


def test_emergency_passes_per_cycle_are_capped(system, override_settings):
    """At most DELETION_EMERGENCY_MAX_BATCHES passes per location and step: the rest of an
    EMERGENCY backlog waits for the next cycle, which deletes it."""
    _emergency(system, override_settings, DELETION_EMERGENCY_MAX_BATCHES=2)
    with system.session() as s:
        pkg = _expired_package(system, s, files=5)
    run_deletion_cycle(system)
    statuses = [copy_row(system, cid).status for cid in pkg.file_copy_ids]
    assert statuses.count(S.DELETED) == 4
    assert statuses.count(S.DELETION_POSSIBLE) == 1
    left = pkg.file_copy_ids[statuses.index(S.DELETION_POSSIBLE)]
    run_deletion_cycle(system)
    assert copy_row(system, left).status == S.DELETED
    with system.session() as s:
        assert [len(ids) for ids in _batch_rows(s)] == [2, 2, 1]


def test_deletion_history_finds_batch_rows_by_membership(system, override_settings):
    """Each copy a batch row covers has a deletion_log_copy row; deletion_history finds the
    batch through it (the JSON list is not searched: blanking it changes nothing), and a
    copy whose id is a substring of a listed id is not taken for a member."""
    override_settings(RETENTION_PERIOD_MINUTES=60, DELETION_BATCH_SIZE=2)
    with system.session() as s:
        pkg = _expired_package(system, s, files=3)
    run_deletion_cycle(system)
    with system.session() as s:
        members = s.execute(
            select(m.DeletionLogCopy.physical_copy_id, func.count()).group_by(
                m.DeletionLogCopy.physical_copy_id
            )
        ).all()
        assert dict(members) == {cid: 1 for cid in pkg.file_copy_ids}
        s.execute(update(m.DeletionLog).values(copy_ids=None))
        s.commit()
        for cid in pkg.file_copy_ids:
            history = dm.deletion_history(s, cid)
            assert [r.outcome.name for r in history] == ["SCHEDULED", "DELETED"]
            assert history[0].physical_copy_id is None
            assert history[1].physical_copy_id == cid
        # Another package's copies, whose ids share digits with the batch's: no history.
        other = make_package_at(system, s, ["ccat_telescope_buffer"], files=12)
        s.commit()
        listed = {str(i) for i in pkg.file_copy_ids}
        lookalikes = [c for c in other.file_copy_ids if any(x in str(c) for x in listed)]
        assert lookalikes
        for cid in lookalikes:
            assert dm.deletion_history(s, cid) == []


def test_copies_found_by_id_are_loaded_in_their_order_a_chunk_at_a_time(system, monkeypatch):
    """``deletion.base.load_in_order``: the objects of the ids in the order of the ids,
    whatever the number of ids per query; an id without a row is left out."""
    from ccat_data_transfer.deletion import base

    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer"], files=5)
        s.commit()
        ids = list(reversed(pkg.file_copy_ids))
        missing = max(ids) + 10_000
        for chunk in (1, 2, 1000):
            monkeypatch.setattr(base, "_LOAD_CHUNK", chunk)
            loaded = base.load_in_order(s, m.PhysicalCopy, [*ids[:2], missing, *ids[2:]])
            assert [c.id for c in loaded] == ids
            assert all(isinstance(c, m.RawDataFilePhysicalCopy) for c in loaded)
        assert base.load_in_order(s, m.PhysicalCopy, []) == []
