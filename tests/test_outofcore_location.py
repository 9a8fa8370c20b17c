"""Where an out-of-core store lives: local paths, ``file://`` and object-store URLs.

A URL is never taken for a local path (the issue: ``OutOfCore.create("s3://bucket/run")``
used to create a folder ``s3:`` in the current directory). Every bad location is a
`ValueError` (a `TypeError` for a value of the wrong type) that names ``location``,
``engine`` or ``storage_options`` and the problem, from `location.parse` and from the
public `OutOfCore.create`/`open`, with nothing written anywhere. The tests that reach the
object store run against the real S3 server of ``tests/s3server.py`` (moto on 127.0.0.1).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest

import xpoptim
from xpoptim._outofcore.location import ENGINES, Location, parse

S3 = {
    "endpoint_url": "http://127.0.0.1:9",
    "allow_http": True,
    "region": "us-east-1",
    "access_key_id": "testing",
    "secret_access_key": "testing",
    "force_path_style": True,
}


def listing(directory: Path) -> list[str]:
    """Every path under ``directory`` (files and folders), relative, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def small_params() -> dict[str, np.ndarray]:
    return {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)}


@pytest.fixture
def in_empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory (checked empty again by the tests)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def icechunk_engine() -> None:
    """Skip where the Icechunk engine cannot run (tests(dask) installs it)."""
    pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
    pytest.importorskip("icechunk", reason="engine='icechunk' needs icechunk (.[icechunk])")
    pytest.importorskip(
        "xpoptim._outofcore.transactional",
        reason="the Icechunk engine (xpoptim/_outofcore/transactional.py) is not in this tree",
    )


def unreachable_endpoint() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- parse: what is refused -----------------------------------------------------------------

BAD_LOCATIONS = [
    ("http://example.com/run", r"location 'http://example.com/run' has the unsupported scheme"),
    ("https://bucket.s3.amazonaws.com/run", r"unsupported scheme 'https'"),
    ("ftp://host/run", r"location 'ftp://host/run' has the unsupported scheme 'ftp'"),
    ("hdfs://namenode/run", r"unsupported scheme 'hdfs'"),
    ("s3:bucket/run", r"location 's3:bucket/run' looks like a URL .* no '//'.*s3://bucket/run"),
    ("s3:/bucket/run", r"location 's3:/bucket/run' looks like a URL .* no '//'"),
    ("gs:bucket", r"no '//'"),
    ("run:1", r"location 'run:1' looks like a URL.*write \./run:1"),
    ("s3://", r"location 's3://' names no bucket"),
    ("s3:///run", r"location 's3:///run' names no bucket"),
    ("gs://", r"names no bucket"),
    ("s3://bucket/../run", r"location 's3://bucket/../run': the prefix '../run' may not hold"),
    ("s3://bucket/a/../b", r"may not hold '\.', '\.\.'"),
    ("s3://bucket/..", r"may not hold"),
    ("s3://bucket/./run", r"may not hold"),
    ("s3://bucket//run", r"empty segment"),
    ("s3://bucket/a//b", r"empty segment"),
    ("s3://bucket/run?versionId=3", r"query or fragment"),
    ("s3://bucket/run#x", r"query or fragment"),
    ("s3://127.0.0.1:9000/bucket/run", r"'127\.0\.0\.1:9000' is not a bucket name.*endpoint_url"),
    ("s3://user@bucket/run", r"'user@bucket' is not a bucket name"),
    ("file://relative/run", r"location 'file://relative/run': a file:// URL needs an absolute"),
    ("file:/abs/run", r"no '//'"),
    ("", r"location is empty"),
    ("   ", r"location is empty"),
    (" s3://bucket/run", r"starts with whitespace before a URL"),
]


@pytest.mark.parametrize(("location", "message"), BAD_LOCATIONS, ids=[b[0] for b in BAD_LOCATIONS])
def test_parse_refuses_bad_locations(location, message):
    with pytest.raises(ValueError, match=message):
        parse(location)


def test_a_path_object_holding_a_url_is_refused():
    # pathlib collapses '//': Path("s3://bucket/run") is "s3:/bucket/run", which was a
    # local folder "s3:" before.
    with pytest.raises(ValueError, match=r"location 's3:/bucket/run' is a path object .* URL"):
        parse(Path("s3://bucket/run"))
    with pytest.raises(ValueError, match=r"pass an object-store URL as a str"):
        parse(PurePosixPath("gs://bucket"))


class BytesPath(os.PathLike):  # type: ignore[type-arg]
    def __fspath__(self) -> bytes:
        return b"/tmp/run"


@pytest.mark.parametrize(
    ("location", "message"),
    [
        (b"/tmp/run", r"location must be a path \(str or os\.PathLike\) or a URL, got bytes"),
        (BytesPath(), r"location must be a str path or URL, got bytes b'/tmp/run'"),
        (None, r"location must be a path .* got NoneType"),
        (42, r"got int"),
    ],
    ids=["bytes", "bytes-pathlike", "None", "int"],
)
def test_parse_refuses_locations_of_the_wrong_type(location, message):
    with pytest.raises(TypeError, match=message):
        parse(location)


