"""How the store reaches ``settings.lancedb_uri`` when it is ``s3://bucket/path``: the same endpoint,
region and credentials for LanceDB's tables and for the registry's artefact files.

Credentials come from the settings (``HYMIREC_S3_*``) when given, else from the AWS credential chain
that both clients read by themselves. The secret leaves the settings object only here, into the
clients' options: never into a log line or a message.

Concurrent commits: lance commits a table version by writing ``_versions/N.manifest`` with a
conditional PUT (``If-None-Match: *``); the server must refuse the second writer of version N (412),
and lance then retries on the newer version. AWS S3 and the local server (``store.s3server``) do.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from hymirec.errors import HymirecError
from hymirec.settings import Settings

S3 = "s3://"
# What S3-compatible servers answer to by default; AWS itself finds a bucket's region without one.
DEFAULT_REGION = "us-east-1"


def is_s3(settings: Settings) -> bool:
    return settings.lancedb_uri.startswith(S3)


def bucket_and_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    bucket, _, prefix = uri.removeprefix(S3).partition("/")
    return bucket, prefix.strip("/")


def region(settings: Settings) -> str:
    """The configured region; on a custom endpoint without one, DEFAULT_REGION."""
    return settings.s3_region or (DEFAULT_REGION if settings.s3_endpoint else "")


def storage_options(settings: Settings) -> dict[str, str]:
    """LanceDB's ``storage_options`` for an s3:// store (object_store's keys); {} for anything else."""
    if not is_s3(settings):
        return {}
    options = {}
    if region(settings):
        options["aws_region"] = region(settings)
    if settings.s3_endpoint:
        options["aws_endpoint"] = settings.s3_endpoint
        if settings.s3_endpoint.startswith("http://"):
            options["allow_http"] = "true"
    if settings.s3_access_key_id:
        options["aws_access_key_id"] = settings.s3_access_key_id
        options["aws_secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
    return options


def s3_filesystem(settings: Settings, *, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
    """A pyarrow filesystem on the settings' S3 endpoint (paths are ``bucket/key``)."""
    endpoint = settings.s3_endpoint
    keys = {}
    if settings.s3_access_key_id:
        keys = {"access_key": settings.s3_access_key_id,
                "secret_key": settings.s3_secret_access_key.get_secret_value()}
    return pafs.S3FileSystem(
        **keys,
        region=region(settings) or None,
        endpoint_override=endpoint or None,
        scheme="http" if endpoint.startswith("http://") else "https",
        allow_bucket_creation=allow_bucket_creation,
    )


def create_bucket(settings: Settings) -> str:
    """Create the bucket ``settings.lancedb_uri`` names on the settings' endpoint (idempotent); its name."""
    if not is_s3(settings):
        raise HymirecError(f"HYMIREC_LANCEDB_URI is {settings.lancedb_uri}: no s3://BUCKET/... to create")
    bucket, _ = bucket_and_prefix(settings.lancedb_uri)
    try:
        s3_filesystem(settings, allow_bucket_creation=True).create_dir(bucket)
    except OSError as exc:
        hint = ""
        if "ACCESS_DENIED" in str(exc):  # a server left running by `hymirec s3 start` keeps its first secret
            hint = (": the server refused HYMIREC_S3_ACCESS_KEY_ID / HYMIREC_S3_SECRET_ACCESS_KEY (a local server "
                    "keeps the keys it was started with: `hymirec s3 stop`, then start it with these)")
        raise HymirecError(f"could not create bucket {bucket!r} on {settings.s3_endpoint or 'AWS'}{hint} ({exc})") from None
    return bucket


def artefact_filesystem(settings: Settings) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) of the folder ``settings.lancedb_uri`` names, for files next to the tables."""
    uri = settings.lancedb_uri
    if is_s3(settings):
        return s3_filesystem(settings), uri.removeprefix(S3).rstrip("/")
    if settings.lancedb_is_remote:  # gs://, az://: pyarrow's own resolution of credentials
        fs, root = pafs.FileSystem.from_uri(uri)
        return fs, root.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())
