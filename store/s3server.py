"""A real S3-compatible server on 127.0.0.1 for LanceDB on object storage: Versity S3 Gateway.

    local = LocalS3(settings)    # settings.s3_endpoint = http://127.0.0.1:PORT, s3_access_key_id, s3_secret_access_key
    local.start(timeout=30)      # build the binary once, launch, wait for /health, create the bucket
    local.stop()                 # SIGTERM, SIGKILL after a grace period; the data stays for the next start

Why this server: versitygw (github.com/versity/versitygw, Apache-2.0) is one Go binary that
``go install`` builds from the Go module proxy in about 2 minutes on 2 cores; it serves a plain
directory (one folder per bucket, kept across restarts, readable on disk); and since v1.8.0 it
evaluates ``If-None-Match: *`` on PutObject under a per-object lock, so of two writers creating the
same key exactly one gets 200 and the other 412. That conditional PUT is how lance commits a table
version on S3 (its ConditionalPutCommitHandler writes ``_versions/N.manifest`` with
``PutMode::Create``): without it two writers could both commit version N and one commit would be
lost. Not chosen: MinIO (AGPL); SeaweedFS (only a pseudo-version on the Go proxy, a far larger
program; not tried); gofakes3 and moto, fakes written for tests rather than stores.
The same server has an official image (``versity/versitygw``) for docker-compose.

Everything it writes lives in ``settings.s3_home``:

    data/            the buckets (POSIX backend; object metadata in extended attributes)
    server.out       the server's stdout/stderr (request logging off)
    server.pid       pid of the running server

The binary goes to ``settings.cache_dir/s3/versitygw-<version>/``. The credentials reach the
server in its environment, never on its command line (which ``ps`` shows to every user).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from store.objectstore import create_bucket, is_s3, region

log = logging.getLogger(__name__)

VERSITYGW_MODULE = "github.com/versity/versitygw/cmd/versitygw"
VERSITYGW_VERSION = "v1.8.0"  # the first with an atomic If-None-Match on PutObject (the lance commit)
HEALTH_PATH = "/health"
INSTALL_TIMEOUT_S = 1200.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class S3Status:
    running: bool
    endpoint: str
    data_dir: Path
    pid: int | None = None
    start_seconds: float | None = None
    already_running: bool = False

    def describe(self) -> str:
        if not self.running:
            return f"s3 not running (endpoint {self.endpoint or '(unset)'}; data {self.data_dir})"
        how = f", started in {self.start_seconds:.1f} s" if self.start_seconds is not None else (
            ", already running" if self.already_running else "")
        return f"s3 running (pid {self.pid}) on {self.endpoint}, data {self.data_dir}{how}"


def _die_with_parent():
    """preexec_fn: Linux SIGKILLs the server when the thread that started it exits (tests only).
    prctl is looked up here, in the parent: a forked child of a threaded process must not load it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class LocalS3:
    """The local S3 server of one ``settings.s3_home``; every method can be called from a new process."""

    def __init__(self, settings: Settings, *, die_with_parent: bool = False) -> None:
        self.settings = settings
        self.home = Path(settings.s3_home).absolute()
        self.data_dir = self.home / "data"
        self.pid_file = self.home / "server.pid"
        self.out_file = self.home / "server.out"
        self.bin_dir = Path(settings.cache_dir).absolute() / "s3" / f"versitygw-{VERSITYGW_VERSION}"
        self.binary = self.bin_dir / "versitygw"
        self.die_with_parent = die_with_parent

    # --- install ---------------------------------------------------------------------------------
    def install(self) -> Path:
        """Build the server binary into the cache (once per machine and version); returns its path."""
        if self.binary.exists():
            return self.binary
        go = shutil.which("go")
        if go is None:
            raise HymirecError("`go` not found on PATH: the local S3 server (versitygw) is built with "
                               f"`go install {VERSITYGW_MODULE}@{VERSITYGW_VERSION}` once")
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        # Two processes (a test run and the CLI) may race here: the second waits for the first.
        with open(self.bin_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.binary.exists():
                return self.binary
            staging = self.bin_dir / "staging"
            shutil.rmtree(staging, ignore_errors=True)
            build_log = self.bin_dir / "build.log"
            started = time.monotonic()
            with open(build_log, "w") as out:
                proc = subprocess.run([go, "install", "-trimpath", f"{VERSITYGW_MODULE}@{VERSITYGW_VERSION}"],
                                      stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=os.environ | {"GOBIN": str(staging)}, timeout=INSTALL_TIMEOUT_S)
            if proc.returncode != 0 or not (staging / "versitygw").exists():
                tail = build_log.read_text(errors="replace").strip().splitlines()[-3:]
                raise HymirecError(f"building versitygw {VERSITYGW_VERSION} failed: {' | '.join(tail)} "
                                   f"(full log: {build_log})")
            (staging / "versitygw").rename(self.binary)
            staging.rmdir()
            log.info("versitygw built into %s in %.0f s", self.binary, time.monotonic() - started)
        return self.binary

    # --- state -----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return urlsplit(self.settings.s3_endpoint).port or 80

    def _recorded_pid(self) -> int | None:
        """The pid in server.pid if that process is alive and serves this home (not a reused pid)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                try:
                    os.waitpid(pid, os.WNOHANG)  # our own exited child: reap it
                except ChildProcessError:
                    pass
                return None
            return pid if str(self.data_dir) in proc.cmdline() else None
        except (OSError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.settings.s3_endpoint}{HEALTH_PATH}", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def status(self) -> S3Status:
        pid = self._recorded_pid()
        return S3Status(pid is not None and self._healthy(), self.settings.s3_endpoint, self.data_dir, pid)

    # --- start / stop ----------------------------------------------------------------------------
    def _check_settings(self) -> None:
        s = self.settings
        parts = urlsplit(s.s3_endpoint)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
            raise HymirecError(f"s3_endpoint is {s.s3_endpoint or 'unset'}: the local S3 server serves "
                               "http://127.0.0.1:PORT; set HYMIREC_S3_ENDPOINT to one")
        if not s.s3_access_key_id or not s.s3_secret_access_key.get_secret_value():
            raise HymirecError("the local S3 server needs credentials: set HYMIREC_S3_ACCESS_KEY_ID and "
                               "HYMIREC_S3_SECRET_ACCESS_KEY (they become its root user)")

    def start(self, timeout: float = 30.0) -> S3Status:
        """Start the server unless it runs already, wait for its /health, create the bucket of
        ``lancedb_uri`` (s3://BUCKET/...). ``timeout`` counts from the launch; a first build comes on top."""
        self._check_settings()
        started = time.monotonic()
        current = self.status()
        if current.pid is not None:  # running, or launched by another process and still starting
            self._wait_ready(psutil.Process(current.pid), started + timeout)
            self._create_bucket()
            return S3Status(True, current.endpoint, self.data_dir, current.pid, already_running=True)
        if not _port_free(self.port):
            raise HymirecError(f"port {self.port} on 127.0.0.1 is in use by another process: stop it or "
                               "choose another HYMIREC_S3_ENDPOINT")
        binary = self.install()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        env = os.environ | {"ROOT_ACCESS_KEY_ID": s.s3_access_key_id,
                            "ROOT_SECRET_ACCESS_KEY": s.s3_secret_access_key.get_secret_value()}
        cmd = [str(binary), "--port", f"127.0.0.1:{self.port}", "--region", region(s),
               "--quiet", "--health", HEALTH_PATH, "posix", str(self.data_dir)]
        with open(self.out_file, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.home, start_new_session=True,
                                    preexec_fn=_die_with_parent() if self.die_with_parent else None)
        self.pid_file.write_text(f"{proc.pid}\n")
        self._wait_ready(psutil.Process(proc.pid), time.monotonic() + timeout)
        self._create_bucket()
        return S3Status(True, s.s3_endpoint, self.data_dir, proc.pid, start_seconds=time.monotonic() - started)

    def _wait_ready(self, proc: psutil.Process, deadline: float) -> None:
        while not self._healthy():
            try:
                alive = proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive or time.monotonic() > deadline:
                self.stop()
                tail = self.out_file.read_text(errors="replace").strip().splitlines()[-5:] if self.out_file.exists() else []
                what = "exited while starting" if not alive else f"did not answer {HEALTH_PATH} in time"
                raise HymirecError(f"the local S3 server {what}; last lines of {self.out_file}:\n" + "\n".join(tail))
            time.sleep(0.1)

    def _create_bucket(self) -> None:
        if is_s3(self.settings):
            create_bucket(self.settings)

    def stop(self) -> bool:
        """Stop the recorded server (SIGTERM, then SIGKILL after a grace period). True if one ran."""
        pid = self._recorded_pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        proc = psutil.Process(pid)
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except psutil.TimeoutExpired:
            log.warning("s3 server pid %d ignored SIGTERM for %.0f s; killing it", pid, STOP_GRACE_S)
            proc.kill()
            proc.wait(10)
        return True


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
