"""Writer processes for the out-of-core tests, and the in-memory reference they must match.

`Writer` runs `WRITER` in a fresh interpreter (``subprocess``): it opens a store (a local
path or a URL with ``storage_options``), steps it with the deterministic gradients of
`xpoptim._outofcore.demo.synthetic_arrays`, reports every phase of every step on stdout
(``chunk_step._phase_hook``), and can kill itself at a phase or hold there until told to
go on. It can also fork such writers one after another from itself, which it does while
it is still single-threaded, so a kill trial costs a fork, not an interpreter start.
`Reference` is the in-memory optimizer's ``update`` on NumPy copies, step after step.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import xpoptim
from test_outofcore import fields
from xpoptim._outofcore.demo import synthetic_arrays

#: The phases of an Icechunk step (``transactional.py`` calls the hook with these).
PHASES = ("locked", "opened", "stored", "committed", "collected")


#: A writer process. argv[1]: JSON {location, options, seed, layout, signals}. It imports
#: everything, compiles the chunk kernels and says "ready" and its number of threads; then
#: it reads commands "VERB UNTIL KILL_AT HOLD_AT" on stdin. "go": open the store and step
#: it to UNTIL with the gradients of its seed, then exit. "fork": do that in a forked child
#: (forked while this process is still single-threaded: no thread, no Icechunk runtime,
#: no event loop yet), say "exit CODE" when it ends, and wait for the next command. A
#: stepping process says "pid PID" first, then "PHASE STEP SECONDS" at each phase of each
#: step (seconds since the step took the store), kills itself with SIGKILL at phase
#: KILL_AT (once it has said it), and at phase HOLD_AT of its first step writes
#: SIGNALS/PID.held and waits for SIGNALS/go. A step refused with ConcurrentWriterError
#: is reported ("conflict" and the message as JSON); the writer then reopens the store and
#: commits one step of its own on top of the winner's.
WRITER = r"""
import json, os, select, signal, sys, time, traceback
from pathlib import Path
import numpy as np
import dask.array, icechunk, icechunk.dask, zarr
import xpoptim, xpoptim._outofcore.chunk_step as cs, xpoptim._outofcore.transactional
from xpoptim._outofcore.demo import synthetic_arrays
job = json.loads(sys.argv[1])
def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\n").encode())
optimizer = xpoptim.Adam(learning_rate=0.01)
for name, m in job["layout"].items():  # compile the step's kernels before the clock starts
    chunk = np.zeros(m["chunks"], m["dtype"])
    cs._update_chunk(chunk, chunk, chunk, chunk.copy(), optimizer=optimizer, param=name, step=1)
def run(until, kill_at, hold_at):
    say("pid", os.getpid())
    start, held, step = 0.0, False, 0
    def hook(phase):
        nonlocal start, held
        if phase == "locked":
            start = time.monotonic()
        say(phase, step, round(time.monotonic() - start, 4))
        if phase == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if phase == hold_at and not held:
            held = True
            signals = Path(job["signals"])
            (signals / f"{os.getpid()}.held").write_text(phase)
            while not (signals / "go").exists():
                time.sleep(0.005)
    cs._phase_hook = hook
    def open_store():
        where, options = job["location"], job["options"]
        return xpoptim.OutOfCore.open(where, storage_options=options, num_workers=2)
    def grads(t):
        return synthetic_arrays(job["layout"], job["seed"], t)
    store = open_store()
    try:
        for step in range(store.step_count + 1, until + 1):
            store.step(grads(step), step=step)
    except xpoptim.ConcurrentWriterError as exc:
        say("conflict", json.dumps(str(exc)))
        store = open_store()
        step = store.step_count + 1
        store.step(grads(step), step=step)
    say("done", store.step_count)
