"""The demo trains on every backend: losses fall and accuracy beats chance."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from xpoptim._demo import run_demo

from conftest import Backend


def test_demo_trains(backend: Backend, tmp_path, capsys):
    steps = 12 if backend.lazy else 60
    results = run_demo(backend.name, steps=steps, samples=300, out=tmp_path)
    assert [r.name for r in results] == ["SGD", "RMSprop", "Adam"]
    for r in results:
        assert len(r.losses) == steps
        assert r.losses[-1] < 0.8 * r.losses[0], r
        assert r.accuracy > 0.5, r
    out = capsys.readouterr().out
    assert "optimizer  first loss final loss" in out


def test_command_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "xpoptim",
        "demo",
        "--steps",
        "5",
        "--samples",
        "90",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Adam" in done.stdout
    bad = subprocess.run([*cmd, "--backend", "nope"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "invalid choice: 'nope'" in bad.stderr


# -- first contact: a missing backend, progress, bad arguments --------------------------

DEMO = [sys.executable, "-m", "xpoptim", "demo", "--steps", "4", "--samples", "60"]

# The backends whose library a user may lack, and what the demo must tell them.
MISSING = {
    "array_api_strict": "array-api-strict is not installed: pip install array-api-strict",
    "dask": "dask is not installed: pip install 'xpoptim[dask]'",
    "torch": "torch is not installed: pip install torch",
    "jax": "jax is not installed: pip install jax",
    "cupy": "cupy is not installed: pip install 'xpoptim[cuda12]'",
}


@pytest.mark.parametrize("backend", MISSING)
def test_a_missing_backend_names_the_library_to_install(backend, tmp_path):
    # Where the library is really absent, the plain command line; where it is installed,
    # the same command in a process whose import of it fails as a missing one does
    # (``sys.modules[name] = None`` is Python's own "not importable" marker).
    from xpoptim._demo import BACKENDS

    root = BACKENDS[backend].package.split(".")[0]
    argv = [*DEMO[3:], "--backend", backend, "--out", str(tmp_path)]
    if importlib.util.find_spec(root) is None:
        cmd = [*DEMO, "--backend", backend, "--out", str(tmp_path)]
    else:
        code = (
            f"import sys; sys.modules[{root!r}] = None\n"
            "from xpoptim.__main__ import main\n"
            f"raise SystemExit(main({argv!r}))"
        )
        cmd = [sys.executable, "-c", code]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 1, done
    assert MISSING[backend] in done.stderr
    assert "Traceback" not in done.stderr
    assert "array_api_compat" not in done.stderr  # main named the wrong package
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_progress_is_off_when_stderr_is_not_a_terminal(tmp_path):
    done = subprocess.run(
        [*DEMO, "--out", str(tmp_path)], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Adam" in done.stdout
    assert done.stderr == ""


def test_progress_can_be_asked_for_and_refused(tmp_path):
    on = subprocess.run(
        [*DEMO, "--steps", "20", "--out", str(tmp_path), "--progress"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert on.returncode == 0, on.stderr
    lines = on.stderr.splitlines()
    # A log gets a line per tenth of each run (and the last step), not one per step.
    for name in ("SGD", "RMSprop", "Adam"):
        mine = [line for line in lines if line.startswith(name)]
        assert 2 <= len(mine) <= 11, mine
        assert "step 20/20" in mine[-1]
        assert "step  1/20" in mine[0]
    off = subprocess.run(
        [*DEMO, "--out", str(tmp_path), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert off.returncode == 0, off.stderr
    assert off.stderr == ""
    # The table on stdout is the same either way.
    assert on.stdout.splitlines()[0].replace("20 steps", "4 steps") == off.stdout.splitlines()[0]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal (POSIX)")
def test_progress_is_on_by_default_on_a_terminal(tmp_path):
    # A real pseudo-terminal as stderr: the line is rewritten in place with "\r".
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [*DEMO, "--steps", "30", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    shown = b"".join(chunks).decode()
    for name in ("SGD", "RMSprop", "Adam"):
        assert f"\r{name:<8} step 30/30" in shown, shown
    assert "Adam" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--steps", "ten"], "argument --steps: not an integer: 'ten'"),
        (["--samples", "2"], "argument --samples: must be >= 3, got 2"),
    ],
)
def test_bad_numbers_are_usage_errors(args, message, tmp_path):
    done = subprocess.run(
        [*DEMO, "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
