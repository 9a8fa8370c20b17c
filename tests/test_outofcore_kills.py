"""The Icechunk engine under SIGKILL, and two real writer processes (issue 12).

Every writer is a real process (``outofcore_writers.py``: a fresh interpreter, or for
the kill trials a fork of one that has not started a thread yet; never a fork of the
test process) stepping a real Icechunk store, on local disk (``engine="icechunk"``) or
on the moto S3 server of ``s3server.py``, with the deterministic gradients of
`xpoptim._outofcore.demo.synthetic_arrays`. The reference is independent of the store:
the in-memory optimizer's ``update`` on NumPy copies, step after step.

* Kill trials: the test kills the writer with SIGKILL at each phase of a step (the writer
  kills itself from ``chunk_step._phase_hook``) and at seeded random moments, uniform
  over a step's duration as measured by the phase trials, or over the expiry and garbage
  collection that follow a commit. After every kill the store opens and holds a whole
  committed step, bit for bit; after all of them, resuming gives the uninterrupted run's
  bits, and the chunks of the killed steps have been collected.
* Two writers: on local disk the second is refused at once by the writer lock; on S3
  two writers that prepared the same step race to commit, exactly one wins, and the
  loser reopens and continues from the winner's step.
"""

from __future__ import annotations

import collections
import json
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
pytest.importorskip("icechunk", reason="the Icechunk engine needs icechunk (.[icechunk])")
if not sys.platform.startswith("linux"):  # the writers use /proc and os.pidfd_open
    pytest.skip("the writer processes need Linux", allow_module_level=True)

import xpoptim  # noqa: E402
from outofcore_writers import PHASES, Reference, Writer, gradients  # noqa: E402
from test_outofcore import KILL_SEED, _kill_layout_params, assert_store_equals, snapshot  # noqa: E402
from test_outofcore_processes import wait_for  # noqa: E402

#: Each step keeps this many committed steps readable; older ones are collected.
KEEP_STEPS = 2
#: Trials per storage: kills at each phase (PHASE_ROUNDS times), then at random moments
#: of a step (uniform from "locked" over the step's measured duration), then at random
#: moments between "committed" and "collected" (expiry and garbage collection).
PHASE_ROUNDS = 2
RANDOM_TRIALS = {"local": 24, "s3": 16}
COLLECTING_TRIALS = {"local": 8, "s3": 6}
TRIAL_SEED = 20261202


