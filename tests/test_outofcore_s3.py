"""The Icechunk engine on object storage: a real S3 server over HTTP, end to end.

The server is moto in server mode on 127.0.0.1 (``tests/s3server.py``), spoken to by the
same client code a user's S3 gets (Icechunk's, with ``storage_options``). Results are
compared bit for bit with the in-memory optimizer run on NumPy copies
(`test_outofcore.in_memory`), an independent computation of the same rules; storage is
measured by listing the bucket with boto3, against the arrays' own byte count.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")
pytest.importorskip("icechunk", reason="the Icechunk engine needs icechunk (.[icechunk])")

import xpoptim  # noqa: E402
from s3server import S3Server, running_server  # noqa: E402
from test_outofcore import CHUNKS, assert_store_equals, in_memory, problem  # noqa: E402


def as_dask(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Dask copies with several chunks per array (the chunks of `CHUNKS`)."""
    return {k: da.from_array(v.copy(), chunks=CHUNKS[k]) for k, v in arrays.items()}


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture
def url(s3_server: S3Server) -> str:
    """``s3://BUCKET/run`` in a fresh bucket."""
    return f"s3://{s3_server.new_bucket()}/run"


def bucket_of(url: str) -> str:
    return url.removeprefix("s3://").split("/", 1)[0]


# -- the fixture itself ----------------------------------------------------------------------


def test_a_server_that_cannot_start_skips_with_its_stderr():
    pytest.importorskip("moto", reason="moto[server] is not installed (the test dependency group)")
    pytest.importorskip("boto3", reason="boto3 is not installed (the test dependency group)")
    pytest.importorskip("flask", reason="moto's server mode needs moto[server] (flask)")

    def broken(port: int) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.stderr.write('no S3 today'); sys.exit(3)"]

    with (
        pytest.raises(pytest.skip.Exception, match=r"did not start .*exit 3.*no S3 today"),
        running_server(broken),
    ):
        pytest.fail("the body must not run")  # pragma: no cover


def test_the_server_answers_and_is_stopped_on_exit():
    with running_server() as server:
        bucket = server.new_bucket()
        server.client().put_object(Bucket=bucket, Key="a/b", Body=b"12345")
        assert server.objects(bucket) == {"a/b": 5}
        assert server.objects(bucket, "x/") == {}
        assert server.new_bucket() != bucket
        process = server.process
        assert process.poll() is None
    assert process.poll() is not None  # stopped, and reaped


# -- results ---------------------------------------------------------------------------------


def test_adam_on_s3_equals_the_in_memory_optimizer_bit_exactly(s3_server, url, tmp_path):
    options = s3_server.storage_options
    params, grads = problem(np.float32, 3)
    optimizer = xpoptim.Adam(0.02, beta1=0.8, beta2=0.95)
    want = in_memory(optimizer, params, grads)
    store = xpoptim.OutOfCore.create(
        url, optimizer, as_dask(params), storage_options=options, num_workers=2
    )
    assert (store.engine, store.step_count) == ("icechunk", 0)
    assert {k: tuple(v["chunks"]) for k, v in store.layout.items()} == CHUNKS  # several each
    for t, g in enumerate(grads, start=1):
        summary = store.step(as_dask(g), step=t)
        assert (summary.step, summary.skipped) == (t, False)
        assert_store_equals(store, *want[t - 1])

    # A fresh handle, as another process or machine would open it.
    reopened = xpoptim.OutOfCore.open(url, storage_options=options)
    assert (reopened.engine, reopened.step_count) == ("icechunk", 3)
    assert type(reopened.optimizer) is xpoptim.Adam
    assert reopened.optimizer.get_config() == optimizer.get_config()
    assert_store_equals(reopened, *want[-1])
    assert reopened.step(grads[-1], step=3).skipped  # idempotent re-run: nothing changes
    assert_store_equals(reopened, *want[-1])
    keys = s3_server.objects(bucket_of(url))
    assert keys, "nothing in the bucket"
    assert all(k.startswith("run/") for k in keys), sorted(keys)


