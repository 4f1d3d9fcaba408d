"""store.ModelRegistry: versioned, checksummed artefacts under a real LanceDB directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hymirec.errors import HymirecError
from store import CorruptArtifact, ModelRegistry, Store
from store.schemas import REGISTRY

WEIGHTS = os.urandom(4096)
CONFIG = json.dumps({"dim": 64, "levels": 4}).encode()


@pytest.fixture
def registry(db_settings) -> ModelRegistry:
    return ModelRegistry(db_settings)


@pytest.fixture
def two_versions(registry):
    v1 = registry.publish({"weights.safetensors": WEIGHTS, "config.json": CONFIG}, {"model": "hymirec", "recall@10": 0.2})
    v2 = registry.publish({"weights.safetensors": WEIGHTS[::-1], "config.json": CONFIG}, {"model": "hymirec"}, parent=v1.version)
    return v1, v2


def test_empty_registry(registry):
    assert registry.latest() is None and registry.list() == []
    with pytest.raises(HymirecError, match="no model version 'v0001'"):
        registry.load("v0001")


def test_publish_chain_and_latest(registry, two_versions, db_settings):
    v1, v2 = two_versions
    assert (v1.version, v1.parent) == ("v0001", None)
    assert (v2.version, v2.parent) == ("v0002", "v0001")
    assert registry.latest() == v2
    assert [v.version for v in registry.list()] == ["v0001", "v0002"]
    assert registry.get("v0001") == v1
    assert Path(v2.path) == Path(db_settings.lancedb_uri).resolve() / "models" / "v0002"
    assert sorted(p.name for p in Path(v2.path).iterdir()) == ["config.json", "manifest.json", "weights.safetensors"]
    assert Store(db_settings).table_counts()[REGISTRY] == 2


def test_manifest_records_every_file(two_versions):
    v1, _ = two_versions
    files = v1.manifest["files"]
    assert files["weights.safetensors"] == {"sha256": hashlib.sha256(WEIGHTS).hexdigest(), "bytes": len(WEIGHTS)}
    assert files["config.json"]["sha256"] == hashlib.sha256(CONFIG).hexdigest()
    assert v1.manifest["model"] == "hymirec" and v1.manifest["recall@10"] == 0.2
    assert v1.manifest["version"] == "v0001" and v1.manifest["parent"] is None and v1.manifest["created_at"]
    on_disk = json.loads((Path(v1.path) / "manifest.json").read_text())
    assert on_disk == v1.manifest


def test_load_verifies_and_returns_every_file(registry, two_versions):
    _, v2 = two_versions
    manifest, files = registry.load("v0002")
    assert manifest == v2.manifest
    assert files == {"weights.safetensors": WEIGHTS[::-1], "config.json": CONFIG}


def test_load_from_a_fresh_registry_object(two_versions, db_settings):
    manifest, files = ModelRegistry(db_settings).load("v0001")
    assert files["weights.safetensors"] == WEIGHTS and manifest["parent"] is None


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "weights.safetensors has 4095 bytes"),
        (lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]), "weights.safetensors does not match"),
        (lambda p: p.unlink(), "weights.safetensors is missing"),
    ],
    ids=["truncated", "tampered", "missing"],
)
def test_damaged_file_raises_and_spares_other_versions(registry, two_versions, damage, message):
    v1, v2 = two_versions
    damage(Path(v2.path) / "weights.safetensors")
    with pytest.raises(CorruptArtifact, match=f"v0002: {message}"):
        registry.load("v0002")
    assert registry.load("v0001")[1]["weights.safetensors"] == WEIGHTS


def test_manifest_rewritten_to_match_a_changed_file_raises(registry, two_versions):
    # Changing a file and its manifest entry together is caught by the manifest's sha256 in the row.
    _, v2 = two_versions
    folder = Path(v2.path)
    (folder / "config.json").write_bytes(b"{}")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["config.json"] = {"sha256": hashlib.sha256(b"{}").hexdigest(), "bytes": 2}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(CorruptArtifact, match="v0002: manifest.json does not match"):
        registry.load("v0002")
    (folder / "manifest.json").unlink()
    with pytest.raises(CorruptArtifact, match="v0002: manifest.json is missing"):
        registry.load("v0002")


def test_orphan_folder_is_skipped_not_reused(registry, two_versions, db_settings):
    # A publish that died after writing its folder but before its row: invisible, number not reused.
    orphan = Path(db_settings.lancedb_uri).resolve() / "models" / "v0003"
    orphan.mkdir()
    (orphan / "weights.safetensors").write_bytes(b"partial")
    assert registry.latest().version == "v0002"
    v = registry.publish({"w": b"x"}, {}, parent="v0002")
    assert v.version == "v0004" and registry.load("v0004")[1] == {"w": b"x"}
    assert (orphan / "weights.safetensors").read_bytes() == b"partial"


def test_publish_rejects_bad_input_and_writes_nothing(registry, db_settings):
    for files, manifest, parent, message in [
        ({"../escape": b"x"}, {}, None, "bad artefact file name"),
        ({"manifest.json": b"x"}, {}, None, "bad artefact file name"),
        ({"a/b": b"x"}, {}, None, "bad artefact file name"),
        ({"w": "not bytes"}, {}, None, "must be bytes"),
        ({"w": b"x"}, {"when": object()}, None, "not JSON-serialisable"),
        ({"w": b"x"}, {}, "v0009", "parent model version 'v0009'"),
    ]:
        with pytest.raises(HymirecError, match=message):
            registry.publish(files, manifest, parent)
    assert registry.list() == []
    models = Path(db_settings.lancedb_uri).resolve() / "models"
    assert not models.exists() or list(models.iterdir()) == []
