"""The contract between ranks and the daemon: torch-free, its names the wire's, its models what both sides send."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from milepost.engine.contract.enums import (
    RANK_ROLES,
    TERMINAL_RUN_STATES,
    AttemptState,
    ControlAction,
    FaultKind,
    RankStatus,
    Role,
    RunState,
    Severity,
)
from milepost.engine.contract.events import EventKind
from milepost.engine.contract.layout import RunDir, StandbyDir
from milepost.engine.contract.process import ENV_VARS, ExitCode
from milepost.engine.contract.routes import API, FAULTS_PATH, INGEST_PATH, OTLP_TRACES_PATH, control_path
from milepost.engine.contract.wire import FaultRequest, IngestBatch, Report, StepRecord
from milepost.engine.instrument import RankInstrument
from pydantic import ValidationError

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def test_the_contract_imports_neither_torch_nor_ray_nor_the_daemon() -> None:
    code = (
        "import sys, milepost.engine.contract.wire, milepost.engine.contract.layout, "
        "milepost.engine.contract.events, milepost.engine.contract.process, milepost.engine.contract.routes\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray') or m.startswith('milepost.daemon'))\n"
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_run_dir_layout(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    assert {
        "events": rd.events,
        "steps": rd.steps,
        "daemon": rd.daemon_file,
        "token": rd.token,
        "db": rd.db,
        "log": rd.daemon_log,
        "out": rd.daemon_out,
        "ckpt": rd.checkpoints,
    } == {
        "events": tmp_path / "events.jsonl",
        "steps": tmp_path / "steps.jsonl",
        "daemon": tmp_path / "daemon.json",
        "token": tmp_path / "token",
        "db": tmp_path / "milepost.db",
        "log": tmp_path / "daemon.log",
        "out": tmp_path / "daemon.out",
        "ckpt": tmp_path / "checkpoints",
    }
    assert rd.attempt_log(2) == tmp_path / "attempts" / "attempt_2.log"
    standby = rd.standby(3)
    assert isinstance(standby, StandbyDir) and standby.path == tmp_path / "attempts" / "standby_3"
    assert (standby.ready.name, standby.go.name) == ("ready", "go")
    assert rd.diagnosis(7) == tmp_path / "diagnostics" / "diagnosis_7"
    dump = rd.flight_recorder_dump(1, "trainer", 0, "default_pg", 12)
    assert dump == tmp_path / "diagnostics" / "fr_attempt1_trainer0_default_pg_12.json"
    dump.parent.mkdir(parents=True)
    dump.write_text("{}")
    rd.flight_recorder_dump(10, "trainer", 1, "default_pg", 3).write_text("{}")  # attempt 10 is not attempt 1
    assert rd.flight_recorder_dumps(1) == [dump]


def test_enum_values_are_todays_wire_strings() -> None:
    assert [r.value for r in RANK_ROLES] == ["driver", "trainer", "rollout"]
    assert Role.DAEMON == "daemon"
    assert [s.value for s in Severity] == ["info", "warning", "error", "critical"]
    assert {s.value for s in TERMINAL_RUN_STATES} == {"SUCCEEDED", "FAILED", "STOPPED"}
    assert {s.value for s in RunState} >= {"STARTING", "RUNNING", "RECOVERING", "PAUSED", "STOPPING"}
    assert AttemptState.LOST == "LOST" and RankStatus.EXITED == "exited"
    assert [f.value for f in FaultKind] == [
        "kill",
        "exit",
        "exception",
        "hang",
        "stall",
        "skip-collective",
        "slow",
        "nan",
        "rollout-crash",
        "corrupt-checkpoint",
    ]
    assert [a.value for a in ControlAction] == ["pause", "resume", "stop", "checkpoint"]
    assert (ExitCode.RESUME_MISMATCH, ExitCode.NO_SLOTS, ExitCode.FAULT_EXIT) == (3, 4, 17)
    assert set(ENV_VARS) == {
        "MILEPOST_TOKEN",
        "MILEPOST_RUN_ID",
        "MILEPOST_TRACING",
        "MILEPOST_RANK_GPU",
        "MILEPOST_RANK_GPU_INTERVAL_S",
        "MILEPOST_GPU_COLLECTOR",
    }
    assert (API, INGEST_PATH, FAULTS_PATH, OTLP_TRACES_PATH) == (
        "/api/v1",
        "/api/v1/ingest",
        "/api/v1/faults",
        "/v1/traces",
    )
    assert control_path("pause") == "/api/v1/control/pause"
    assert EventKind.run_ended(RunState.FAILED) == "run_failed"
    assert EventKind.control(ControlAction.CHECKPOINT) == "control_checkpoint"
    assert json.dumps({"role": Role.TRAINER, "kind": EventKind.STRAGGLER}) == (
        '{"role": "trainer", "kind": "straggler"}'
    )


def test_every_event_kind_emitted_is_an_event_kind() -> None:
    kinds = {k.value for k in EventKind}
    emitted: dict[str, str] = {}
    for folder in ("engine", "daemon"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                first = node.args[0]
                if (
                    name in ("emit", "event")
                    and isinstance(first, ast.Constant)
                    and isinstance(first.value, str)
                ):
                    emitted[first.value] = f"{path.relative_to(ROOT)}:{node.lineno}"
    unknown = {k: where for k, where in emitted.items() if k not in kinds}
    assert not unknown, f"event kinds missing from EventKind: {unknown}"


def _instrument_with_traffic() -> RankInstrument:
    inst = RankInstrument(Role.TRAINER, 1)
    with inst.step(4), inst.phase("train"):
        with inst.collective("all_reduce", group="default_pg", nbytes=4096, dtype="float32"):
            pass
        inst.begin_collective("all_gather", group="default_pg", nbytes=1024, dtype="bfloat16", world=2)
    return inst


def test_make_report_is_a_contract_report() -> None:
    from milepost.engine.wire import make_report

    inst = _instrument_with_traffic()
    report = make_report(
        inst.state,
        attempt=2,
        seq=9,
        timings={"step": 0.5},
        metrics={"loss": float("nan")},
        counters={"drops": 0},
    )
    assert set(report) <= set(Report.model_fields)  # nothing the daemon would silently drop
    parsed = Report.model_validate(report)
    assert parsed.role == Role.TRAINER and parsed.step == 4 and parsed.seq == 9
    assert [c.op for c in parsed.open_collectives] == ["all_gather"]
    assert "all_reduce|default_pg" in parsed.collectives
    assert math.isnan(parsed.metrics["loss"])  # a diverged loss reaches the daemon
    wire = json.loads(json.dumps({"reports": [report]}))
    assert IngestBatch.model_validate(wire).reports[0].state == RankStatus.RUNNING


def test_report_role_is_a_rank_role() -> None:
    from milepost.engine.wire import make_report

    report = make_report(_instrument_with_traffic().state, attempt=0, seq=1)
    with pytest.raises(ValidationError, match="role"):
        Report.model_validate({**report, "role": "daemon"})


def test_the_drivers_step_record_is_a_contract_step_record() -> None:
    from milepost.engine.step_result import StepResult

    res = StepResult(
        step=3,
        reward_mean=0.5,
        reward_std=0.1,
        loss=float("nan"),
        grad_norm=1.0,
        kl=0.0,
        clip_frac=0.0,
        lr=1e-3,
        weight_version=3,
        rollout_tokens=64,
        train_tokens=64.0,
        step_s=0.2,
        phases={"rollout": 0.1},
        trace_id="ab" * 16,
    )
    line = json.dumps(res.record(attempt=1))  # what the driver writes to steps.jsonl
    assert set(json.loads(line)) == set(StepRecord.model_fields)
    rec = StepRecord.model_validate(json.loads(line))
    assert (rec.attempt, rec.step, rec.phases) == (1, 3, {"rollout": 0.1})
    assert math.isnan(rec.loss)


def test_fault_request() -> None:
    req = FaultRequest.model_validate({"kind": "skip-collective", "rank": 1})
    assert (req.kind, req.role) == (FaultKind.SKIP_COLLECTIVE, Role.TRAINER)
    assert req.model_dump(mode="json") == {
        "kind": "skip-collective",
        "role": "trainer",
        "rank": 1,
        "step": 0,
        "factor": 1.5,
    }
    for bad in ({"kind": "explode"}, {"kind": "kill", "role": "daemon"}, {"kind": "slow", "factor": 0.5}):
        with pytest.raises(ValidationError):
            FaultRequest.model_validate(bad)
