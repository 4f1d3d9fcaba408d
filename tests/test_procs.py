"""hymirec.procs.ManagedProcess: one process per start, however it is entered, and gone after the block."""

from __future__ import annotations

import sys
from pathlib import Path

from hymirec.procs import ManagedProcess, settings_env
from hymirec.settings import Settings, load_settings

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_started_process_entered_as_a_context_is_not_started_twice(tmp_path: Path):
    proc = ManagedProcess(SLEEPER, log_path=tmp_path / "sleeper.log")
    with proc.start() as entered:
        first = proc.proc
        assert entered is proc and proc.alive
        assert proc.start().proc is first  # still the one process
    assert not proc.alive and first.returncode is not None


def test_a_process_that_exited_starts_again(tmp_path: Path):
    proc = ManagedProcess([sys.executable, "-c", "pass"], log_path=tmp_path / "quick.log")
    first = proc.start().proc
    first.wait(30)
    assert proc.start().proc is not first
    proc.proc.wait(30)


def test_a_child_reads_back_every_setting_it_is_handed(monkeypatch):
    settings = load_settings(worker_gc_thresholds=(5000, 7, 9), kafka_sasl_password="s3cret", partitions=3)
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    again = Settings()
    assert again == settings and again.kafka_sasl_password.get_secret_value() == "s3cret"
