"""The demo trains on every backend: losses fall and accuracy beats chance."""

from __future__ import annotations

import subprocess
import sys

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
