"""docker-compose.yml and the Dockerfile name the project's real commands and settings.

There is no Docker engine here, so the file is checked statically: every HYMIREC_* variable is a
Settings field that accepts the value given, every `hymirec` command parses with the real CLI
parser, and `faust -A MODULE` names a module that defines the Faust app.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from hymirec.cli import build_parser
from hymirec.settings import Settings
from store.s3server import VERSITYGW_VERSION

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = {name: svc for name, svc in SERVICES.items() if "build" in svc}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_kafka_service_is_official_image_in_kraft_mode():
    kafka = SERVICES["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert int(kafka["image"].split(":")[1].split(".")[0]) >= 4
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert any("kafka:" in listener for listener in advertised), "no internal listener"
    assert any("localhost:" in listener for listener in advertised), "no host listener"


def test_project_services_exist():
    assert {"worker", "trainer", "bucket"} <= set(APP_SERVICES)


def _interpolated(value: str) -> str:
    """The default compose substitutes for ``${VAR:-default}`` (or ``${VAR:?...}``: the variable itself)."""
    match = re.fullmatch(r"\$\{(\w+)(?::-(.*)|:\?.*)\}", value)
    if not match:
        return value
    return match[2] if match[2] is not None else f"<{match[1]}>"


def test_object_store_is_the_projects_s3_server_with_the_apps_credentials():
    s3 = SERVICES["s3"]
    image, tag = s3["image"].split(":")
    assert image == "versity/versitygw" and tag == VERSITYGW_VERSION  # the server `hymirec s3` runs and tests
    command = s3["command"]
    port = command[command.index("--port") + 1].rsplit(":", 1)[1]
    assert command[command.index("--health") + 1] in " ".join(s3["healthcheck"]["test"])
    assert [v for v in s3.get("volumes", []) if v.endswith(":" + command[command.index("posix") + 1])], "buckets not on a volume"
    server = {k: _interpolated(v) for k, v in _env(s3).items()}
    for name, service in APP_SERVICES.items():
        settings = Settings(**{k.removeprefix("HYMIREC_").lower(): _interpolated(v)
                               for k, v in _env(service).items() if k.startswith("HYMIREC_")})
        assert settings.lancedb_uri.startswith("s3://"), f"{name} keeps LanceDB outside the object store"
        assert settings.s3_endpoint == f"http://{s3['hostname']}:{port}", name
        assert settings.s3_access_key_id == server["ROOT_ACCESS_KEY_ID"], name
        assert settings.s3_secret_access_key.get_secret_value() == server["ROOT_SECRET_ACCESS_KEY"], name
    assert server["ROOT_SECRET_ACCESS_KEY"] == "<HYMIREC_S3_SECRET_ACCESS_KEY>", "a default secret in the repository"


def test_workers_scale_out():
    """`docker compose up --scale worker=3`: no volume shared by the app services (state is on s3://),
    and no single fixed host port for the worker (replicas each take one of a range)."""
    for name, service in APP_SERVICES.items():
        assert not service.get("volumes"), f"{name} mounts {service['volumes']}"
    for mapping in SERVICES["worker"].get("ports", []):
        host_port = str(mapping).rsplit(":", 1)[0].rsplit(":", 1)[-1]
        assert "-" in host_port, f"worker publishes one fixed host port: {mapping}"
    assert "lancedb" not in (COMPOSE.get("volumes") or {})


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_env_names_are_settings(name):
    env = _env(APP_SERVICES[name])
    fields = set(Settings.model_fields)
    hymirec_env = {k: v for k, v in env.items() if k.startswith("HYMIREC_")}
    assert hymirec_env, f"{name} sets no HYMIREC_* variable"
    for key in hymirec_env:
        assert key.removeprefix("HYMIREC_").lower() in fields, f"{name}: {key} is not a setting"
    settings = Settings(**{k.removeprefix("HYMIREC_").lower(): _interpolated(v) for k, v in hymirec_env.items()})
    internal = [l for l in _env(SERVICES["kafka"])["KAFKA_ADVERTISED_LISTENERS"].split(",") if "kafka:" in l]
    assert settings.kafka_bootstrap == internal[0].split("://", 1)[1]


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_commands_are_the_projects(name):
    command = APP_SERVICES[name].get("command")
    assert command, f"{name} has no command"
    argv = command if isinstance(command, list) else command.split()
    if argv[0] == "hymirec":
        build_parser().parse_args(argv[1:])  # SystemExit on an unknown command fails the test
    elif argv[0] == "faust":
        module = argv[argv.index("-A") + 1]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        assert "worker" in argv
    else:
        pytest.fail(f"{name} runs {argv[0]!r}, not a project command")


def test_dockerfile_installs_every_package():
    """Every package here is in pyproject's list and copied into the image (`pip install .` installs only what is
    there: a missing one fails only when a command imports it, as `hymirec simulate` did with bench)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({pattern.rstrip("*").rstrip(".") for pattern in include})
    on_disk = {init.parent.name for init in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk <= set(packages), f"packages pyproject does not install: {sorted(on_disk - set(packages))}"
    assert {"hymirec", "stream", "store", "model", "trainer", "bench"} <= set(packages)
    for package in packages:
        if (ROOT / package).is_dir():
            assert f"COPY {package} ./{package}" in dockerfile, f"the image does not copy {package}/"
    assert "stream.app" in dockerfile
