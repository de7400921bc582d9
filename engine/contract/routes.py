"""HTTP paths of the daemon that the ranks and the tools call (the API's full list is /openapi.json)."""

from __future__ import annotations

API = "/api/v1"
INGEST_PATH = f"{API}/ingest"  # rank reports: POST {"reports": [Report, ...]}
FAULTS_PATH = f"{API}/faults"  # POST a FaultRequest
STATUS_PATH = f"{API}/status"
OTLP_TRACES_PATH = "/v1/traces"  # OTLP/HTTP spans from the ranks (the OTLP standard's path)
METRICS_PATH = "/metrics"
HEALTHZ_PATH = "/healthz"


def control_path(action: str) -> str:
    """``POST`` here to pause, resume, stop or checkpoint the run."""
    return f"{API}/control/{action}"


ALERTS_PATH = f"{API}/alerts"  # GET: alerts firing, pending and resolved, and delivery
ALERTS_TEST_PATH = f"{API}/alerts/test"  # POST {"receiver": NAME}: send a test alert, get the answer
SILENCES_PATH = f"{API}/silences"  # GET: the silences; POST a SilenceRequest


def silence_path(silence_id: str) -> str:
    """``DELETE`` here to expire a silence."""
    return f"{SILENCES_PATH}/{silence_id}"


# Read routes shaped for the dashboard (daemon/api_views.py).
RANK_MATRIX_PATH = f"{API}/ranks/matrix"  # GET compute seconds per rank x step, one page of ranks
COLLECTIVES_PATH = f"{API}/collectives"  # GET in flight now, and per op/group buckets over time
ALERTS_PATH = f"{API}/alerts"
SILENCES_PATH = f"{API}/silences"


def step_trace_path(step: int | str) -> str:
    """``GET`` here: the spans of step ``step``'s trace."""
    return f"{API}/steps/{step}/trace"


def diagnosis_evidence_path(diag_id: int | str) -> str:
    """``GET`` here: a diagnosis's py-spy stacks and flight-recorder summary."""
    return f"{API}/diagnoses/{diag_id}/evidence"


def diagnosis_timeline_path(diag_id: int | str) -> str:
    """``GET`` here: a diagnosis's recovery timeline."""
    return f"{API}/diagnoses/{diag_id}/timeline"