say("ready", len(os.listdir("/proc/self/task")))
buffer = b""
def command(*others):  # the next command's words; None if one of others is readable first
    global buffer
    while b"\n" not in buffer:
        if 0 not in select.select([0, *others], [], [])[0]:
            return None
        data = os.read(0, 4096)
        if not data:
            sys.exit(0)
        buffer += data
    line, buffer = buffer.split(b"\n", 1)
    return line.decode().split()
while words := command():
    if words[0] == "kill":  # it came after its writer ended
        continue
    verb, until, kill_at, hold_at = words
    if verb == "go":
        run(int(until), kill_at, hold_at)
        break
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run(int(until), kill_at, hold_at)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    # "kill" kills the writer while it runs: not reaped yet, its pid cannot be reused.
    child = os.pidfd_open(pid)
    while (words := command(child)) is not None:
        if words[0] == "kill":
            os.kill(pid, signal.SIGKILL)
            break
    os.close(child)
    say("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


class Writer:
    """A writer process (see `WRITER`), its stdout read line by line."""

    def __init__(self, job: dict[str, Any], stderr: Path) -> None:
        self.stderr = stderr
        with stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", WRITER, json.dumps(job)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                bufsize=0,
                env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},  # no BLAS thread pool
            )
        self._buffer = b""
        self.threads: int | None = None

    def line(self, timeout: float = 60) -> str:
        """The next line it says ('' when it exited without one)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"the writer said nothing for {timeout} s: {self.errors()}")
            if select.select([self.process.stdout], [], [], left)[0]:
                data = os.read(self.process.stdout.fileno(), 4096)
                if not data:
                    return ""
                self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def command(self, verb: str, until: int, kill_at: str = "-", hold_at: str = "-") -> int:
        """Send a command (the first waits for "ready"); the pid of the stepping process."""
        if self.threads is None:
            said = self.line().split()
            assert said[0] == "ready", (said, self.errors())
            self.threads = int(said[1])
        assert self.process.stdin is not None
        self.process.stdin.write(f"{verb} {until} {kill_at} {hold_at}\n".encode())
        self.process.stdin.flush()
        said = self.line().split()
        assert said[0] == "pid", (said, self.errors())
        return int(said[1])

    def until(self, word: str) -> list[str]:
        """Its lines up to the first that starts with ``word``, that one last."""
        lines = [self.line()]
        while lines[-1].split(" ", 1)[0] != word:
            assert lines[-1], f"it exited before saying {word!r}: {lines} {self.errors()}"
            lines.append(self.line())
        return lines

    def kill_writer(self) -> None:
        """SIGKILL the writer it forked (if still running)."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"kill\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def close(self) -> None:
        """Kill it (if still running), reap it and close its pipes."""
        self.kill()
        self.process.wait(30)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def rest(self) -> list[str]:
        """Every line it says until it exits."""
        lines = []
        while line := self.line():
            lines.append(line)
        self.process.wait(60)
        return lines

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]


class Reference:
    """The in-memory optimizer on NumPy copies: ``ref[k]`` = (params, buffers) after k
    steps with the gradients ``grads(t)``."""

    def __init__(self, params: dict[str, np.ndarray], grads: Callable[[int], dict]) -> None:
        self.optimizer = xpoptim.Adam(learning_rate=0.01)
        self.grads = grads
        self.params = {k: v.copy() for k, v in params.items()}
        self.state = self.optimizer.init(self.params)
        self.history = [self._copy()]

    def _copy(self) -> tuple[dict, dict]:
        buffers = {
            f: {k: v.copy() for k, v in getattr(self.state, f).items()} for f in fields(self.state)
        }
        return {k: v.copy() for k, v in self.params.items()}, buffers

    def __getitem__(self, k: int) -> tuple[dict, dict]:
        while len(self.history) <= k:
            g = self.grads(len(self.history))
            self.params, self.state = self.optimizer.update(self.params, g, self.state)
            self.history.append(self._copy())
        return self.history[k]


def gradients(layout: dict[str, Any], seed: int) -> Callable[[int], dict]:
    return lambda t: {k: v.compute() for k, v in synthetic_arrays(layout, seed, t).items()}
