"""A real S3-compatible server for the tests: moto in server mode, on 127.0.0.1.

The ``s3_server`` fixture (one per test session) starts ``python -m moto.server`` as a
subprocess on a free local port, waits until it answers HTTP, and yields an `S3Server`:
its ``endpoint_url``, the ``storage_options`` xpoptim passes to Icechunk, and
`S3Server.new_bucket` (a fresh, empty bucket per call, made with boto3 over HTTP). The
stores under test speak to it through the same client code a user's S3 would get.

Where moto or boto3 is not installed, or the server does not start (its stderr is the
reason), every test that uses the fixture is skipped with that reason; it never passes
silently. The process is killed at the end of the session, whatever the tests did.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

#: How long the server may take to answer its first request (moto imports a lot).
START_TIMEOUT_S = 60.0

#: The credentials moto accepts (any non-empty pair; these are the conventional ones).
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto S3 server, as the tests see it.

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT``.
        process: the server's process (a child of the test session).
    """

    endpoint_url: str
    process: subprocess.Popen[bytes]
    _buckets: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        """The ``storage_options`` of `xpoptim.OutOfCore.create`/``open`` for this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "allow_http": True,
            "region": REGION,
            "access_key_id": ACCESS_KEY_ID,
            "secret_access_key": SECRET_ACCESS_KEY,
            "force_path_style": True,
        }

    def client(
        self,
        service: str = "s3",
        access_key_id: str = ACCESS_KEY_ID,
        secret_access_key: str = SECRET_ACCESS_KEY,
    ) -> Any:
        """A boto3 client of this server (``"s3"`` to inspect or prepare buckets, ``"iam"``)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
        )

    def new_bucket(self) -> str:
        """Create a fresh, empty bucket and return its name (unique in this session)."""
        name = f"xpoptim-test-{os.getpid()}-{next(self._buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "", **credentials: str) -> dict[str, int]:
        """Key -> size in bytes of every object in ``bucket`` under ``prefix``."""
        paginator = self.client("s3", **credentials).get_paginator("list_objects_v2")
        out: dict[str, int] = {}
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = int(obj["Size"])
        return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (403, 404) means it is up
    except (OSError, urllib.error.URLError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the server and its process group: SIGTERM, then SIGKILL after 5 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a ``preexec_fn`` that has the server get SIGKILL when the test process dies,
    even by SIGKILL. Resolved here, in the parent: the child (forked from a process that
    may run threads) only calls into libc, it imports nothing."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = ctypes.c_int(1), ctypes.c_ulong(int(signal.SIGKILL))

    def preexec() -> None:  # pragma: no cover - runs in the child, before exec
        prctl(pr_set_pdeathsig, sigkill)

    return preexec


def server_argv(port: int) -> list[str]:
    """The command line of moto's S3 server on ``127.0.0.1:port``."""
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def running_server(argv: Callable[[int], list[str]] = server_argv) -> Iterator[S3Server]:
    """Start moto's S3 server, yield it once it answers, and stop it on exit.

    Args:
        argv: port -> the server's command line (a test replaces it to check the skip).

    Raises:
        pytest.skip.Exception: moto or boto3 is missing, or the server did not start
            (the reason quotes its stderr).
    """
    pytest.importorskip("moto", reason="moto[server] is not installed (the test dependency group)")
    pytest.importorskip("boto3", reason="boto3 is not installed (the test dependency group)")
    pytest.importorskip("flask", reason="moto's server mode needs moto[server] (flask)")
    preexec = _die_with_parent()
    with tempfile.TemporaryFile() as stderr:
        process = None
        for _attempt in range(3):  # another process may take the port between bind and listen
            port = free_port()
            endpoint = f"http://127.0.0.1:{port}"
            stderr.seek(0)
            stderr.truncate()
            process = subprocess.Popen(
                argv(port),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed whole on teardown
                preexec_fn=preexec,
            )
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while process.poll() is None and time.monotonic() < deadline:
                    if _answers(endpoint + "/"):
                        break
                    time.sleep(0.1)
                else:
                    _stop(process)
                    stderr.seek(0)
                    err = stderr.read().decode(errors="replace").strip()
                    if "address already in use" in err.lower():
                        continue
                    pytest.skip(
                        f"the moto S3 server did not start on {endpoint} (exit "
                        f"{process.returncode}): {err[-2000:] or 'no output'}"
                    )
                break
            except BaseException:
                _stop(process)
                raise
        else:
            pytest.skip("the moto S3 server found no free port in 3 tries")
        assert process is not None
        try:
            yield S3Server(endpoint, process)
        finally:
            _stop(process)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the whole test session (skips if it cannot start)."""
    with running_server() as server:
        yield server
