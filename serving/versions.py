"""Model version names (``v0001``…) and the ``model-versions`` message that announces one.

The trainer builds the message (``version_message``), the worker's serving agent parses it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hymirec.errors import HymirecError

VERSION = re.compile(r"^v(\d{4,})$")


def version_number(version: str | None) -> int:
    """``v0012`` -> 12; anything else -> 0 (older than every version)."""
    match = VERSION.match(version or "")
    return int(match[1]) if match else 0


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
