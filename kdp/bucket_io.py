"""The small pieces of talking to a bucket: the names and URIs kdp accepts, which errors may
pass (and are retried) and how each is said in one line, and local writes that name themselves."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from kdp.errors import StorageError

SCHEMES = ("s3",)
MANIFEST = ".kdp-manifest.json"
VERSIONS = ".kdp-v"  # <dir>/.kdp-v/<version>/<file>: a directory artifact's immutable versions
CHUNK = 8 << 20
COMMIT_MAX = 8 << 20  # a commit read from the bucket larger than this is refused (a listing of files, not data)
GRACE_S = 3600.0  # an uncommitted version younger than this may be a writer's upload under way
TIMEOUT_S = 30.0  # KDP_STORE_TIMEOUT_S: a request with no byte moved for this long fails (then is retried)
RETRY_S = 120.0  # KDP_STORE_RETRY_S: how long a store call is retried (a store restart of a minute)
TRANSIENT = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Connection refused", "curlCode",
             "Timeout", "timed out", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "INTERNAL_FAILURE", "REQUEST_TIMEOUT",
             "Throttl", "Connection reset")
LOCAL_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)


class Broken(StorageError):
    """A directory artifact's commit that cannot be used as it is: corrupt, too large, naming a
    file outside its directory, or files gone or failing their sha256 (kdp.bucket_dirs)."""


def check_uri(uri: str) -> None:
    """Refuse a URI that carries credentials (`s3://key:secret@bucket/...`, whatever the secret
    holds, `/` included) in one line that does not echo the secret: kdp would keep the URI in
    configs, events and logs. A bucket name holds no `:` and no `@`, so a `:` before the first
    `@` in the bucket's segment, or an `@` before any `/`, is userinfo."""
    scheme, _, rest = str(uri).partition("://")
    before, at, after = rest.partition("@")
    if at and ("/" not in before or ":" in before.split("/", 1)[0]):
        user = before.split(":", 1)[0] + ":" if ":" in before else ""
        raise StorageError(f"{scheme}://{user}***@{after}: credentials in a URI are refused (kdp would record "
                           "the URI); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or use an "
                           "instance role")


def inside(base: Path, name: str, where: str) -> Path:
    """base / name, refused in one line unless it stays inside base (a name from the bucket)."""
    if not isinstance(name, str) or "\0" in name:
        raise StorageError(f"{where}: refused the name {name!r} from the bucket: not a file name")
    dest = (Path(base) / name).resolve()
    if not name or Path(name).is_absolute() or not dest.is_relative_to(Path(base).resolve()) or dest == Path(
            base).resolve():
        raise StorageError(f"{where}: refused the name {name!r} from the bucket: it does not stay inside {base}")
    return dest


def scratch() -> Path:
    """This node's scratch: KDP_SCRATCH, else ~/.cache/kdp/mirror."""
    return Path(os.environ.get("KDP_SCRATCH") or Path.home() / ".cache" / "kdp" / "mirror")


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"


def transient(e: OSError) -> bool:
    """May this error pass (the store unreachable, slow, restarting or throttling)?"""
    msg = str(e)
    return any(t in msg for t in TRANSIENT) or re.search(r"(response code|status code|HTTP)\D{0,4}5\d\d\b", msg) \
        is not None


def why(e: OSError) -> str:
    """One line from pyarrow's S3 error: unreachable endpoint, credentials refused, or as said."""
    msg = str(e)
    if "NETWORK_CONNECTION" in msg or "Could not connect" in msg or "Could not resolve" in msg:
        return f"cannot reach the endpoint {endpoint()}"
    if any(t in msg for t in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")) or \
            re.search(r"(response code|status code|HTTP)\D{0,4}403\b", msg):
        return ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or the instance role)")
    return msg.splitlines()[0] if msg else type(e).__name__


class local_write:
    """open(path, 'wb') whose failures (disk full, no permission) name the local file, so that
    they are never taken for the bucket's."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.f = open(self.path, "wb")
        except OSError as e:
            raise self._error(e) from None
        return self

    def write(self, data) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e: OSError) -> Exception:
        if e.errno in LOCAL_FULL:
            return StorageError(f"{self.path.parent}: cannot write this node's copy ({e.strerror})")
        return e

    def __exit__(self, *exc):
        try:
            self.f.close()
        except OSError as e:
            raise self._error(e) from None
