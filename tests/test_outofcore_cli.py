"""The out-of-core demo and its command line: never deletes what it did not create,
usage errors instead of tracebacks, progress bars on a terminal (issue 10). Without
Dask: ``test_outofcore_nodask.py``."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
zarr = pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")

import xpoptim  # noqa: E402
from test_outofcore_errors import everything, user_folder  # noqa: E402
from xpoptim.__main__ import main  # noqa: E402
from xpoptim._outofcore import demo as _outofcore_demo  # noqa: E402
from xpoptim._outofcore.demo import run_out_of_core_demo  # noqa: E402

TINY = ["--size", "2MB", "--chunk-size", "256KiB", "--steps", "1"]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


# -- the demo never deletes what it did not create ----------------------------------------------


def test_demo_refuses_a_folder_of_other_files(tmp_path):
    folder = user_folder(tmp_path / "mine")
    before = everything(folder)
    with pytest.raises(
        xpoptim.StoreError,
        match=r"not empty and is not a store made by this demo: it holds 'notes', "
        r"'thesis.tex'. The demo never deletes what it did not create",
    ):
        run_out_of_core_demo(folder, "2MB", steps=1, chunk_bytes=2**18)
    assert everything(folder) == before


def test_demo_refuses_a_store_it_did_not_make(tmp_path):
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), {"w": np.ones(4)})
    store.step({"w": np.ones(4)})
    before = everything(store.directory)
    with pytest.raises(xpoptim.StoreError, match=r"not a store made by this demo"):
        run_out_of_core_demo(store.directory, "2MB", steps=1, chunk_bytes=2**18)
    assert everything(store.directory) == before


def test_demo_replaces_its_own_store(tmp_path, capsys):
    for _ in range(2):
        figures = run_out_of_core_demo(tmp_path / "d", "2MB", steps=1, chunk_bytes=2**18)
        assert figures["verified_chunks"] == 8
    assert xpoptim.OutOfCore.open(tmp_path / "d").step_count == 1
    assert "verified 8 sampled chunks" in capsys.readouterr().out


def test_cli_out_of_core_dot_leaves_the_current_folder_alone(tmp_path, monkeypatch, capsys):
    folder = user_folder(tmp_path / "cwd")
    monkeypatch.chdir(folder)
    before = everything(folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out-of-core", ".", *TINY])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: . is not empty and is not a store made by this demo" in err
    assert "Traceback" not in err
    assert everything(folder) == before


# -- usage errors and a missing dependency --------------------------------------------------


@pytest.mark.parametrize("size", ["1G", "3 gigabytes", "-1GB", "0", "nan", "1e400"])
@pytest.mark.parametrize("entry", ["xpoptim", "xpoptim._outofcore.demo"])
def test_a_bad_size_is_a_usage_error(tmp_path, capsys, size, entry):
    if entry == "xpoptim":
        run, argv = main, ["demo", "--out-of-core", str(tmp_path / "d"), f"--size={size}"]
    else:
        run, argv = _outofcore_demo.main, [str(tmp_path / "d"), f"--size={size}"]
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --size: size {size!r}: expected a positive number" in err
    assert "e.g. 3GB or 512MiB" in err
    assert not (tmp_path / "d").exists()


# -- progress -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "progress", "shown"),
    [
        (Terminal, None, True),
        (io.StringIO, None, False),
        (Terminal, False, False),
        (io.StringIO, True, True),
    ],
    ids=["terminal", "pipe", "terminal-off", "pipe-on"],
)
def test_steps_show_a_progress_bar_where_a_terminal_is_attached(
    tmp_path, monkeypatch, stderr, progress, shown
):
    err = stderr()
    monkeypatch.setattr(sys, "stderr", err)
    store = xpoptim.OutOfCore.create(
        tmp_path / "s", xpoptim.Adam(), {"w": np.ones(8)}, chunks=(2,), progress=progress
    )
    created = err.getvalue()
    store.step({"w": np.ones(8)}, progress=progress)
    stepped = err.getvalue()[len(created) :]
    for text in (created, stepped):
        assert ("100% Completed" in text) is shown, text


@pytest.mark.parametrize(("flag", "shown"), [("--progress", True), ("--no-progress", False)])
def test_the_demo_cli_exposes_the_progress_bar(tmp_path, capsys, flag, shown):
    assert main(["demo", "--out-of-core", str(tmp_path / "d"), *TINY, flag]) == 0
    captured = capsys.readouterr()
    assert ("100% Completed" in captured.err) is shown
    assert "verified 8 sampled chunks" in captured.out
    assert Path(tmp_path / "d" / "xpoptim.json").is_file()