class Place:
    """Where a store lives: a local Icechunk repository or a prefix of an S3 bucket."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        if kind == "local":
            self.location, self.options = str(tmp_path / "store"), None
            self.engine: str | None = "icechunk"
        else:
            self.server = request.getfixturevalue("s3_server")
            self.bucket = self.server.new_bucket()
            self.location = f"s3://{self.bucket}/run"
            self.options, self.engine = self.server.storage_options, None

    def create(self, params: dict, layout: dict, keep_steps: int = KEEP_STEPS, **kw: Any) -> Any:
        chunks = {k: tuple(m["chunks"]) for k, m in layout.items()}
        return xpoptim.OutOfCore.create(
            self.location,
            xpoptim.Adam(learning_rate=0.01),
            params,
            chunks=chunks,
            engine=self.engine,
            storage_options=self.options,
            keep_steps=keep_steps,
            **kw,
        )

    def open(self) -> xpoptim.OutOfCore:
        return xpoptim.OutOfCore.open(self.location, storage_options=self.options)

    def job(self, seed: int, layout: dict, signals: Path) -> dict[str, Any]:
        return {
            "location": self.location,
            "options": self.options,
            "seed": seed,
            "layout": layout,
            "signals": str(signals),
        }

    def objects(self) -> dict[str, int]:
        """Every object of the store (key relative to the store -> bytes)."""
        if self.kind == "local":
            root = Path(self.location)
            return {
                str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()
            }
        return {
            k.removeprefix("run/"): size
            for k, size in self.server.objects(self.bucket, "run/").items()
        }


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    return Place(request.param, tmp_path, request)


def check_whole(place: Place, reference: Reference) -> tuple[int, str | None]:
    """Open the store; (its committed step, why it is not the reference's step, or None)."""
    try:
        store = place.open()
        params, state = store.read()  # one snapshot: its step count and its arrays
        k = state.step
        assert k == store.step_count
        want_params, want_buffers = reference[k]
        for name, want in want_params.items():
            assert np.array_equal(params[name], want), f"step {k}: params[{name}]"
            assert params[name].dtype == want.dtype, f"step {k}: params[{name}]"
        for field, values in want_buffers.items():
            for name, want in values.items():
                got = getattr(state, field)[name]
                assert np.array_equal(got, want), f"step {k}: {field}[{name}]"
    except (AssertionError, xpoptim.StoreError) as exc:
        return -1, f"{type(exc).__name__}: {exc}"
    return k, None


def version_bytes(layout: dict[str, Any]) -> tuple[int, int]:
    """(bytes, chunks) of one step's chunk objects: params and both Adam buffers, each
    chunk with its 4-byte CRC-32C."""
    total = chunks = 0
    for m in layout.values():
        n = int(np.prod([-(-s // c) for s, c in zip(m["shape"], m["chunks"], strict=True)]))
        chunks += 3 * n
        total += 3 * (int(np.prod(m["shape"])) * np.dtype(m["dtype"]).itemsize + 4 * n)
    return total, chunks


# -- SIGKILL trials --------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_never_tears_a_committed_step(place, tmp_path):
    params, layout = _kill_layout_params()
    reference = Reference(params, gradients(layout, KILL_SEED))
    place.create(params, layout)
    signals = tmp_path / "signals"
    signals.mkdir()
    zygote = Writer(place.job(KILL_SEED, layout, signals), tmp_path / "writers.err")
    rng = random.Random(TRIAL_SEED)
    plan = [*PHASES * PHASE_ROUNDS, *["step"] * RANDOM_TRIALS[place.kind]]
    plan += ["collecting"] * COLLECTING_TRIALS[place.kind]
    step_s: list[float] = []  # "locked" to "collected", measured by the phase trials
    collect_s: list[float] = []  # "committed" to "collected"
    torn: list[str] = []
    landed = {"before": 0, "after": 0, "missed": 0}
    windows: collections.Counter[str] = collections.Counter()  # last phase said
    committed = 0
    started = time.monotonic()
    try:
        for trial, kind in enumerate(plan):
            phase = kind if kind in PHASES else "-"
            zygote.command("fork", committed + 2, kill_at=phase)
            assert zygote.threads == 1, "the writers would be forked from a threaded process"
            lines = []
            if kind == "step":
                lines = zygote.until("locked")
                time.sleep(rng.uniform(0.0, max(step_s)))
                zygote.kill_writer()
            elif kind == "collecting":
                lines = zygote.until("committed")
                time.sleep(rng.uniform(0.0, sum(collect_s) / len(collect_s)))
                zygote.kill_writer()
            said = [line.split() for line in lines + zygote.until("exit")]
            code = int(said[-1][1])
            assert code in (0, -signal.SIGKILL), (said, zygote.errors())
            phases = {words[0]: float(words[2]) for words in said if words[0] in PHASES}
            if kind == "collected":
                step_s.append(phases["collected"])
                collect_s.append(phases["collected"] - phases["committed"])
            if code != 0:
                windows[[w[0] for w in said if w[0] in PHASES][-1]] += 1
            k, problem = check_whole(place, reference)
            if problem is not None:  # the store is damaged: later trials would not tell more
                torn.append(f"trial {trial} (kill: {kind}): {problem}")
                break
            landed["missed" if code == 0 else "after" if k > committed else "before"] += 1
            if kind in PHASES:  # the commit is the boundary: never a step lost or half
                assert k == committed + (kind in ("committed", "collected")), (kind, k)
            assert k >= committed, f"trial {trial}: step {k} after step {committed}"
            committed = k
        trials_s = time.monotonic() - started
        assert torn == [], f"a torn step after {trial + 1} kills: {torn}"
        left = sum(k.startswith("chunks/") for k in place.objects())  # orphans included
        # Resume without interruption: a few more steps, so the killed steps' chunks expire.
        final = committed + KEEP_STEPS + 2
        zygote.command("go", final)
        assert zygote.rest()[-1] == f"done {final}", zygote.errors()
        assert zygote.process.returncode == 0, zygote.errors()
    finally:
        zygote.close()
    store = place.open()
    assert store.step_count == final
    assert_store_equals(store, *reference[final])  # the uninterrupted run's bits
    print(
        f"\n{place.kind}: {len(plan)} kills in {trials_s:.1f} s: {len(PHASES) * PHASE_ROUNDS} at "
        f"phases, {plan.count('step')} within a step ({max(step_s):.3f} s), "
        f"{plan.count('collecting')} within its collection ({max(collect_s):.3f} s); before "
        f"the commit {landed['before']}, after {landed['after']}, missed {landed['missed']}, "
        f"torn {len(torn)}; after the phase {dict(windows)}; committed step {committed}, "
        f"resumed to {final}"
    )
    assert landed["before"] + landed["after"] + landed["missed"] == len(plan)
    assert landed["before"] >= len(PHASES[:3]) * PHASE_ROUNDS
    assert landed["after"] >= 2 * PHASE_ROUNDS
    # The orphaned chunks of killed steps were collected: storage holds about
    # KEEP_STEPS + 1 versions of the arrays, plus metadata that does not grow with kills.
    objects = place.objects()
    one_version, chunks_per_version = version_bytes(layout)
    chunk_objects = {k: s for k, s in objects.items() if k.startswith("chunks/")}
    strays = [k for k in chunk_objects if not re.fullmatch(r"chunks/[0-9A-Z]{20}", k)]
    assert strays == [], "partly written objects were left behind"
    assert sum(chunk_objects.values()) <= (KEEP_STEPS + 1) * one_version, sorted(chunk_objects)
    assert len(chunk_objects) <= (KEEP_STEPS + 1) * chunks_per_version
    metadata = [k for k in objects if not k.startswith("chunks/")]
    assert len(metadata) <= (KEEP_STEPS + 2) * (len(layout) * 3 + 3), sorted(metadata)
    print(
        f"{place.kind}: {left} chunk objects after the kills, then "
        f"{len(chunk_objects)} ({sum(chunk_objects.values())} B, "
        f"one version {one_version} B), {len(metadata)} other objects "
        f"({sum(objects.values()) - sum(chunk_objects.values())} B)"
    )


# -- two writers ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_local_writer_is_refused_at_once_and_nothing_is_lost(tmp_path, request):
    place = Place("local", tmp_path, request)
    params, layout = _kill_layout_params()
    reference = Reference(params, gradients(layout, KILL_SEED))
    store = place.create(params, layout)
    signals = tmp_path / "signals"
    signals.mkdir()
    writer = Writer(place.job(KILL_SEED, layout, signals), tmp_path / "writer.err")
    try:
        pid = str(writer.command("go", 1, hold_at="stored"))  # step 1 stored, not committed
        wait_for(signals / f"{pid}.held", writer.process)
        before = snapshot(Path(place.location))
        started = time.monotonic()
        with pytest.raises(xpoptim.ConcurrentWriterError) as refused:
            store.step(reference.grads(1), step=1)
        assert time.monotonic() - started < 2.0, "the second writer waited"
        assert isinstance(refused.value, xpoptim.StoreError)
        message = str(refused.value)
        assert place.location in message
        assert f"another writer (process {pid})" in message
        assert "nothing was changed" in message
        with pytest.raises(xpoptim.ConcurrentWriterError, match=rf"process {pid}"):
            place.create(params, layout, overwrite=True)
        assert snapshot(Path(place.location)) == before
        assert store.step_count == 0  # a reader meanwhile sees step 0, whole
        assert_store_equals(store, *reference[0])
    finally:
        (signals / "go").write_text("")
        try:
            lines = writer.rest()
        finally:
            writer.close()
    assert [line.split()[0] for line in lines] == [*PHASES, "done"], (lines, writer.errors())
    assert lines[-1] == "done 1"
    assert_store_equals(store, *reference[1])  # the first writer's step, once
    store.step(reference.grads(2), step=2)  # and the store takes the next writer
    assert_store_equals(store, *reference[2])


@pytest.mark.slow
def test_two_s3_writers_race_and_exactly_one_commits(s3_server, tmp_path, request):
    place = Place("s3", tmp_path, request)
    params, layout = _kill_layout_params()
    seeds = (101, 202)
    by_step = {1: KILL_SEED}  # the seed of each committed step's gradient
    place.create(params, layout).step(gradients(layout, KILL_SEED)(1), step=1)
    signals = tmp_path / "signals"
    signals.mkdir()
    writers = [
        Writer(place.job(seed, layout, signals), tmp_path / f"writer{seed}.err") for seed in seeds
    ]
    try:
        # Race 1: both opened step 2's arrays; race 2: both wrote all of step 4's chunks.
        for k, hold_at in ((1, "opened"), (3, "stored")):
            pids = [writer.command("fork", k + 1, hold_at=hold_at) for writer in writers]
            for pid, writer in zip(pids, writers, strict=True):  # both prepared step k+1
                wait_for(signals / f"{pid}.held", writer.process)
            (signals / "go").write_text("")  # then both commit at once
            said = [writer.until("exit") for writer in writers]
            for path in signals.iterdir():
                path.unlink()
            assert [lines[-1] for lines in said] == ["exit 0", "exit 0"], said
            outcomes = [[line for line in lines if line.split()[0] not in PHASES] for lines in said]
            lost = [i for i, lines in enumerate(outcomes) if lines[0].startswith("conflict")]
            assert len(lost) == 1, f"not exactly one winner: {said}"
            loser = lost[0]
            winner = 1 - loser
            assert outcomes[winner] == [f"done {k + 1}", "exit 0"], said
            assert f"committed {k + 1}" in " ".join(said[winner])
            # The loser had prepared its step k+1 and never committed it; it reopened, then
            # committed step k+2 on top of the winner's step k+1.
            before = said[loser][: said[loser].index(outcomes[loser][0])]
            assert [line.split()[:2] for line in before][-1] == ["stored", str(k + 1)], said
            assert f"committed {k + 1}" not in " ".join(said[loser])
            assert outcomes[loser][1] == f"done {k + 2}", said
            message = json.loads(outcomes[loser][0].removeprefix("conflict "))
            assert place.location in message
            assert "another writer committed" in message
            assert "nothing of this step was committed" in message
            by_step[k + 1], by_step[k + 2] = seeds[winner], seeds[loser]
    finally:
        for writer in writers:
            writer.close()
    # Each step is its writer's, bit for bit, on top of the steps before it.
    reference = Reference(params, lambda t: gradients(layout, by_step[t])(t))
    store = place.open()
    assert store.step_count == 5
    assert_store_equals(store, *reference[5])
    assert [c.step for c in store.history()] == [5, 4]
    four = xpoptim.OutOfCore.open(place.location, storage_options=place.options, step=4)
    assert_store_equals(four, *reference[4])


@pytest.mark.slow
def test_an_s3_writer_whose_base_step_was_collected_gets_a_conflict(s3_server, tmp_path, request):
    """keep_steps=1: the winner's step expires the base step of the loser, whose chunks the
    garbage collection removes while the loser still has to read them. The loser must be
    told that another writer committed (not that the store cannot be read)."""
    place = Place("s3", tmp_path, request)
    params, layout = _kill_layout_params()
    store = place.create(params, layout, keep_steps=1)
    store.step(gradients(layout, KILL_SEED)(1), step=1)
    signals = tmp_path / "signals"
    signals.mkdir()
    writer = Writer(place.job(202, layout, signals), tmp_path / "writer.err")
    try:
        pid = writer.command("go", 2, hold_at="opened")  # it opened step 1's arrays
        wait_for(signals / f"{pid}.held", writer.process)
        store.step(gradients(layout, 101)(2), step=2)  # step 1 expires and is collected
        (signals / "go").write_text("")
        said = writer.rest()
    finally:
        writer.close()
    assert writer.process.returncode == 0, writer.errors()
    outcomes = [line for line in said if line.split()[0] not in PHASES]
    assert outcomes[0].startswith("conflict"), (said, writer.errors())
    message = json.loads(outcomes[0].removeprefix("conflict "))
    assert place.location in message
    assert "another writer committed" in message
    assert "nothing of this step was committed" in message
    assert outcomes[1] == "done 3"
    by_step = {1: KILL_SEED, 2: 101, 3: 202}
    reference = Reference(params, lambda t: gradients(layout, by_step[t])(t))
    assert_store_equals(place.open(), *reference[3])
