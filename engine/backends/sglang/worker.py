"""SGLang rollout backend: drives SGLang servers over their HTTP API, behind the rollout protocol.

A ``SGLangRolloutWorker`` (one Ray actor per ``rollout.workers``) owns a few servers: it
launches them (``python -m sglang.launch_server``) or attaches to given URLs, keeps them
healthy, pushes every weight version to each of them and splits generation across the
servers that hold the version the driver expects.

SGLang endpoints used (sglang/srt/entrypoints/http_server.py):
  POST /generate                          {"input_ids": [[...]], "sampling_params": {...}, "return_logprob": true}
                                          -> [{"output_ids": [...], "meta_info": {"output_token_logprobs":
                                              [[logprob, token_id, text], ...], "weight_version": "...", ...}}]
  GET  /health_generate                   200 once a one-token generation goes through; 503 while starting
  POST /update_weights_from_disk          {"model_path", "load_format", "weight_version"} -> {"success", "message"}
  POST /update_weights_from_tensor        {"serialized_named_tensors": [per TP rank], "flush_cache", "weight_version"}
  POST /init_weights_update_group         {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
  POST /update_weights_from_distributed   {"names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version"}
  POST /flush_cache, GET /get_server_info, GET /get_model_info, GET /get_weight_version

Health: a launched server gets ``startup_grace_s`` to come up (failed checks while it warms
up are not counted); after that ``failure_threshold`` consecutive failed checks declare it
dead (a launched process that exited is dead at once). A dead launched server is restarted
(bounded by ``max_restarts``) and receives the current weights before it serves again; an
attached server that dies is left out until it answers again, then re-synced. Every server's
weight version is tracked; generation uses only servers holding the expected version, and a
response that reports another version is refused.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx
import torch

from ..config import JobConfig
from ..events import EventSink
from ..rollout import StaleWeightsError, WeightSyncError
from ..runtime import RankRuntime, RuntimeActor
from ..task import Task
from ..weights import state_checksum
from .megatron_convert import hf_llama_config
from .sglang_config import SGLangConfig


class SGLangError(RuntimeError):
    """An SGLang server refused a request or could not be reached."""


# -- one server's HTTP API -----------------------------------------------------------------


class SGLangClient:
    def __init__(self, url: str, *, timeout_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {"json": body}
        if timeout is not None:
            kwargs["timeout"] = timeout
        r = self.http.post(path, **kwargs)
        if r.status_code != 200:
            raise SGLangError(f"{self.url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        try:
            return r.json()
        except json.JSONDecodeError:
            return r.text

    def _get(self, path: str, timeout: float | None = None) -> Any:
        r = self.http.get(path, timeout=timeout) if timeout is not None else self.http.get(path)
        if r.status_code != 200:
            raise SGLangError(f"{self.url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    @staticmethod
    def _ok(path: str, out: Any) -> dict[str, Any]:
        if not isinstance(out, dict) or not out.get("success", False):
            raise SGLangError(f"{path} failed: {out!r}"[:400])
        return out

    def generate(
        self, input_ids: list[list[int]], sampling_params: dict[str, Any], *, return_logprob: bool = True
    ) -> list[dict[str, Any]]:
        out = self._post(
            "/generate",
            {
                "input_ids": input_ids,
                "sampling_params": sampling_params,
                "return_logprob": return_logprob,
                "stream": False,
            },
        )
        return out if isinstance(out, list) else [out]

    def health_generate(self, timeout_s: float) -> bool:
        try:
            return self.http.get("/health_generate", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def flush_cache(self) -> bool:
        r = self.http.post("/flush_cache")
        return r.status_code == 200

    def server_info(self) -> dict[str, Any]:
        return dict(self._get("/get_server_info"))

    def model_info(self) -> dict[str, Any]:
        return dict(self._get("/get_model_info"))

    def weight_version(self) -> str | None:
        try:
            return str(self._get("/get_weight_version", timeout=10.0).get("weight_version"))
        except (SGLangError, httpx.HTTPError):
            return None

    def set_weight_version(self, version: int) -> bool:
        """POST /update_weight_version: for servers that load weights without taking their version."""
        try:
            self._post("/update_weight_version", {"new_version": str(version), "abort_all_requests": False})
        except (SGLangError, httpx.HTTPError):
            return False
        return True

    def update_weights_from_disk(self, model_path: str, *, version: int) -> dict[str, Any]:
        body = {"model_path": model_path, "weight_version": str(version), "abort_all_requests": False}
        return self._ok("/update_weights_from_disk", self._post("/update_weights_from_disk", body))

    def update_weights_from_tensor(self, serialized: list[str], *, version: int) -> dict[str, Any]:
        body = {"serialized_named_tensors": serialized, "flush_cache": True, "weight_version": str(version)}
        return self._ok("/update_weights_from_tensor", self._post("/update_weights_from_tensor", body))

    def init_weights_update_group(
        self, *, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str
    ) -> dict[str, Any]:
        body = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": "nccl",
        }
        return self._ok("/init_weights_update_group", self._post("/init_weights_update_group", body))

    def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], *, group_name: str, version: int
    ) -> dict[str, Any]:
        body = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "flush_cache": True,
            "weight_version": str(version),
        }
        return self._ok(
            "/update_weights_from_distributed", self._post("/update_weights_from_distributed", body)
        )


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(named, output_str=True)``: a ForkingPickler
    pickle (tensors travel as shared-memory / CUDA IPC handles, so same host only), base64."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer

        return str(MultiprocessingSerializer.serialize(named, output_str=True))
    except ImportError:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401 -- registers the tensor reductions

        buf = io.BytesIO()
        ForkingPickler(buf).dump(named)
        return base64.b64encode(buf.getvalue()).decode()


# -- server processes ---------------------------------------------------------------------


@dataclass
class ServerSpec:
    worker: int
    index: int
    host: str
    port: int
    tp_size: int
    base_gpu_id: int
    model_path: str
    seed: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ServerProcess(Protocol):
    url: str

    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...


Launcher = Callable[[ServerSpec], ServerProcess]


class SubprocessServer:
    """``python -m sglang.launch_server`` in a process group of its own (terminated as a group)."""

    def __init__(self, spec: ServerSpec, cfg: SGLangConfig, log_dir: Path) -> None:
        self.url = spec.url
        cmd = [
            cfg.python or sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            spec.model_path,
            "--host",
            spec.host,
            "--port",
            str(spec.port),
            "--tp-size",
            str(spec.tp_size),
            "--base-gpu-id",
            str(spec.base_gpu_id),
            "--random-seed",
            str(spec.seed),
            "--skip-tokenizer-init",  # token ids in, token ids out
        ]
        if cfg.mem_fraction_static > 0:
            cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
        cmd += list(cfg.extra_args)
        log_dir.mkdir(parents=True, exist_ok=True)
        # A server of an earlier attempt whose rollout worker was killed outlives it (own session):
        # end it before taking its port.
        self.pid_path = log_dir / f"sglang-{spec.port}.pid"
        _reap_stale_server(self.pid_path)
        self.log_path = log_dir / f"sglang-w{spec.worker}-s{spec.index}-{spec.port}.log"
        self._log = self.log_path.open("ab")
        self.cmd = cmd
        env = dict(os.environ)
        if cfg.cuda_visible_devices:
            env["CUDA_VISIBLE_DEVICES"] = cfg.cuda_visible_devices
        elif env.get("CUDA_VISIBLE_DEVICES") == "":
            del env["CUDA_VISIBLE_DEVICES"]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.pid_path.write_text(str(self.proc.pid))

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
        self._log.close()


def _reap_stale_server(pid_path: Path) -> None:
    """Kills the process group of a recorded launch_server that is still running (checked by cmdline)."""
    try:
        pid = int(pid_path.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"sglang.launch_server" in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, 9)
        time.sleep(1.0)  # let the port go


def default_launcher(cfg: SGLangConfig, log_dir: Path) -> Launcher:
    return lambda spec: SubprocessServer(spec, cfg, log_dir)


# -- health and weights across servers ------------------------------------------------------

STARTING, HEALTHY, UNHEALTHY, DEAD = "starting", "healthy", "unhealthy", "dead"


@dataclass
class Server:
    spec: ServerSpec | None  # None: attached by URL (milepost does not own its process)
    client: SGLangClient
    proc: ServerProcess | None = None
    state: str = STARTING
    started_at: float = 0.0
    failures: int = 0
    version: int = -1  # weight version this server holds; -1: unknown / none pushed
    restarts: int = 0
    ever_healthy: bool = False
    history: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.client.url

    def serving(self, version: int) -> bool:
        return self.state == HEALTHY and self.version == version


class ServerManager:
    """Launch/attach, health checks with warm-up grace and debounced failures, restart, re-sync.

    ``tick()`` runs one round of checks; the worker calls it from a background thread every
    ``health_interval_s`` and before it generates. All state changes happen under ``lock``.
    """

    def __init__(
        self,
        cfg: SGLangConfig,
        *,
        events: EventSink,
        push: Callable[[Server], None],
        launcher: Launcher | None = None,
        model_path: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.events, self.push, self.clock = cfg, events, push, clock
        self.launcher = launcher
        self.model_path = model_path  # the newest weights on disk, for (re)launches
        self.servers: list[Server] = []
        self.lock = threading.RLock()

    def attach(self, urls: list[str]) -> None:
        for url in urls:
            client = SGLangClient(url, timeout_s=self.cfg.request_timeout_s)
            self.servers.append(Server(spec=None, client=client, started_at=self.clock()))

    def launch(self, specs: list[ServerSpec]) -> None:
        assert self.launcher is not None
        for spec in specs:
            proc = self.launcher(spec)
            client = SGLangClient(proc.url, timeout_s=self.cfg.request_timeout_s)
            self.servers.append(Server(spec=spec, client=client, proc=proc, started_at=self.clock()))
            self.events.emit("sglang_server_launched", f"SGLang server {proc.url} launched", url=proc.url)

    def _set(self, s: Server, state: str, why: str) -> None:
        if s.state != state:
            s.history.append(f"{s.state}->{state}: {why}")
            s.state = state

    def tick(self) -> None:
        with self.lock:
            for s in self.servers:
                self._check(s)

    def _check(self, s: Server) -> None:
        cfg, now = self.cfg, self.clock()
        if s.proc is not None and (code := s.proc.poll()) is not None:
            if s.state != DEAD:
                self._set(s, DEAD, f"process exited with code {code}")
                self.events.emit(
                    "sglang_server_dead",
                    f"SGLang server {s.url}: process exited with code {code}",
                    severity="error",
                    url=s.url,
                )
            self._restart(s)
            return
        ok = s.client.health_generate(cfg.check_timeout_s)
        if ok:
            s.failures = 0
            if s.state != HEALTHY:
                was = s.state
                self._set(s, HEALTHY, "health_generate answered")
                s.ever_healthy = True
                if was == DEAD:
                    self.events.emit("sglang_server_back", f"SGLang server {s.url} answers again", url=s.url)
            return
        warming = not s.ever_healthy and now - s.started_at < cfg.startup_grace_s
        if warming:
            return  # a server still starting up (loading, compiling, capturing graphs) is not failing
        s.failures += 1
        if s.failures < cfg.failure_threshold:
            self._set(s, UNHEALTHY, f"{s.failures} failed check(s)")
            return
        if s.state != DEAD:
            self._set(s, DEAD, f"{s.failures} consecutive failed checks")
            self.events.emit(
                "sglang_server_dead",
                f"SGLang server {s.url}: {s.failures} consecutive failed health checks",
                severity="error",
                url=s.url,
            )
        self._restart(s)

    def _restart(self, s: Server) -> None:
        if s.spec is None or self.launcher is None:
            s.version = -1  # an attached server that comes back is re-synced before it serves
            return
        if s.restarts >= self.cfg.max_restarts:
            return
        if s.proc is not None:
            s.proc.terminate()
        s.restarts += 1
        if (path := self.model_path()) is not None:
            s.spec = replace(s.spec, model_path=path)
        s.proc = self.launcher(s.spec)
        s.client.close()
        s.client = SGLangClient(s.proc.url, timeout_s=self.cfg.request_timeout_s)
        s.started_at, s.failures, s.version, s.ever_healthy = self.clock(), 0, -1, False
        self._set(s, STARTING, f"restart {s.restarts}")
        self.events.emit(
            "sglang_server_restarted",
            f"SGLang server {s.url} restarted ({s.restarts}/{self.cfg.max_restarts})",
            severity="warning",
            url=s.url,
            restarts=s.restarts,
        )

    def resync(self, version: int) -> None:
        """Pushes the current weights to every healthy server that does not hold ``version``."""
        if version < 0:
            return
        with self.lock:
            for s in self.servers:
                if s.state == HEALTHY and s.version != version:
                    self.push(s)

    def status(self) -> list[dict[str, Any]]:
        with self.lock:
            return [
                {
                    "url": s.url,
                    "state": s.state,
                    "weight_version": s.version,
                    "restarts": s.restarts,
                    "failures": s.failures,
                    "launched": s.spec is not None,
                }
                for s in self.servers
            ]

    def close(self) -> None:
        with self.lock:
            for s in self.servers:
                if s.proc is not None:
                    s.proc.terminate()
                s.client.close()


def write_hf_dir(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """An HF model directory SGLang loads: config.json + pytorch_model.bin (written, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    torch.save({k: v.contiguous() for k, v in state.items()}, tmp / "pytorch_model.bin")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# -- the rollout worker ---------------------------------------------------------------------


class SGLangRolloutWorker(RuntimeActor):
    """The rollout protocol (update_weights, generate, health) over SGLang servers."""

    def __init__(
        self,
        cfg: JobConfig,
        *,
        index: int,
        run_dir: str,
        attempt: int = 0,
        daemon_url: str | None = None,
        token: str | None = None,
        deferred: bool = False,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self.cfg, self.index = cfg, index
        self.scfg = s = cfg.sglang
        self.task = Task(cfg.task)
        self.run_dir = Path(run_dir)
        self.rt = RankRuntime.for_job(
            cfg,
            role="rollout",
            rank=index,
            run_dir=run_dir,
            attempt=attempt,
            daemon_url=daemon_url,
            token=token,
            start=not deferred,
        )
        self.events, self.inst = self.rt.events, self.rt.inst
        self.version, self.checksum = -1, ""
        self.state: dict[str, torch.Tensor] | None = None
        self.weight_root = Path(s.weight_dir) if s.weight_dir else self.run_dir / "sglang_weights"
        self.weight_path: Path | None = None  # directory holding self.version, once written
        self._groups: dict[str, Any] = {}  # weight-update process group per server URL ("distributed")
        workers = cfg.rollout.workers
        self.launch_mode = not s.urls
        self.manager = ServerManager(
            s,
            events=self.events,
            push=self._push,
            launcher=(launcher or default_launcher(s, self.run_dir / "logs")) if self.launch_mode else None,
            model_path=lambda: str(self._write_weights()) if self.state is not None else None,
            clock=clock,
        )
        if s.urls:
            self.manager.attach(s.urls[index::workers])
        elif s.model_path:
            self.manager.launch(self._specs(s.model_path))
        # else: launched with the first weights the trainer sends (update_weights)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._health_loop, name="sglang-health", daemon=True)
            self._thread.start()

    def _specs(self, model_path: str) -> list[ServerSpec]:
        s, n = self.scfg, self.scfg.servers_per_worker
        return [
            ServerSpec(
                worker=self.index,
                index=j,
                host=s.host,
                port=s.port_base + self.index * n + j,
                tp_size=s.tp_size,
                base_gpu_id=s.base_gpu_id + (self.index * n + j) * s.tp_size,
                model_path=model_path,
                seed=self.cfg.run.seed + self.index * n + j,
            )
            for j in range(n)
        ]

    def _health_loop(self) -> None:
        while not self._stop.wait(self.scfg.health_interval_s):
            try:
                self.manager.tick()
                self.manager.resync(self.version)
            except Exception as e:  # the loop must survive anything a server does
                self.events.emit("sglang_health_error", f"health round failed: {e!r}", severity="warning")

    def info(self) -> dict[str, Any]:
        return {
            "role": "rollout",
            "rank": self.index,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "backend": "sglang",
            "servers": [s["url"] for s in self.manager.status()],
        }

    # -- weights ----------------------------------------------------------------
    def _hf_config(self) -> dict[str, Any]:
        m = self.cfg.megatron
        return hf_llama_config(
            self.cfg.model,
            groups=m.num_query_groups or self.cfg.model.n_heads,
            vocab=self.task.vocab_size,
            rope_theta=m.rotary_base,
            rms_norm_eps=m.norm_epsilon,
        )

    def _write_weights(self) -> Path:
        assert self.state is not None
        if self.weight_path is None:
            path = self.weight_root / f"w{self.index}" / f"v{self.version:08d}"
            self.weight_path = write_hf_dir(path, self.state, self._hf_config())
            # Keep the previous version too: a server may still be loading it.
            for old in sorted((self.weight_root / f"w{self.index}").glob("v*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        return self.weight_path

    def _push(self, s: Server) -> None:
        """Sends the current weights to one server and records the version it then holds."""
        assert self.state is not None
        mode = self.scfg.weight_update
        try:
            if mode == "disk":
                s.client.update_weights_from_disk(str(self._write_weights()), version=self.version)
            elif mode == "tensor":
                named = list(self.state.items())
                tp = s.spec.tp_size if s.spec is not None else self.scfg.tp_size
                s.client.update_weights_from_tensor(
                    [serialize_named_tensors(named)] * tp, version=self.version
                )
            else:
                self._push_distributed(s)
        except (SGLangError, httpx.HTTPError) as e:
            s.version = -1
            self.events.emit(
                "sglang_weight_push_failed",
                f"SGLang server {s.url}: weights v{self.version} not loaded: {e}",
                severity="error",
                url=s.url,
                version=self.version,
            )
            return
        reported = s.client.weight_version()
        if (
            reported is not None
            and reported != str(self.version)
            and s.client.set_weight_version(self.version)
        ):
            reported = s.client.weight_version()
        if reported is not None and reported != str(self.version):
            s.version = -1
            self.events.emit(
                "sglang_weight_push_failed",
                f"SGLang server {s.url} reports weight version {reported} after loading v{self.version}",
                severity="error",
                url=s.url,
                version=self.version,
            )
            return
        previous, s.version = s.version, self.version
        self.events.emit(
            "sglang_weights_loaded",
            f"SGLang server {s.url} holds weights v{self.version} ({mode}; had v{previous})",
            url=s.url,
            version=self.version,
            previous=previous,
        )

    def _push_distributed(self, s: Server) -> None:
        """NCCL broadcast from this process (rank 0) to the server's ranks; needs CUDA here."""
        assert self.state is not None
        group = self._groups.get(s.url)
        if group is None:
            group = self._groups[s.url] = self._init_group(s)
        names = list(self.state)
        tensors = [self.state[n] for n in names]
        # The server posts its receives when the request arrives; the broadcasts run meanwhile.
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(
                s.client.update_weights_from_distributed,
                names,
                [str(t.dtype).removeprefix("torch.") for t in tensors],
                [list(t.shape) for t in tensors],
                group_name=f"milepost-w{self.index}",
                version=self.version,
            )
            for t in tensors:
                self._broadcast(group, t)
            fut.result()

    def _broadcast(self, group: Any, tensor: torch.Tensor) -> None:
        torch.distributed.broadcast(tensor.to("cuda", non_blocking=True), src=0, group=group)

    def _init_group(self, s: Server) -> Any:
        """Joins a NCCL group with the server's ranks (this process is rank 0), as SGLang's RL
        integrations do: POST /init_weights_update_group while creating our side of the group."""
        if not torch.cuda.is_available():
            raise SGLangError("sglang.weight_update='distributed' needs CUDA in the rollout worker")
        from sglang.srt.utils import init_custom_process_group

        tp = s.spec.tp_size if s.spec is not None else self.scfg.tp_size
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = int(sock.getsockname()[1])
        addr = socket.gethostbyname(socket.gethostname())
        name = f"milepost-w{self.index}"
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(
                s.client.init_weights_update_group,
                master_address=addr,
                master_port=port,
                rank_offset=1,
                world_size=tp + 1,
                group_name=name,
            )
            group = init_custom_process_group(
                backend="nccl", init_method=f"tcp://{addr}:{port}", world_size=tp + 1, rank=0, group_name=name
            )
            fut.result()
        return group

    def update_weights(self, packet: dict[str, Any]) -> dict[str, Any]:
        with self.inst.phase("weight_sync"):
            version, announced, state = packet["version"], packet["checksum"], packet["state"]
            fmt = packet.get("format", "policy")
            if fmt != "hf_llama":
                raise WeightSyncError(
                    f"rollout {self.index}: weights v{version} are in format {fmt!r}; SGLang serves 'hf_llama'"
                )
            got = state_checksum(state)
            if got != announced:
                self.events.emit(
                    "weight_sync_failed",
                    f"weights v{version}: checksum {got[:12]} != announced {announced[:12]}; keeping v{self.version}",
                    severity="error",
                    version=version,
                )
                raise WeightSyncError(
                    f"rollout {self.index}: weights v{version} checksum {got[:12]} does not match "
                    f"announced {announced[:12]}; still serving v{self.version}"
                )
            with self.manager.lock:
                self.version, self.checksum, self.state = version, got, state
                self.weight_path = None
                if self.launch_mode and not self.manager.servers:
                    # No model path given: the servers start from the trainer's first weights.
                    self.manager.launch(self._specs(str(self._write_weights())))
                # Servers not up now get these weights once they are (ServerManager.resync).
                for s in self.manager.servers:
                    if s.state == HEALTHY:
                        self._push(s)
        return {"rank": self.index, "version": version, "checksum": got, "servers": self.manager.status()}

    # -- generation ---------------------------------------------------------------
    def _eligible(self, version: int, deadline: float) -> list[Server]:
        while True:
            self.manager.tick()
            self.manager.resync(self.version)
            with self.manager.lock:
                ready = [s for s in self.manager.servers if s.serving(version)]
                coming = [s for s in self.manager.servers if s.state in (STARTING, UNHEALTHY)]
            if ready or not coming or time.monotonic() > deadline:
                return ready
            time.sleep(min(1.0, self.scfg.health_interval_s))

    def generate(self, step: int, prompts: torch.Tensor, expected_version: int) -> dict[str, Any]:
        self.rt.faults.check(step)
        if self.version != expected_version:
            msg = f"rollout {self.index}: step {step} expects weights v{expected_version}, worker holds v{self.version}"
            if not self.cfg.rollout.allow_stale_weights:
                self.events.emit("stale_weights", msg, severity="error", step=step)
                raise StaleWeightsError(msg)
            self.events.emit("stale_weights", msg + " (allowed by config)", severity="warning", step=step)
        g, r = self.cfg.grpo, self.task.response_len
        params = {
            "max_new_tokens": r,
            "min_new_tokens": r,
            "ignore_eos": True,
            "temperature": g.temperature,
            "top_p": g.top_p,
        }
        t0 = time.perf_counter()
        with self.inst.step(step), self.inst.phase("rollout"):
            rows = prompts.tolist()
            outputs: list[dict[str, Any] | None] = [None] * len(rows)
            deadline = time.monotonic() + self.scfg.request_timeout_s
            pending = list(range(len(rows)))
            while pending:
                servers = self._eligible(self.version, deadline)
                if not servers:
                    raise SGLangError(
                        f"rollout {self.index}: no SGLang server holds weights v{self.version}: {self.manager.status()}"
                    )
                shards = [pending[i :: len(servers)] for i in range(len(servers))]
                failed: list[int] = []
                for s, shard in zip(servers, shards, strict=False):
                    if not shard:
                        continue
                    try:
                        outs = s.client.generate([rows[i] for i in shard], params)
                    except (SGLangError, httpx.HTTPError) as e:
                        with self.manager.lock:
                            s.failures += 1
                            self.manager._set(s, UNHEALTHY, f"generate failed: {e}")
                        self.events.emit(
                            "sglang_generate_failed",
                            f"SGLang server {s.url}: {e}",
                            severity="warning",
                            url=s.url,
                        )
                        failed += shard
                        continue
                    for i, out in zip(shard, outs, strict=True):
                        served = (out.get("meta_info") or {}).get("weight_version")
                        if served is not None and str(served) != str(expected_version):
                            msg = (
                                f"rollout {self.index}: SGLang server {s.url} generated with weight version "
                                f"{served}, expected v{expected_version}"
                            )
                            self.events.emit("stale_weights", msg, severity="error", step=step)
                            raise StaleWeightsError(msg)
                        outputs[i] = out
                pending = failed
            responses, logprobs = self._collect(outputs, r)
            self.rt.faults.slow_down(time.perf_counter() - t0)
        gen_s = time.perf_counter() - t0
        self.rt.publish(timings={"rollout": gen_s}, metrics={"weight_version": float(self.version)})
        return {
            "responses": responses,
            "logprobs": logprobs,
            "weight_version": self.version,
            "checksum": self.checksum,
            "gen_s": gen_s,
            "tokens": int(responses.numel()),
        }

    def _collect(self, outputs: list[dict[str, Any] | None], r: int) -> tuple[torch.Tensor, torch.Tensor]:
        responses = torch.empty(len(outputs), r, dtype=torch.long)
        logprobs = torch.zeros(len(outputs), r, dtype=torch.float32)
        vocab = self.task.vocab_size
        for i, out in enumerate(outputs):
            assert out is not None
            ids = list(out.get("output_ids") or [])
            if len(ids) != r:
                raise SGLangError(f"rollout {self.index}: SGLang returned {len(ids)} tokens, expected {r}")
            if any(not 0 <= t < vocab for t in ids):
                raise SGLangError(
                    f"rollout {self.index}: SGLang returned token ids outside [0, {vocab}): {ids}"
                )
            responses[i] = torch.tensor(ids)
            lps = (out.get("meta_info") or {}).get("output_token_logprobs") or []
            if len(lps) == r:
                logprobs[i] = torch.tensor([float(x[0]) for x in lps])
        return responses, logprobs

    def health(self) -> dict[str, Any]:
        servers = self.manager.status()
        ok = any(s["state"] == HEALTHY and s["weight_version"] == self.version for s in servers)
        return {"ok": ok, "version": self.version, "checksum": self.checksum, "servers": servers}

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.manager.close()
        self.rt.close()
