"""`faust -A stream.app worker` that kills itself (SIGKILL, as `kill -9` would) at one point of its
ingest path, for the exactness tests: the real worker, one test-only wrapper around its write.

    HYMIREC_TEST_CRASH_AT        before_write: applied events staged in memory, not yet written;
                                 after_write: rows and positions in LanceDB, the offsets not yet
                                 committed to Kafka nor the rows handed on
    HYMIREC_TEST_CRASH_AFTER     how many writes land before the one the crash is at
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.getcwd())  # the repository root: where `-A stream.app` is imported from too

import stream.ingestor  # noqa: E402 — patched before the app imports it
from faust.cli.faust import cli  # noqa: E402

POINT = os.environ["HYMIREC_TEST_CRASH_AT"]
AFTER = int(os.environ["HYMIREC_TEST_CRASH_AFTER"])
write_interactions = stream.ingestor.write_interactions
writes = 0


def crashing_write(store, result):
    global writes
    writes += 1
    if writes > AFTER and POINT == "before_write":
        os.kill(os.getpid(), signal.SIGKILL)
    write_interactions(store, result)
    if writes > AFTER and POINT == "after_write":
        os.kill(os.getpid(), signal.SIGKILL)


stream.ingestor.write_interactions = crashing_write
sys.argv = ["faust", "-A", "stream.app", "worker", "-l", "info"]
cli()