BAD_OPTIONS = [
    ("s3://bucket/run", {"endpoint": "http://x"}, r"storage_options \['endpoint'\] do not apply"),
    ("s3://bucket/run", {"key": "a", "secret": "b"}, r"\['key', 'secret'\] do not apply to s3://"),
    ("s3://bucket/run", {"account": "acc"}, r"\['account'\] do not apply to s3://"),
    ("gs://bucket/run", {"region": "eu"}, r"\['region'\] do not apply to gs://"),
    ("az://container/run", {"account": "a", "region": "eu"}, r"\['region'\] do not apply"),
    ("az://container/run", {}, r"storage_options must give 'account'"),
    ("s3://bucket/run", {"allow_http": "yes"}, r"storage_options\['allow_http'\] must be True"),
    ("s3://bucket/run", {"force_path_style": 1}, r"\['force_path_style'\] must be True or"),
    ("s3://bucket/run", {"endpoint_url": 9000}, r"\['endpoint_url'\] must be a non-empty str"),
    ("s3://bucket/run", {"region": ""}, r"\['region'\] must be a non-empty str"),
    (
        "s3://bucket/run",
        {"access_key_id": "AKIA"},
        r"give 'access_key_id' without 'secret_access_key'",
    ),
    (
        "s3://bucket/run",
        {"secret_access_key": "s"},
        r"give 'secret_access_key' without 'access_key_id'",
    ),
]


@pytest.mark.parametrize(
    ("location", "options", "message"),
    BAD_OPTIONS,
    ids=[f"{b[0].split(':')[0]}-{sorted(b[1])}" for b in BAD_OPTIONS],
)
def test_parse_refuses_storage_options_that_do_not_apply(location, options, message):
    with pytest.raises(ValueError, match=message):
        parse(location, storage_options=options)


@pytest.mark.parametrize("local", ["run", "./s3:bucket", "/abs/run", "file:///abs/run"])
def test_storage_options_are_refused_for_a_local_path(local):
    with pytest.raises(ValueError, match=r"storage_options \['region'\] apply to object storage"):
        parse(local, storage_options={"region": "us-east-1"})
    with pytest.raises(ValueError, match=r"not to the local path"):
        parse(Path("run"), storage_options={"endpoint_url": "http://x"})


