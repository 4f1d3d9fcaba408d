"""Model registry: immutable, checksummed model versions next to the LanceDB tables.

A version ``vNNNN`` is a folder ``{lancedb_uri}/models/vNNNN/`` holding the artefact files and a
``manifest.json`` (the caller's metadata plus version, parent, created_at and the sha256 and size
of every file), and a row in the ``model_registry`` table. Publishing writes the folder first and
inserts the row last: the row is the commit point, so a crash in between leaves an orphan folder
that no reader sees (its version number is skipped, never reused).

On a local directory the folder is written under a temporary name and renamed into place, so it
appears whole. Object stores have no rename: there the files are written in place (manifest last)
and the row still decides. One publisher (the trainer) at a time.

``load`` verifies the manifest against the row's sha256 and every file against the manifest; any
missing, truncated or altered byte raises ``CorruptArtifact`` naming the file, and nothing is
returned half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from store.objectstore import artefact_filesystem
from store.schemas import REGISTRY, registry_schema
from store.tables import connect, merge, open_table, to_arrow

MANIFEST = "manifest.json"
PUBLISHED = "published"
VERSION = re.compile(r"^v(\d{4,})$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class CorruptArtifact(HymirecError):
    """A stored model version does not match its checksums (missing, truncated or altered file)."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    parent: str | None
    path: str  # the artefact folder: a local path or an object-store URI
    manifest: dict[str, Any]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_number(version: str | None) -> int:
    """``v0012`` -> 12; anything else -> 0 (older than every version)."""
    match = VERSION.match(version or "")
    return int(match[1]) if match else 0


class ModelRegistry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = connect(settings)
        self.fs, root = artefact_filesystem(settings)
        self.root = root + "/models"
        self._uri_prefix = (settings.lancedb_uri.rstrip("/") if settings.lancedb_is_remote else root) + "/models"

    # --- reading --------------------------------------------------------------------------------
    def list(self) -> list[ModelVersion]:
        """Every published version, oldest first."""
        rows = self._rows()
        rows.sort(key=lambda row: version_number(row["version"]))
        return [self._model_version(row) for row in rows if row["status"] == PUBLISHED]

    def latest(self) -> ModelVersion | None:
        versions = self.list()
        return versions[-1] if versions else None

    def get(self, version: str) -> ModelVersion:
        return self._model_version(self._row(version))

    def load(self, version: str) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(manifest, {file name: bytes}) of ``version``, every byte verified; raises CorruptArtifact."""
        row = self._row(version)
        raw = self._read(version, MANIFEST)
        if _sha256(raw) != row["manifest_sha256"]:
            raise CorruptArtifact(f"model {version}: {MANIFEST} does not match the sha256 recorded in the registry")
        manifest = json.loads(raw)
        files = {}
        for name, meta in manifest["files"].items():
            data = self._read(version, name)
            if len(data) != meta["bytes"]:
                raise CorruptArtifact(f"model {version}: {name} has {len(data)} bytes, manifest says {meta['bytes']}")
            if _sha256(data) != meta["sha256"]:
                raise CorruptArtifact(f"model {version}: {name} does not match its sha256 in the manifest")
            files[name] = data
        return manifest, files

    # --- writing --------------------------------------------------------------------------------
    def publish(self, files: dict[str, bytes], manifest: dict[str, Any], parent: str | None = None) -> ModelVersion:
        """Store ``files`` as the next version (v0001, v0002, …) and commit it to the registry.

        ``manifest`` is the caller's metadata (JSON-serialisable); publish sets its ``version``,
        ``parent``, ``created_at`` and ``files`` ({name: {"sha256", "bytes"}}) keys.
        """
        for name, data in files.items():
            if not _FILE_NAME.match(name) or name == MANIFEST:
                raise HymirecError(f"bad artefact file name {name!r}: use letters, digits, '.', '_', '-'")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise HymirecError(f"artefact {name!r} must be bytes, got {type(data).__name__}")
        rows = self._rows()
        if parent is not None and parent not in {row["version"] for row in rows}:
            raise HymirecError(f"parent model version {parent!r} is not in the registry")
        version = f"v{self._next_number(rows):04d}"
        created_at = datetime.now(timezone.utc)
        manifest = {
            **manifest,
            "version": version,
            "parent": parent,
            "created_at": created_at.isoformat(timespec="milliseconds"),
            "files": {name: {"sha256": _sha256(bytes(data)), "bytes": len(data)} for name, data in files.items()},
        }
        try:
            manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise HymirecError(f"model manifest is not JSON-serialisable: {exc}") from None

        folder = f"{self.root}/{version}"
        self._write_folder(folder, {**files, MANIFEST: manifest_bytes})
        artifact_uri = f"{self._uri_prefix}/{version}"
        row = {
            "version": version,
            "parent": parent,
            "created_at": created_at,
            "artifact_uri": artifact_uri,
            "manifest_sha256": _sha256(manifest_bytes),
            "manifest": manifest_bytes.decode("utf-8"),
            "status": PUBLISHED,
        }
        result = merge(self._table(), "version", to_arrow([row], registry_schema(), REGISTRY), update=False)
        if result.num_inserted_rows != 1:
            raise HymirecError(f"model version {version} was published concurrently by another process")
        return ModelVersion(version, parent, artifact_uri, manifest)

    # --- internals ------------------------------------------------------------------------------
    def _table(self):
        return open_table(self.db, REGISTRY, registry_schema(), create=True)

    def _rows(self) -> list[dict[str, Any]]:
        table = open_table(self.db, REGISTRY, registry_schema(), create=False)
        return table.to_arrow().to_pylist() if table is not None else []

    def _row(self, version: str) -> dict[str, Any]:
        for row in self._rows():
            if row["version"] == version:
                return row
        raise HymirecError(f"no model version {version!r} in the registry at {self.settings.lancedb_uri}")

    def _model_version(self, row: dict[str, Any]) -> ModelVersion:
        # The folder is found from the current lancedb_uri, so a copied or moved store still loads;
        # the row's artifact_uri records where it was published.
        path = f"{self._uri_prefix}/{row['version']}"
        return ModelVersion(row["version"], row["parent"], path, json.loads(row["manifest"]))

    def _next_number(self, rows: list[dict[str, Any]]) -> int:
        # Orphan folders (a publish that died before its row) count too: their names stay unused.
        listed = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        names = [row["version"] for row in rows] + [info.base_name for info in listed]
        return max(map(version_number, names), default=0) + 1

    def _write_folder(self, folder: str, files: dict[str, bytes]) -> None:
        local = isinstance(self.fs, pafs.LocalFileSystem)
        target = f"{self.root}/.tmp-{uuid.uuid4().hex}" if local else folder
        self.fs.create_dir(target, recursive=True)
        try:
            # manifest.json is last in `files`: on object stores a folder without one is incomplete.
            for name, data in files.items():
                with self.fs.open_output_stream(f"{target}/{name}") as out:
                    out.write(data)
            if local:
                if self.fs.get_file_info(folder).type != pafs.FileType.NotFound:
                    raise HymirecError(f"model folder {folder} already exists")
                self.fs.move(target, folder)
        except BaseException:
            self.fs.delete_dir(target)
            raise

    def _read(self, version: str, name: str) -> bytes:
        folder = f"{self.root}/{version}"
        try:
            with self.fs.open_input_stream(f"{folder}/{name}") as stream:
                return stream.read()
        except FileNotFoundError:
            raise CorruptArtifact(f"model {version}: {name} is missing from {folder}") from None
