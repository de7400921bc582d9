"""Control requests from the daemon (pause, resume, checkpoint, stop) as the driver receives them."""

from __future__ import annotations

import threading
from typing import Any


class ControlInbox:
    """Control requests from the daemon, delivered in reporter responses, applied at step boundaries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen = 0
        self._queue: list[str] = []

    def on_response(self, resp: dict[str, Any]) -> None:
        with self._lock:
            for cmd in resp.get("control") or []:
                if isinstance(cmd, dict) and int(cmd.get("id", 0)) > self._seen:
                    self._seen = int(cmd["id"])
                    self._queue.append(str(cmd.get("action")))

    def drain(self) -> list[str]:
        with self._lock:
            out, self._queue = self._queue, []
        return out