def test_storage_options_of_the_wrong_type_are_refused():
    with pytest.raises(TypeError, match=r"storage_options must be a dict \(or None\), got list"):
        parse("s3://bucket/run", storage_options=[("region", "eu")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"storage_options keys must be str, got \[1\]"):
        parse("s3://bucket/run", storage_options={1: "x"})


@pytest.mark.parametrize("url", ["s3://bucket/run", "gs://bucket/run", "file:///abs/run"])
def test_engine_directory_or_an_unknown_engine_is_refused(url):
    if not url.startswith("file:"):
        with pytest.raises(ValueError, match=r"engine='directory' keeps a store in a local dir"):
            parse(url, engine="directory")
    for engine in ("zarr", "Icechunk", "", "tensorstore"):
        with pytest.raises(ValueError, match=r"engine must be one of \('directory', 'icechunk'\)"):
            parse(url, engine=engine)


# -- parse: what is accepted ----------------------------------------------------------------


def test_local_paths_and_file_urls_are_local():
    for text, path in [
        ("run", Path("run")),
        ("./s3:bucket", Path("./s3:bucket")),
        ("/abs/run", Path("/abs/run")),
        ("file:///abs/run", Path("/abs/run")),
        ("FILE:///abs/run", Path("/abs/run")),
    ]:
        where = parse(text)
        assert where == Location(text, "file", path, engine="directory")
        assert where.is_local
        assert str(where) == text
    assert parse(Path("run")).path == Path("run")
    assert parse("file:///abs/run", engine="icechunk").engine == "icechunk"
    assert parse("run", engine="directory").engine == "directory"


@pytest.mark.parametrize(
    ("url", "scheme", "bucket", "prefix"),
    [
        ("s3://bucket/run", "s3", "bucket", "run"),
        ("s3://bucket/run/", "s3", "bucket", "run"),
        ("S3://my.bucket-1/a/b/c", "s3", "my.bucket-1", "a/b/c"),
        ("s3://bucket", "s3", "bucket", ""),
        ("s3://bucket/", "s3", "bucket", ""),
        ("gs://bucket_2/run", "gs", "bucket_2", "run"),
        ("az://container/run", "az", "container", "run"),
    ],
)
def test_object_store_urls_parse_to_bucket_and_prefix(url, scheme, bucket, prefix):
    options = {"account": "acct"} if scheme == "az" else {}
    where = parse(url, storage_options=options)
    assert (where.scheme, where.bucket, where.prefix) == (scheme, bucket, prefix)
    assert where.engine == "icechunk"
    assert not where.is_local
    assert where.path is None
    assert dict(where.options) == options
    assert parse(url, engine="icechunk", storage_options=options) == where


def test_s3_storage_options_are_kept_as_given():
    where = parse("s3://bucket/run", storage_options=S3)
    assert dict(where.options) == S3
    assert where.options is not S3  # a copy: the caller's dict can change afterwards


def test_every_engine_is_named():
    assert ENGINES == ("directory", "icechunk")


# -- the public front: nothing is written for a bad location --------------------------------


def _create(location: Any, **kwargs: Any) -> Any:
    return xpoptim.OutOfCore.create(location, xpoptim.Adam(), small_params(), **kwargs)


PUBLIC_REFUSALS = [
    ("s3:bucket/run", {}, r"location 's3:bucket/run' looks like a URL"),
    ("http://host/run", {}, r"location 'http://host/run' has the unsupported scheme 'http'"),
    ("ftp://host/run", {}, r"unsupported scheme 'ftp'"),
    ("hdfs://nn/run", {}, r"unsupported scheme 'hdfs'"),
    ("s3://", {}, r"names no bucket"),
    ("s3://bucket/../run", {}, r"may not hold"),
    ("s3://bucket/run", {"engine": "directory"}, r"engine='directory'"),
    ("s3://bucket/run", {"engine": "zarr"}, r"engine must be one of"),
    ("s3://bucket/run", {"storage_options": {"endpoint": "x"}}, r"\['endpoint'\] do not apply"),
    ("run", {"storage_options": {"region": "eu"}}, r"apply to object storage only"),
    (Path("s3://bucket/run"), {}, r"is a path object"),
]


@pytest.mark.parametrize(
    ("location", "kwargs", "message"),
    PUBLIC_REFUSALS,
    ids=[f"{p[0]}-{sorted(p[1])}" for p in PUBLIC_REFUSALS],
)
def test_create_and_open_refuse_bad_locations_and_write_nothing(
    in_empty_cwd, location, kwargs, message
):
    with pytest.raises(ValueError, match=message):
        _create(location, **kwargs)
    with pytest.raises(ValueError, match=message):
        xpoptim.OutOfCore.open(location, **kwargs)
    with pytest.raises(ValueError, match=message):
        xpoptim.OutOfCore.upgrade(in_empty_cwd / "nowhere", location, **kwargs)
    assert listing(in_empty_cwd) == []


def test_create_and_open_refuse_bytes_locations(in_empty_cwd):
    with pytest.raises(TypeError, match=r"location must be a path .* got bytes"):
        _create(b"run")
    with pytest.raises(TypeError, match=r"location must be a path .* got bytes"):
        xpoptim.OutOfCore.open(b"run")
    assert listing(in_empty_cwd) == []


def test_file_url_is_a_local_directory_store(tmp_path, in_empty_cwd):
    pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
    target = tmp_path / "store"
    store = _create(f"file://{target}", chunks=(2, 3))
    assert store.engine == "directory"
    assert (target / "zarr.json").is_file()
    assert listing(in_empty_cwd) == []
    store.step({"w": np.full((4, 3), 0.5, np.float32)})
    again = xpoptim.OutOfCore.open(target)
    assert again.step_count == 1
    assert xpoptim.OutOfCore.open(f"file://{target}").step_count == 1


# -- the public front against object storage: never a local folder --------------------------


@pytest.mark.slow  # Icechunk retries a refused connection for about 25 s
def test_create_against_an_unreachable_endpoint_fails_and_writes_nothing_locally(
    icechunk_engine, in_empty_cwd
):
    options = {**S3, "endpoint_url": unreachable_endpoint()}
    with pytest.raises(
        xpoptim.StoreError, match=r"(?s)cannot create a store at s3://bucket/run.*refused"
    ):
        _create("s3://bucket/run", storage_options=options)
    assert listing(in_empty_cwd) == []
    assert not Path("s3:").exists()


def test_create_on_the_s3_server_writes_to_the_bucket_not_to_the_cwd(
    icechunk_engine, in_empty_cwd, s3_server
):
    bucket = s3_server.new_bucket()
    store = _create(f"s3://{bucket}/run", storage_options=s3_server.storage_options)
    assert store.engine == "icechunk"
    assert store.step_count == 0
    assert listing(in_empty_cwd) == []
    keys = s3_server.objects(bucket)
    assert keys, "nothing was written to the bucket"
    assert all(key.startswith("run/") for key in keys), sorted(keys)
    again = xpoptim.OutOfCore.open(f"s3://{bucket}/run", storage_options=s3_server.storage_options)
    assert again.step_count == 0
    assert listing(in_empty_cwd) == []


def test_open_of_an_empty_prefix_on_s3_is_a_store_error(icechunk_engine, in_empty_cwd, s3_server):
    bucket = s3_server.new_bucket()
    with pytest.raises(xpoptim.StoreError, match=rf"s3://{bucket}/nothing"):
        xpoptim.OutOfCore.open(f"s3://{bucket}/nothing", storage_options=s3_server.storage_options)
    assert listing(in_empty_cwd) == []
    assert s3_server.objects(bucket) == {}
