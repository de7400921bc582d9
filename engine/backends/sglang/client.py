"""One SGLang server's HTTP API (the endpoints are listed in engine/backends/sglang/__init__.py)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import torch


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

    def _post_ok(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to an endpoint that answers {"success": ..., "message": ...}; raises unless success."""
        out = self._post(path, body)
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
        return self._post_ok("/update_weights_from_disk", body)

    def update_weights_from_tensor(self, serialized: list[str], *, version: int) -> dict[str, Any]:
        body = {"serialized_named_tensors": serialized, "flush_cache": True, "weight_version": str(version)}
        return self._post_ok("/update_weights_from_tensor", body)

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
        return self._post_ok("/init_weights_update_group", body)

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
        return self._post_ok("/update_weights_from_distributed", body)


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
