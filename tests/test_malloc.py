"""stream.malloc: the worker's cap on glibc's malloc arenas (no broker)."""

from __future__ import annotations

from hymirec.settings import Settings
from stream.malloc import limit_arenas


def test_the_worker_can_limit_glibcs_malloc_arenas():
    # The worker calls it at start (stream.app); 0 leaves glibc's default. CI and the Dockerfile run glibc.
    assert limit_arenas(0) is False
    assert limit_arenas(Settings().worker_malloc_arenas) is True
