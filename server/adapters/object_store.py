"""An object store that holds adapter files for every node (``--adapter-store s3://bucket/prefix``): the protocol the
registry uses (``ObjectStore``) and its S3 implementation (``S3Store``, through boto3, for AWS S3 and S3-compatible
servers: MinIO, Ceph RGW, Cloudflare R2, moto).

boto3 is an optional extra (``pip install -e '.[s3]'``), imported here only, and only when a store is opened.
Credentials come from boto3's own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, the
instance's or pod's IAM role): never from a flag, so they never show up in a process listing or a config file.

Every failure of the store (unreachable, refused, throttled past boto3's retries) is raised as ``StoreUnavailable``
(HTTP 503), with a message that says what was being done.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server.adapters.registry_records import StoreUnavailable

_log = logging.getLogger(__name__)

SCHEME = "s3://"
OBJECTS_DIR = "adapters"  # the registry's objects: <prefix>/adapters/<name>/<uid>/<file> (registry_remote.py)
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 60.0
_MAX_ATTEMPTS = 3  # boto3's "standard" retry mode: throttling and 5xx are retried with backoff
_DELETE_BATCH = 1000  # S3's DeleteObjects limit


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the store's prefix
    size: int
    modified: float  # seconds since the epoch (the store's clock)


class ObjectStore(Protocol):
    """Keys are relative to the store's root (its bucket and prefix); ``url`` names that root."""

    url: str

    def check(self) -> None:
        """Raise StoreUnavailable (with what to fix) unless the store can be listed and written now."""
        ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_file(self, key: str, path: Path) -> None: ...

    def list_objects(self, prefix: str, limit: int | None = None) -> list[StoredObject]:
        """The objects whose key starts with ``prefix`` (at most ``limit``), in key order."""
        ...

    def delete(self, keys: list[str]) -> None: ...


def parse_store_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix"); ValueError naming what is wrong."""
    if not url.startswith(SCHEME):
        raise ValueError(f"{url!r} is not an s3:// URL (the only store supported: s3://bucket or s3://bucket/prefix)")
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket (expected s3://bucket or s3://bucket/prefix)")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"{url!r} has an empty, '.' or '..' part in its prefix")
    return bucket, prefix


def open_store(url: str, endpoint_url: str | None = None) -> "S3Store":
    """The store at ``url``, checked (StoreUnavailable when it cannot be used, with the reason)."""
    bucket, prefix = parse_store_url(url)
    store = S3Store(bucket, prefix, endpoint_url)
    store.check()
    return store


class S3Store:
    """An S3 bucket (and prefix) through boto3's client; thread-safe (boto3 clients are)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise StoreUnavailable(f"--adapter-store needs boto3, which is not installed ({e}); "
                                   "pip install -e '.[s3]'") from None  # fmt: skip
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self.url = f"{SCHEME}{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        config = Config(
            connect_timeout=_CONNECT_TIMEOUT_S,
            read_timeout=_READ_TIMEOUT_S,
            retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
        )
        try:
            self._s3: Any = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        except Exception as e:  # e.g. no region configured for AWS, a malformed endpoint URL
            raise StoreUnavailable(f"cannot set up the S3 client for {self.url}: {e}") from None

    def check(self) -> None:
        where = self.url + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except Exception as e:
            code = _error_code(e)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreUnavailable(f"the bucket of {where} does not exist; create it first") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreUnavailable(f"access to {where} was denied ({code}): check the credentials "
                                       "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the IAM role) and "
                                       "their permissions on the bucket") from None  # fmt: skip
            raise StoreUnavailable(f"cannot reach {where}: {_describe(e)}") from None

    def put_file(self, key: str, path: Path) -> None:
        with _failing(f"upload of {key!r} to {self.url}"):
            self._s3.upload_file(str(path), self.bucket, self._key(key))  # multipart above boto3's threshold

    def get_file(self, key: str, path: Path) -> None:
        with _failing(f"download of {key!r} from {self.url}"):
            self._s3.download_file(self.bucket, self._key(key), str(path))

    def list_objects(self, prefix: str, limit: int | None = None) -> list[StoredObject]:
        found: list[StoredObject] = []
        root = f"{self.prefix}/" if self.prefix else ""
        paging = {"MaxItems": limit} if limit is not None else {}
        with _failing(f"listing {prefix!r} in {self.url}"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix, PaginationConfig=paging
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    found.append(StoredObject(key, int(obj["Size"]), obj["LastModified"].timestamp()))
        return found

    def delete(self, keys: list[str]) -> None:
        with _failing(f"deleting {len(keys)} object(s) from {self.url}"):
            for i in range(0, len(keys), _DELETE_BATCH):
                batch = [{"Key": self._key(k)} for k in keys[i : i + _DELETE_BATCH]]
                answer = self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise RuntimeError(f"{len(answer['Errors'])} not deleted, e.g. {first.get('Key')}: "
                                       f"{first.get('Code')} {first.get('Message')}")  # fmt: skip

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key


@contextmanager
def _failing(what: str) -> Iterator[None]:
    """Any exception of the block as StoreUnavailable naming ``what``."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as e:
        raise StoreUnavailable(f"the adapter store failed: {what}: {_describe(e)}") from e


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _describe(exc: BaseException) -> str:
    code = _error_code(exc)
    return f"{code}: {exc}" if code else f"{type(exc).__name__}: {exc}"
