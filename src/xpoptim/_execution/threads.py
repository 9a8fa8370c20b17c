"""How many threads the blocked fast path may use, and the small pool that runs it.

The blocked fast path (`xpoptim._execution`) splits one optimizer step into
independent tasks (cache-sized blocks of one parameter, or groups of small parameters)
and runs them from a few threads: NumPy releases the GIL inside its elementwise loops,
so the threads stream memory in parallel.

Never oversubscribe:

* the thread count is capped by the CPUs this process may run on
  (``os.sched_getaffinity``, else ``os.cpu_count()``);
* ``XPOPTIM_NUM_THREADS`` sets it; without it ``OMP_NUM_THREADS`` (the variable that
  threadpoolctl-style tools and job schedulers set to cap every pool in a process) caps it;
  `xpoptim.execution_options` overrides both;
* a task that itself runs inside the pool (an optimizer stepped from a pool thread) runs
  its own tasks serially, never in a nested pool;
* when nobody set the count, `ThreadTuner` uses more than one thread only while
  that measurably pays off (on a machine whose cores other jobs keep busy it does not).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

ENV_VAR = "XPOPTIM_NUM_THREADS"

_local = threading.local()


def available_cpus() -> int:
    """The number of CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _env_threads(var: str, *, strict: bool) -> int | None:
    value = os.environ.get(var, "").strip()
    if not value:
        return None
    try:
        # OMP_NUM_THREADS may be a nested list ("4,2"): its first entry is the outer level.
        number = int(value.split(",")[0])
    except ValueError:
        number = 0
    if number < 1:
        if strict:
            raise ValueError(f"{var} must be a positive integer, got {value!r}")
        return None
    return number


def default_num_threads() -> int:
    """Threads for the fast path when none is asked for: the environment's cap, or every CPU."""
    wanted = _env_threads(ENV_VAR, strict=True)
    if wanted is None:
        wanted = _env_threads("OMP_NUM_THREADS", strict=False)
    cpus = available_cpus()
    return cpus if wanted is None else min(wanted, cpus)


def in_pool_thread() -> bool:
    """Whether the calling thread is running a task of this pool."""
    return bool(getattr(_local, "inside", False))


class _Pool:
    """A lazily started thread pool; the calling thread always works too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._workers = 0
        self._pid = 0

    def _executor_for(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            # A forked child inherits the executor object but not its threads.
            if self._executor is None or self._workers < workers or self._pid != os.getpid():
                old = self._executor if self._pid == os.getpid() else None
                self._executor = ThreadPoolExecutor(workers, thread_name_prefix="xpoptim")
                self._workers, self._pid = workers, os.getpid()
                if old is not None:
                    old.shutdown(wait=False)
            return self._executor

    def run(self, tasks: Sequence[Callable[[], object]], num_threads: int) -> None:
        """Run every task once, from up to ``num_threads`` threads; re-raise the first error."""
        threads = min(num_threads, len(tasks))
        if threads <= 1 or in_pool_thread():
            for task in tasks:
                task()
            return
        position = iter(range(len(tasks)))
        take = threading.Lock()
        failed: list[BaseException] = []

        def work() -> None:
            outer = in_pool_thread()
            _local.inside = True
            try:
                while not failed:
                    with take:
                        index = next(position, None)
                    if index is None:
                        return
                    try:
                        tasks[index]()
                    except BaseException as exc:
                        failed.append(exc)
                        raise
            finally:
                _local.inside = outer

        executor = self._executor_for(threads - 1)
        futures: list[Future[None]] = [executor.submit(work) for _ in range(threads - 1)]
        with contextlib.suppress(BaseException):  # recorded in ``failed``
            work()  # the calling thread works too; then wait for the others
        for future in futures:
            future.exception()
        if failed:
            raise failed[0]


POOL = _Pool()


class ThreadTuner:
    """Chooses, per kind of step, between one thread and the cap, by timing real steps.

    More threads only help when cores are free: on a machine that other jobs keep busy,
    two threads measured up to 2x slower than one here (each NumPy call hands the GIL
    over, and a descheduled thread delays the other). When the thread count is left to
    xpoptim (no ``num_threads``, no ``XPOPTIM_NUM_THREADS``), each kind of step (a rule
    and a size class) first runs once with each choice, then uses the one with the lower
    median time per element over its last few runs, and re-tries the other every
    ``explore_every``-th step, so it follows a changing load. Results never depend on
    the choice: the fast path is bit-identical for any thread count.
    """

    def __init__(self, *, history: int = 5, explore_every: int = 8) -> None:
        self.history = history
        self.explore_every = explore_every
        self._times: dict[Hashable, dict[int, deque[float]]] = {}
        self._steps: dict[Hashable, int] = {}
        self._lock = threading.Lock()  # optimizers may step from several threads

    def choose(self, key: Hashable, cap: int) -> int:
        """The thread count for the next step of kind ``key``, at most ``cap``."""
        if cap <= 1:
            return 1
        with self._lock:
            return self._choose(key, cap)

    def _choose(self, key: Hashable, cap: int) -> int:
        times = self._times.setdefault(key, {})
        step = self._steps[key] = self._steps.get(key, 0) + 1
        for option in (cap, 1):
            if not times.get(option):
                return option
        best = min((1, cap), key=lambda option: statistics.median(times[option]))
        if step % self.explore_every == 0:
            return 1 if best == cap else cap
        return best

    def record(self, key: Hashable, threads: int, seconds_per_element: float) -> None:
        """Remember how long a step of kind ``key`` took with ``threads`` threads."""
        with self._lock:
            times = self._times.setdefault(key, {})
            times.setdefault(threads, deque(maxlen=self.history)).append(seconds_per_element)


TUNER = ThreadTuner()
