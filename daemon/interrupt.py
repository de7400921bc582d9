"""Ctrl-C of a foreground ``milepost run`` (``make run``): stop the whole demo, leave nothing running.

The first Ctrl-C asks the run to stop (the attempt checkpoints at its step boundary and
exits; the supervisor then ends the warm standby) while the API stays up, because the stop
reaches the attempt in the replies to its ranks' reports. If the attempt has not ended
within ``grace_s``, or on a second Ctrl-C, the attempt's and the standby's process groups
are killed (their local Ray clusters are in those groups). A daemon started with
``--detach``, or ended by SIGTERM or SIGKILL, keeps today's behaviour instead: the attempt
trains on and the next daemon re-attaches to it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from milepost.engine.contract.enums import ControlAction

from .supervisor import Supervisor

log = logging.getLogger(__name__)

STOP_GRACE_S = 60.0  # a last checkpoint of the tiny demo takes seconds; a big job's may not fit


class InterruptibleServer(uvicorn.Server):
    """uvicorn's server whose first SIGINT goes to ``on_interrupt`` (when set) instead of ending it."""

    on_interrupt: Callable[[], None] | None = None
    _interrupted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and self.on_interrupt is not None and not self._interrupted:
            self._interrupted = True
            self.on_interrupt()
            return
        super().handle_exit(sig, frame)


class StopOnInterrupt:
    """``on_interrupt`` for a foreground daemon: stop the run, then end the server."""

    def __init__(
        self,
        sup: Supervisor,
        server: uvicorn.Server,
        *,
        grace_s: float = STOP_GRACE_S,
        say: Callable[[str], Any] = lambda text: print(text, flush=True),
    ) -> None:
        self.sup, self.server, self.grace_s, self.say = sup, server, grace_s, say
        self.requested = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self) -> None:
        """From the signal handler: returns at once, the stop runs on a thread of its own."""
        self.requested.set()
        self._thread = threading.Thread(target=self._stop, name="milepost-ctrl-c", daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        self.say(
            "\nmilepost: Ctrl-C: stopping the run (a last checkpoint, then the attempt ends); "
            "Ctrl-C again to end it at once"
        )
        try:
            self.sup.controller.control(ControlAction.STOP)
        except ValueError as e:  # already stopping, or finished: nothing to ask
            log.info("stop not requested: %s", e)
        if not self.sup.done.wait(self.grace_s):
            self.say(f"milepost: the attempt did not stop within {self.grace_s:.0f}s; ending it")
        self.server.should_exit = True

    def finish(self, supervise: threading.Thread, run_dir: str, job: str) -> None:
        """After the server has stopped: the supervisor's thread ends, then whatever of the run is
        still running is killed (a second Ctrl-C, or a stop that did not finish in time)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # bounded from here on: let it finish
        self.sup.shutdown()
        supervise.join(timeout=30)
        self.sup.end_all("the daemon's terminal was interrupted (Ctrl-C)")
        run = self.sup.store.run() or {}
        last = self.sup.store.last_step()
        self.say(
            f"milepost: run {run.get('state', '?')} at step {last['step'] if last else 0}; "
            "nothing of it is left running.\n"
            f"  continue   .venv/bin/milepost run {job} --run-dir {run_dir}\n"
            "  to keep a run going without a terminal, start it with --detach:\n"
            f"             .venv/bin/milepost run {job} --run-dir {run_dir} --detach"
        )
