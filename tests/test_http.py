"""The worker's web views against a real worker (real broker, LanceDB): the optional bearer token on
GET /recommend and /metrics, /health left open, and bad requests answered 4xx with a JSON reason."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydantic import SecretStr

from hymirec.procs import faust_worker, settings_env
from hymirec.settings import Settings

from helpers import private_worker

TOKEN = "s3cret-token"


def get(settings: Settings, path: str, token: str | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(f"http://{settings.web_host}:{settings.web_port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read().decode()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def test_settings_never_print_the_token_but_hand_it_to_a_worker():
    settings = Settings(http_token=SecretStr(TOKEN))
    assert TOKEN not in str(settings) and TOKEN not in repr(settings.http_token)
    assert settings_env(settings)["HYMIREC_HTTP_TOKEN"] == TOKEN


@pytest.mark.broker
def test_token_guards_recommend_and_metrics_and_bad_requests_get_4xx(topic_settings: Settings, tmp_path: Path):
    s = private_worker(topic_settings, tmp_path, http_token=SecretStr(TOKEN))
    with faust_worker(s, tmp_path / "worker.log"):
        assert get(s, "/health")[0] == 200  # liveness stays open
        for path in ("/metrics", "/recommend/u1?k=5"):
            for token in (None, "wrong", ""):
                status, body = get(s, path, token)
                assert status == 401 and "bearer token" in body["error"], (path, token)
        assert get(s, "/metrics", TOKEN)[0] == 200
        status, body = get(s, "/recommend/u1?k=5", TOKEN)
        assert status == 200 and body["user_id"] == "u1" and "popular" in body["fallback"], body
        for path in ("/recommend/u1?k=0", "/recommend/u1?k=1001", "/recommend/u1?k=ten", f"/recommend/{'u' * 300}"):
            status, body = get(s, path, TOKEN)
            assert status == 400 and body["error"], path
