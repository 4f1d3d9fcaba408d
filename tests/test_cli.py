"""Bad CLI arguments and bad settings: one line on stderr, non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hymirec.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, env, fragment",
    [
        (["nosuchcommand"], None, "invalid choice"),
        (["replay", "/no/such/file.jsonl"], None, "no such file"),
        (["replay", __file__, "--rate", "-5"], None, "positive"),
        (["replay", __file__, "--rate", "3", "--speedup", "2"], None, "not allowed with"),
        (["datasets", "export", "ml-1m", "--out", "x"], None, "invalid choice"),
        (["eval", "--model", "sasrec"], None, "required"),
        (["eval", "--interactions", __file__, "--items", __file__, "--model", "pop", "--seeds", "1,x"], None,
         "comma-separated"),
        (["kafka", "status"], {"HYMIREC_PARTITIONS": "zero"}, "HYMIREC_PARTITIONS"),
        (["kafka", "status"], {"HYMIREC_KAFKA_BOOTSTRAP": "nohostport"}, "HYMIREC_KAFKA_BOOTSTRAP"),
        (["settings"], {"HYMIREC_WORKER_GC_THRESHOLDS": "[-1, 10, 10]"}, "HYMIREC_WORKER_GC_THRESHOLDS"),
    ],
)
def test_bad_input_is_one_line(args, env, fragment):
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hymirec")
    assert "error" in lines[0] and fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_sigterm_runs_the_commands_clean_up():
    # `hymirec simulate` stops its broker and workers in `finally`/`with` blocks: SIGTERM must reach them.
    # 'ready' is printed inside the try: a SIGTERM right after it still finds the finally block.
    script = ("import time\nfrom hymirec.cli import exit_on_sigterm\nexit_on_sigterm()\n"
              "try:\n    print('ready', flush=True)\n    time.sleep(60)\nfinally:\n    print('cleaned up', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "cleaned up" and proc.returncode == 143


def test_settings_prints_each_value_as_its_variable_takes_it():
    printed = run_cli("settings", env={"HYMIREC_WORKER_GC_THRESHOLDS": "[5000, 7, 9]"}).stdout
    line = next(line for line in printed.splitlines() if line.startswith("HYMIREC_WORKER_GC_THRESHOLDS="))
    value = line.split("=", 1)[1].split("  #")[0]
    assert value == "[5000, 7, 9]"
    again = run_cli("settings", env={"HYMIREC_WORKER_GC_THRESHOLDS": value}).stdout
    assert line in again.splitlines()
