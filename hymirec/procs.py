"""Child processes (faust worker, trainer) that must never outlive their parent command.

Seen here: a faust worker whose agent crashed ignored SIGTERM and hung, so stopping is SIGTERM,
a bounded wait, then SIGKILL of the whole process group.

``faust_worker`` is the one way the project starts a worker of its own (`hymirec demo`, the
benchmarks, `hymirec simulate`, the tests): up once its /health answers, stopped however the block ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import SecretStr

from hymirec.errors import HymirecError
from hymirec.settings import Settings, env_value


WORKER_START_S = 180.0  # longest wait for a new worker's /health (a cold start imports torch)
WORKER_STOP_S = 20.0  # SIGTERM grace before SIGKILL


class WaitTimeout(HymirecError, TimeoutError):
    """A bounded wait ran out: a user-facing failure, not a crash."""


class ManagedProcess:
    """A command in its own process group, output appended to ``log_path``; a context manager."""

    def __init__(self, argv: list[str], *, log_path: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        """Start the command, unless it is running already: ``with proc.start():`` enters (and so
        starts) it a second time, and two workers would race for one web port and one group seat."""
        if self.alive:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the group, wait up to ``timeout`` s, then SIGKILL it; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        else:
            self._signal(signal.SIGKILL)  # children of an exited leader may still hold the group
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "ManagedProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; WaitTimeout after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def worker_get(settings: Settings, path: str) -> bytes | None:
    """GET ``path`` from the worker's web server; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{settings.web_host}:{settings.web_port}{path}", timeout=5) as response:
            return response.read()
    except OSError:
        return None


def worker_health(settings: Settings) -> dict | None:
    """The worker's ``GET /health`` JSON; None while it does not answer."""
    body = worker_get(settings, "/health")
    return json.loads(body) if body else None


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as the HYMIREC_* variables a child process (worker, CLI) reads: every field."""
    values = {name: getattr(settings, name) for name in Settings.model_fields}
    return {f"HYMIREC_{name.upper()}": value.get_secret_value() if isinstance(value, SecretStr) else env_value(value)
            for name, value in values.items()}


def worker_exited(proc: ManagedProcess):
    """Raise: the worker is gone (its log's last lines say why). For ``check if proc.alive else worker_exited(proc)``."""
    raise HymirecError(f"the worker exited; last lines of {proc.log_path}:\n{proc.tail()}")


def wait_serving(settings: Settings, proc: ManagedProcess, version: str, *, timeout: float = WORKER_START_S,
                 interval: float = 0.2) -> None:
    """Wait until the worker's /health says it serves ``version`` (WaitTimeout; HymirecError if it exits)."""
    wait_for(lambda: (worker_health(settings) or {}).get("model_version") == version if proc.alive
             else worker_exited(proc), timeout=timeout, interval=interval, what=f"the worker to serve {version}")


@contextmanager
def faust_worker(settings: Settings, log_path: Path, *, env: dict[str, str] | None = None,
                 start_timeout: float = WORKER_START_S, stop_timeout: float = WORKER_STOP_S) -> Iterator[ManagedProcess]:
    """`faust -A stream.app worker -l info` with ``settings`` (as HYMIREC_* variables, ``env`` on top),
    output appended to ``log_path``; yielded once its GET /health answers. Stopped SIGTERM, then SIGKILL
    after ``stop_timeout`` s, however the block ends (also when the start fails or times out)."""
    faust = str(Path(sys.executable).with_name("faust"))
    proc = ManagedProcess([faust, "-A", "stream.app", "worker", "-l", "info"], log_path=log_path,
                          env=settings_env(settings) | (env or {}))
    proc.start()
    try:
        wait_for(lambda: worker_health(settings) if proc.alive else worker_exited(proc), timeout=start_timeout,
                 interval=0.2, what="the worker's /health")
        yield proc
    finally:
        proc.stop(stop_timeout)
