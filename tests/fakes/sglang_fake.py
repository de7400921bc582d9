"""A FAKE of SGLang's HTTP server API, for tests: a real HTTP server on 127.0.0.1, no model.

It answers the endpoints milepost's SGLang rollout uses, with SGLang's request and response
shapes (sglang/srt/entrypoints/http_server.py, sglang/srt/managers/io_struct.py), and keeps
what a test needs to check: the weights it was given, its weight version, every request.
Generation is a deterministic function of the prompt and of the weights it holds (so a test
can tell which weights served a request), not a language model.

Knobs: ``warmup_s`` (503 from /health_generate until then, like a server still starting),
``unhealthy`` (503 while set), ``kill()`` (the listening socket goes away: connection refused).
``FakeLauncher`` stands in for ``python -m sglang.launch_server``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  -- tensor reductions for the tensor-update payloads


class FakeSGLangServer:
    def __init__(self, *, vocab: int, warmup_s: float = 0.0, model_path: str = "", port: int = 0) -> None:
        self.vocab = vocab
        self.ready_at = time.monotonic() + warmup_s
        self.unhealthy = False
        self.weights: dict[str, torch.Tensor] | None = None
        self.weight_version = "default"
        self.requests: list[tuple[str, Any]] = []
        self.groups: dict[str, dict[str, Any]] = {}
        # What a test "broadcasts" to this server; like NCCL receives, the handler waits for each tensor.
        self.distributed_inbox: queue.Queue[torch.Tensor] = queue.Queue()
        self.lock = threading.Lock()
        self.alive = True
        if model_path:
            self._load_dir(model_path)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _send(self, code: int, payload: Any = None, text: str | None = None) -> None:
                data = text.encode() if text is not None else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if text is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append(("GET " + self.path, None))
                code, payload, text = fake.handle_get(self.path)
                self._send(code, payload, text)

            def do_POST(self) -> None:
                body = self._body()
                fake.requests.append(("POST " + self.path, body))
                code, payload, text = fake.handle_post(self.path, body)
                self._send(code, payload, text)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    # -- state ----------------------------------------------------------------
    def fingerprint(self) -> int:
        """A number derived from the weights held (0 without weights): it shifts every generated token."""
        if self.weights is None:
            return 0
        h = hashlib.sha256()
        for k in sorted(self.weights):
            h.update(k.encode())
            h.update(self.weights[k].detach().float().numpy().tobytes())
        return int(h.hexdigest()[:8], 16)

    def expected_output(self, prompt: list[int], n: int) -> list[int]:
        base = sum(prompt) + self.fingerprint()
        return [(base + j) % self.vocab for j in range(n)]

    def _load_dir(self, path: str) -> None:
        d = Path(path)
        json.loads((d / "config.json").read_text())  # SGLang needs the HF config next to the weights
        self.weights = torch.load(d / "pytorch_model.bin", weights_only=True)

    def kill(self) -> None:
        """The server process dies: nothing listens on the port any more."""
        if self.alive:
            self.alive = False
            self.httpd.shutdown()
            self.httpd.server_close()

    # -- endpoints --------------------------------------------------------------
    def handle_get(self, path: str) -> tuple[int, Any, str | None]:
        ready = time.monotonic() >= self.ready_at and not self.unhealthy
        if path in ("/health", "/health_generate"):
            return (200, None, "") if ready else (503, None, "")
        if path == "/get_weight_version":
            return 200, {"weight_version": self.weight_version}, None
        if path == "/get_model_info":
            return (
                200,
                {"model_path": "fake", "is_generation": True, "weight_version": self.weight_version},
                None,
            )
        if path == "/get_server_info":
            return 200, {"version": "fake", "weight_version": self.weight_version, "tp_size": 1}, None
        return 404, {"detail": "Not Found"}, None

    def handle_post(self, path: str, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        if path == "/generate":
            return 200, self._generate(body), None
        if path == "/flush_cache":
            return 200, None, "Cache flushed.\n"
        if path == "/update_weights_from_disk":
            try:
                self._load_dir(body["model_path"])
            except (OSError, KeyError, ValueError) as e:
                return (
                    400,
                    {"success": False, "message": f"Failed to load: {e}", "num_paused_requests": 0},
                    None,
                )
            return self._updated(body, "Succeeded to update model weights.")
        if path == "/update_weights_from_tensor":
            payloads = body["serialized_named_tensors"]
            named = pickle.loads(base64.b64decode(payloads[0]))
            self.weights = {k: v.clone() for k, v in named}
            return self._updated(body, "Succeeded to update model weights.")
        if path == "/init_weights_update_group":
            self.groups[body["group_name"]] = body
            return 200, {"success": True, "message": "Succeeded to initialize custom process group."}, None
        if path == "/update_weights_from_distributed":
            if body["group_name"] not in self.groups:
                return 400, {"success": False, "message": "group not initialized"}, None
            got = {}
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"], strict=True):
                try:
                    t = self.distributed_inbox.get(timeout=30)
                except queue.Empty:
                    return 400, {"success": False, "message": f"{name}: nothing broadcast"}, None
                if list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                    return 400, {"success": False, "message": f"{name}: got {t.dtype}{list(t.shape)}"}, None
                got[name] = t
            self.weights = got
            return self._updated(body, "Succeeded to update parameter online.")
        return 404, {"detail": "Not Found"}, None

    def _updated(self, body: dict[str, Any], message: str) -> tuple[int, Any, None]:
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return 200, {"success": True, "message": message, "num_paused_requests": 0}, None

    def _generate(self, body: dict[str, Any]) -> Any:
        ids = body["input_ids"]
        batch = ids if ids and isinstance(ids[0], list) else [ids]
        n = int(body["sampling_params"]["max_new_tokens"])
        outs = []
        for k, prompt in enumerate(batch):
            out = self.expected_output(prompt, n)
            meta: dict[str, Any] = {
                "id": f"fake-{len(self.requests)}-{k}",
                "finish_reason": {"type": "length", "length": n},
                "prompt_tokens": len(prompt),
                "completion_tokens": n,
                "cached_tokens": 0,
                "weight_version": self.weight_version,
            }
            if body.get("return_logprob"):
                meta["output_token_logprobs"] = [[-0.5, t, None] for t in out]
            outs.append({"output_ids": out, "meta_info": meta})
        return outs if ids and isinstance(ids[0], list) else outs[0]


class FakeProcess:
    """What the launcher returns: the ServerProcess protocol over a fake server."""

    def __init__(self, server: FakeSGLangServer) -> None:
        self.server, self.url = server, server.url
        self.exit_code: int | None = None

    def poll(self) -> int | None:
        return self.exit_code

    def terminate(self) -> None:
        self.server.kill()
        if self.exit_code is None:
            self.exit_code = -15

    def crash(self) -> None:
        self.server.kill()
        self.exit_code = -9


class FakeLauncher:
    """Stands in for ``python -m sglang.launch_server``: starts a fake server per call."""

    def __init__(self, *, vocab: int, warmup_s: float = 0.0) -> None:
        self.vocab, self.warmup_s = vocab, warmup_s
        self.launched: list[tuple[Any, FakeProcess]] = []

    def __call__(self, spec: Any) -> FakeProcess:
        proc = FakeProcess(
            FakeSGLangServer(vocab=self.vocab, warmup_s=self.warmup_s, model_path=spec.model_path)
        )
        self.launched.append((spec, proc))
        return proc

    def close(self) -> None:
        for _, proc in self.launched:
            proc.terminate()


def serialized_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    buf = io.BytesIO()
    pickle.Pickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode()