def test_history_tags_open_at_a_step_and_rollback_on_s3(s3_server, url):
    options = s3_server.storage_options
    params, grads = problem(np.float64, 6, seed=3)
    optimizer = xpoptim.Adam(0.01)
    want = in_memory(optimizer, params, grads)
    store = xpoptim.OutOfCore.create(
        url, optimizer, as_dask(params), storage_options=options, keep_steps=2
    )
    for t in (1, 2, 3):
        store.step(grads[t - 1], step=t)
    assert [c.step for c in store.history()] == [3, 2]
    assert store.tag("good", step=2).tags == ("good",)
    for t in (4, 5):
        store.step(grads[t - 1], step=t)
    assert [(c.step, c.tags) for c in store.history()] == [(5, ()), (4, ()), (2, ("good",))]
    with pytest.raises(xpoptim.StoreError, match=r"does not hold step 1 any more"):
        xpoptim.OutOfCore.open(url, storage_options=options, step=1)

    old = xpoptim.OutOfCore.open(url, storage_options=options, tag="good")
    assert (old.step_count, old.read_only) == (2, True)
    assert_store_equals(old, *want[1])
    at4 = xpoptim.OutOfCore.open(url, storage_options=options, step=4)
    assert_store_equals(at4, *want[3])
    before = s3_server.objects(bucket_of(url))
    with pytest.raises(xpoptim.StoreError, match=r"read-only at step 2"):
        old.step(grads[2], step=3)
    assert s3_server.objects(bucket_of(url)) == before  # nothing written

    store.rollback(tag="good")
    fresh = xpoptim.OutOfCore.open(url, storage_options=options)
    assert fresh.step_count == 2
    assert_store_equals(fresh, *want[1])
    for t in (3, 4, 5, 6):  # continuing from step 2 redoes the same steps, bit for bit
        fresh.step(grads[t - 1], step=t)
        assert_store_equals(fresh, *want[t - 1])
    assert_store_equals(xpoptim.OutOfCore.open(url, storage_options=options), *want[5])


def test_storage_on_s3_stays_at_about_two_versions(s3_server, url):
    """keep_steps=1: each step expires the one before and garbage-collects its chunks,
    so the bucket holds about one version (plus metadata), never more than two."""
    shapes = {"w": (256, 128), "b": (128,)}
    rng = np.random.default_rng(7)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    store = xpoptim.OutOfCore.create(
        url,
        xpoptim.Adam(),
        params,
        chunks={"w": (64, 128), "b": (64,)},
        storage_options=s3_server.storage_options,
        keep_steps=1,
    )
    version = sum(v.nbytes for v in params.values()) * 3  # params, m and v
    sizes = []
    for _ in range(6):
        store.step({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})
        sizes.append(sum(s3_server.objects(bucket_of(url)).values()))
    assert len(store.history()) == 1
    assert min(sizes) > 0.9 * version, (sizes, version)  # the data is really in the bucket
    assert max(sizes) < 2 * version, (sizes, version)
    assert sizes[-1] <= sizes[1] * 1.1, sizes  # no growth from step to step


# -- errors ----------------------------------------------------------------------------------


def test_a_missing_bucket_is_a_clear_error_and_nothing_is_created(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params, _ = problem(np.float32, 0)
    with pytest.raises(xpoptim.StoreError, match=r"s3://no-such-bucket/run"):
        xpoptim.OutOfCore.create(
            "s3://no-such-bucket/run",
            xpoptim.Adam(),
            params,
            storage_options=s3_server.storage_options,
        )
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert "no-such-bucket" not in names
    assert listing(tmp_path) == []


def _post(url: str, body: bytes) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    # Not form-encoded (urllib's default), or the server reads no body.
    headers = {"Content-Type": "application/octet-stream"}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with opener.open(request, timeout=10) as r:
        return dict(json.loads(r.read()))


def test_wrong_credentials_are_a_clear_error_and_nothing_is_created(tmp_path, monkeypatch):
    """A server of its own that checks credentials (moto's IAM authentication): a user
    with a key and an S3 policy, then authentication on; the wrong secret is refused
    with a StoreError and writes nothing, the right one works."""
    pytest.importorskip("boto3", reason="boto3 is not installed (the test dependency group)")
    monkeypatch.chdir(tmp_path)
    with running_server() as server:
        iam = server.client("iam")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(
            UserName="trainer",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        bucket = server.new_bucket()
        assert _post(f"{server.endpoint_url}/moto-api/reset-auth", b"0")["status"] == "ok"
        right = {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}
        wrong = {**right, "secret_access_key": "not-the-secret"}
        url = f"s3://{bucket}/run"
        params, grads = problem(np.float32, 1)

        unknown = {**right, "access_key_id": "AKIANOSUCHKEY0000000"}
        for credentials, code in (
            (wrong, "SignatureDoesNotMatch"),
            (unknown, "InvalidAccessKeyId"),
        ):
            options = {**server.storage_options, **credentials}
            with pytest.raises(xpoptim.StoreError, match=rf"(?s)store at {url}.*{code}"):
                xpoptim.OutOfCore.create(url, xpoptim.Adam(), params, storage_options=options)
            assert server.objects(bucket, **right) == {}  # nothing written
        with pytest.raises(xpoptim.StoreError, match=url):
            xpoptim.OutOfCore.open(url, storage_options={**server.storage_options, **wrong})

        # The right key works, so the refusals above were about the credentials.
        options = {**server.storage_options, **right}
        store = xpoptim.OutOfCore.create(url, xpoptim.Adam(), params, storage_options=options)
        store.step(grads[0])
        assert server.objects(bucket, **right)
        with pytest.raises(xpoptim.StoreError, match=url):  # and a wrong one still fails
            xpoptim.OutOfCore.open(url, storage_options={**server.storage_options, **wrong})
        assert xpoptim.OutOfCore.open(url, storage_options=options).step_count == 1
    assert listing(tmp_path) == []
