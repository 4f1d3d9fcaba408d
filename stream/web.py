"""What the worker's web views share: the optional bearer token (``settings.http_token``)."""

from __future__ import annotations

import hmac

from pydantic import SecretStr


def authorized(headers, token: SecretStr) -> bool:
    """True when no token is set, or the request's ``Authorization: Bearer …`` carries it."""
    expected = token.get_secret_value()
    if not expected:
        return True
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


def unauthorized(web):
    """The 401 answer (JSON, with the challenge a client needs)."""
    return web.json({"error": "a bearer token is required (Authorization: Bearer <HYMIREC_HTTP_TOKEN>)"},
                    status=401, headers={"WWW-Authenticate": "Bearer"})
