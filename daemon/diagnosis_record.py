"""Writing down a diagnosed hang -- its row, its event, its evidence -- without ever holding up the action.

The supervisor decides on a hang first; ``record`` then writes, each part on its own. A write
that fails (a full disk, an unwritable diagnostics folder, a store that cannot grow) becomes an
``evidence_write_failed`` event and a metric, never an exception: before, a failed evidence
write left the hang marked reported but not acted on, and a full disk blinded detection.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from milepost.engine.contract.enums import Severity
from milepost.engine.contract.events import EventKind

from . import evidence
from .detect import Diagnosis
from .store import Store

log = logging.getLogger(__name__)

WRITE_ERRORS = (OSError, sqlite3.Error)


def record(
    diag: Diagnosis,
    *,
    store: Store,
    run_dir: Path,
    attempt: int,
    action: str,
    stacks: bool,
    emit: Callable[..., None],
) -> int | None:
    """Stores ``diag``, announces it and collects its evidence; returns its id (None: not stored)."""
    culprits = [list(k) for k in diag.culprits]
    failed: list[tuple[str, BaseException]] = []
    diag_id: int | None = None
    try:
        diag_id = store.add_diagnosis(
            {
                "attempt": attempt,
                "kind": diag.kind,
                "culprit_ranks": culprits,
                "group": diag.group,
                "seq": diag.seq,
                "op": diag.op,
                "onset_at": diag.onset_at,
                "detected_at": diag.detected_at,
                "action": action,
                "message": diag.message,
                "phases": diag.phases,
            }
        )
    except WRITE_ERRORS as e:
        failed.append(("diagnosis row", e))
    emit(
        EventKind.COLLECTIVE_HANG,
        diag.message,
        Severity.CRITICAL,
        diagnosis_id=diag_id,
        diagnosis=diag.kind,
        culprit_ranks=culprits,
        group=diag.group,
        seq=diag.seq,
        op=diag.op,
        onset_at=diag.onset_at,
        detection_s=round(diag.detected_at - diag.onset_at, 3),
    )
    if diag_id is not None:  # the evidence folder is named by the row's id
        try:
            found = evidence.collect(run_dir, diag_id, attempt, store.ranks(), stacks=stacks)
            store.update_diagnosis(diag_id, evidence=found)
        except WRITE_ERRORS as e:
            failed.append(("evidence", e))
    for what, err in failed:
        log.error("diagnosis of %s: could not write its %s: %s", diag.kind, what, err)
        emit(
            EventKind.EVIDENCE_WRITE_FAILED,
            f"could not write the {what} of the {diag.kind} diagnosis ({err}); it is acted on all the same",
            Severity.ERROR,
            diagnosis_id=diag_id,
            what=what,
            error=str(err),
            errno=getattr(err, "errno", None),
        )
    return diag_id
