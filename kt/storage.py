"""Storage by URL: local paths and fsspec filesystems (`s3://`, `gs://`), opened in the process that uses them.

Every stage takes its shards and stores by URL. Three things are the same for all of them, and live here:

- **Opened where used.** An fsspec filesystem object belongs to the process that made it: s3fs and gcsfs run an
  event loop and hold HTTP sessions that a forked child cannot use ("This class is not fork-safe"), and a
  DataLoader worker is such a child. So no stage hands a filesystem (or a zarr store over one) to a worker:
  `PerProcess` makes a handle again in every process that asks for it, and fsspec's own instance cache, which
  it clears in a new process, makes that cheap. A handle pickled for a spawned worker is reopened there too.
- **The protocol's package.** s3fs (`pip install 'kt[s3]'`) and gcsfs are optional; a URL whose package is
  missing is one line naming what to install, not fsspec's ImportError.
- **What an object store refuses.** A missing bucket, an unknown key or a wrong secret, a policy that denies the
  bucket: s3fs raises FileNotFoundError or PermissionError with the server's code behind it (`__cause__`);
  `storage_error` turns them into one line naming the bucket and what to check. Credentials and the endpoint
  come from where boto finds them (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE,
  ~/.aws), or from fsspec's configuration (FSSPEC_S3_ENDPOINT_URL, ...): nothing kt-specific.
"""

from __future__ import annotations

import os
from typing import Callable, Generic, TypeVar
from urllib.parse import urlsplit

from kt.errors import UserError, one_line

T = TypeVar("T")

#: protocol -> what to install for it (the extra where kt declares one)
PROTOCOL_PACKAGES = {"s3": "pip install 'kt[s3]'", "s3a": "pip install 'kt[s3]'", "gs": "pip install gcsfs",
                     "gcs": "pip install gcsfs", "az": "pip install adlfs", "abfs": "pip install adlfs"}

#: protocols whose first path component is a bucket (a missing one is named as such)
BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs"}

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "ExpiredToken",
           "InvalidToken", "403"}


def protocol(url: str) -> str:
    return urlsplit(str(url)).scheme if "://" in str(url) else "file"


def filesystem(url: str, storage_options: dict | None = None, doing: str = "open"):
    """(fsspec filesystem, path on it) for `url`; a missing protocol package or an unknown protocol is a
    one-line `UserError` ("cannot `doing` URL: ...") naming what to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except ImportError as e:
        raise UserError(missing_package(url, e, doing)) from None
    except ValueError as e:  # fsspec: "Protocol not known: x"
        raise UserError(f"cannot {doing} {url}: {one_line(e)}") from None


def missing_package(url: str, error: ImportError, doing: str = "open") -> str:
    proto = protocol(url)
    install = PROTOCOL_PACKAGES.get(proto)
    return (f"cannot {doing} {url}: {proto}:// needs a package that is not installed"
            + (f" ({install})" if install else f" ({one_line(error)})"))


def error_code(error: BaseException) -> str | None:
    """The object store's error code behind an OSError from s3fs (its `__cause__` is botocore's ClientError)."""
    for e in (error, error.__cause__, error.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code") or "") or None
    return None


def bucket_of(url: str) -> str | None:
    """The bucket of an object-store URL (s3://bucket/key -> bucket), None for other URLs and paths."""
    return urlsplit(str(url)).netloc if protocol(url) in BUCKET_PROTOCOLS else None


def storage_error(url: str, error: BaseException, doing: str = "open") -> UserError:
    """One line for what a store refused while `doing` something with `url` (see the module docstring)."""
    code = error_code(error)
    if isinstance(error, ImportError):
        return UserError(missing_package(url, error, doing))
    missing = isinstance(error, FileNotFoundError) and bucket_of(url) and not _bucket_exists(url)
    if code == "NoSuchBucket" or missing:
        return UserError(f"cannot {doing} {url}: bucket {bucket_of(url)!r} does not exist (create it, or check the URL "
                         "and the endpoint: AWS_ENDPOINT_URL)")
    if isinstance(error, FileNotFoundError):
        return UserError(f"cannot {doing} {url}: not found")
    if isinstance(error, PermissionError) or code in _DENIED:
        # a HEAD's refusal has no body: its code is "403", whatever the reason
        why = {"InvalidAccessKeyId": ": the access key is not known to the endpoint",
               "SignatureDoesNotMatch": ": the secret key does not match the access key"}.get(code or "", "")
        return UserError(f"cannot {doing} {url}: access denied ({code or one_line(error)}{why}); check the credentials "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and the bucket's policy")
    return UserError(f"cannot {doing} {url}: {type(error).__name__}: {one_line(error)}")


def _bucket_exists(url: str) -> bool:
    """False only when the store says the bucket is not there (asked on a failure path: a HEAD of a missing object
    does not say whether its bucket exists)."""
    try:
        fs, _ = filesystem(url)
        fs.info(bucket_of(url))
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 -- denied, unreachable: not known to be missing
        return True
    return True


class PerProcess(Generic[T]):
    """A value made by `factory()` in each process that uses it: a forked child (a DataLoader worker) makes its own
    on first use instead of using its parent's; pickled (a spawned worker), it is made again where it lands.

    `value` may be given for the process that creates the holder (made there already, e.g. while checking that
    a store opens)."""

    def __init__(self, factory: Callable[[], T], value: T | None = None):
        self._factory = factory
        self._pid, self._value = (os.getpid(), value) if value is not None else (None, None)

    def get(self) -> T:
        if self._pid != os.getpid():
            self._value, self._pid = self._factory(), os.getpid()
        return self._value

    def __getstate__(self) -> dict:
        return {"_factory": self._factory, "_pid": None, "_value": None}
