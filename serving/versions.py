"""The ``model-versions`` message that announces a published version (trainer.online.announce
sends it; the worker's serving agent parses it here)."""

from __future__ import annotations

import json
from typing import Any

from hymirec.errors import HymirecError
from store.registry import VERSION


def parse_version_message(value: Any) -> dict:
    """A model-versions payload (JSON object with "version") → dict; HymirecError otherwise."""
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise HymirecError(f"model-versions message is not JSON: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("version"), str) or not VERSION.match(value["version"]):
        raise HymirecError(f"model-versions message without a valid version: {str(value)[:200]}")
    return value
