"""Where a store lives: a local path or an object-store URL, and which engine serves it.

A URL is never taken for a local path: ``"s3://bucket/run"`` is object storage, and a
scheme this module does not know (``"http://..."``, ``"s3:bucket"``) is a `ValueError`,
never a folder named ``s3:`` in the current directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Engines: ``"directory"`` (format 2, a local directory; today's default for local
#: paths) and ``"icechunk"`` (transactional: local disk or object storage, with history).
ENGINES = ("directory", "icechunk")

#: URL schemes of the object stores the Icechunk engine speaks to.
OBJECT_STORE_SCHEMES = ("s3", "gs", "az")

#: The keys ``storage_options`` may hold, per scheme (passed to Icechunk's storage
#: constructors; credentials default to the environment, as the cloud SDKs do).
STORAGE_OPTIONS: dict[str, tuple[str, ...]] = {
    "s3": (
        "region",
        "endpoint_url",
        "allow_http",
        "access_key_id",
        "secret_access_key",
        "session_token",
        "anonymous",
        "force_path_style",
        "requester_pays",
    ),
    "gs": (
        "service_account_file",
        "service_account_key",
        "application_credentials",
        "bearer_token",
        "anonymous",
    ),
    "az": ("account", "access_key", "sas_token", "bearer_token"),
}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The ``storage_options`` that are booleans (the others are strings).
_BOOL_OPTIONS = frozenset({"allow_http", "anonymous", "force_path_style", "requester_pays"})


@dataclass(frozen=True)
class Location:
    """A parsed store location.

    Attributes:
        text: the location as given (for messages).
        scheme: ``"file"`` for a local path, else the object store's scheme.
        path: the local directory (``scheme == "file"``), else None.
        bucket: the bucket (container for ``az``), for object storage.
        prefix: the key prefix inside the bucket ('' for the bucket's root).
        options: the checked ``storage_options``.
        engine: ``"directory"`` or ``"icechunk"``.
    """

    text: str
    scheme: str
    path: Path | None
    bucket: str = ""
    prefix: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    engine: str = "directory"

    @property
    def is_local(self) -> bool:
        """True for a directory on this machine's file system."""
        return self.path is not None

    def __str__(self) -> str:
        return self.text


def parse(
    location: str | os.PathLike[str],
    *,
    engine: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Location:
    """Parse ``location`` and pick its engine.

    Args:
        location: a local path (``str`` or ``os.PathLike``), ``file:///abs/path``, or
            ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``az://container/prefix``.
        engine: None (a local path: ``"directory"``; a URL: ``"icechunk"``), or one of
            `ENGINES`. Object storage needs ``"icechunk"``.
        storage_options: for object storage: endpoint, region, credentials (see
            `STORAGE_OPTIONS`); refused for a local path.

    Raises:
        ValueError: an unsupported scheme, a scheme without ``//`` (``s3:bucket``), a URL
            without a bucket or with a query, ``.``, ``..`` or ``//`` in the prefix, a
            path object whose text is a URL (pathlib collapses ``//``), an unknown engine,
            or an option that does not apply or has the wrong type.
        TypeError: ``location`` is neither a string nor a path (bytes included), or
            ``storage_options`` is not a mapping with str keys.
    """
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or None, got {engine!r}")
    options = _options(storage_options)
    if isinstance(location, os.PathLike):
        text = os.fspath(location)
        if not isinstance(text, str):
            raise TypeError(f"location must be a str path or URL, got bytes {text!r}")
        if _looks_like_url(text):
            # Path("s3://bucket/run") is "s3:/bucket/run": pathlib collapses the '//'.
            raise ValueError(
                f"location {text!r} is a path object whose text starts like a URL "
                f"({text.split(':', 1)[0]}:): pass an object-store URL as a str "
                "(pathlib turns 's3://b/p' into 's3:/b/p'), or write ./ before a directory "
                "whose name holds ':'"
            )
        return _local(text, Path(text), engine, options)
    if not isinstance(location, str):
        raise TypeError(
            f"location must be a path (str or os.PathLike) or a URL, got {type(location).__name__}"
        )
    if not location.strip():
        raise ValueError(
            f"location is empty ({location!r}): give a directory or a URL such as s3://bucket/run"
        )
    if location != location.lstrip() and _looks_like_url(location.lstrip()):
        raise ValueError(
            f"location {location!r} starts with whitespace before a URL: remove it (a URL "
            "is never taken for a local path)"
        )
    match = _SCHEME.match(location)
    if match is None or (len(match.group(1)) == 1 and os.name == "nt"):  # C:\ on Windows
        return _local(location, Path(location), engine, options)
    scheme = match.group(1).lower()
    rest = location[match.end() :]
    if not rest.startswith("//"):
        raise ValueError(
            f"location {location!r} looks like a URL with the scheme {scheme!r} but has no "
            f"'//' (did you mean {scheme}://{rest}?); a URL is never taken for a local path: "
            "write ./" + location + " for a directory of that name"
        )
    if scheme == "file":
        path = rest[2:]
        if not path.startswith("/"):
            raise ValueError(f"location {location!r}: a file:// URL needs an absolute path")
        return _local(location, Path(path), engine, options)
    if scheme not in OBJECT_STORE_SCHEMES:
        raise ValueError(
            f"location {location!r} has the unsupported scheme {scheme!r}: xpoptim stores "
            f"live in a local directory, file:///path, or "
            f"{', '.join(s + '://bucket/prefix' for s in OBJECT_STORE_SCHEMES)}"
        )
    if engine == "directory":
        raise ValueError(
            f"engine='directory' keeps a store in a local directory; {location!r} is object "
            "storage: use engine='icechunk' (the default for URLs)"
        )
    if "?" in rest or "#" in rest:
        raise ValueError(
            f"location {location!r} holds a URL query or fragment ('?' or '#'): give "
            f"{scheme}://bucket/prefix, and endpoint, region or credentials in storage_options"
        )
    bucket, _, prefix = rest[2:].partition("/")
    if not bucket:
        raise ValueError(f"location {location!r} names no bucket ({scheme}://BUCKET/prefix)")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(
            f"location {location!r}: {bucket!r} is not a bucket name (letters, digits, '.', "
            "'-', '_'; an endpoint such as host:port goes in storage_options['endpoint_url'])"
        )
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"location {location!r}: the prefix {prefix!r} may not hold '.', '..' or an empty "
            "segment ('//')"
        )
    prefix = "/".join(parts)
    allowed = STORAGE_OPTIONS[scheme]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"storage_options {unknown} do not apply to {scheme}:// locations; "
            f"allowed: {', '.join(allowed)}"
        )
    for key in sorted(set(options) & _BOOL_OPTIONS):
        if not isinstance(options[key], bool):
            raise ValueError(
                f"storage_options[{key!r}] must be True or False, got {options[key]!r}"
            )
    for key in sorted(set(options) - _BOOL_OPTIONS):
        if not isinstance(options[key], str) or not options[key]:
            raise ValueError(
                f"storage_options[{key!r}] must be a non-empty str, got {options[key]!r}"
            )
    keys = {"access_key_id", "secret_access_key"}
    if len(keys & set(options)) == 1:
        (given,) = keys & set(options)
        (missing,) = keys - set(options)
        raise ValueError(
            f"storage_options give {given!r} without {missing!r}: give both, or neither "
            "(credentials from the environment)"
        )
    if scheme == "az" and "account" not in options:
        raise ValueError("storage_options must give 'account' (the storage account) for az://")
    return Location(location, scheme, None, bucket, prefix, options, "icechunk")


def _options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` as a dict, checked to be a mapping with str keys."""
    if storage_options is None:
        return {}
    if not isinstance(storage_options, Mapping):
        raise TypeError(
            f"storage_options must be a dict (or None), got {type(storage_options).__name__}"
        )
    options = dict(storage_options)
    bad = [key for key in options if not isinstance(key, str)]
    if bad:
        raise TypeError(f"storage_options keys must be str, got {bad!r}")
    return options


def _looks_like_url(text: str) -> bool:
    """Whether ``text`` starts with a URL scheme (``s3:``, ``http:``), not a Windows drive."""
    match = _SCHEME.match(text)
    return match is not None and not (len(match.group(1)) == 1 and os.name == "nt")


def _local(text: str, path: Path, engine: str | None, options: Mapping[str, Any]) -> Location:
    if options:
        raise ValueError(
            f"storage_options {sorted(options)} apply to object storage only, not to the "
            f"local path {text!r}"
        )
    return Location(text, "file", path, engine=engine or "directory")
