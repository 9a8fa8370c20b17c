"""Command line of xpoptim.

``python -m xpoptim demo [--backend B] [--steps N] [--out DIR] [--no-progress]`` trains a
small MLP with SGD, RMSprop and Adam; ``python -m xpoptim demo --out-of-core DIR --size 3GB
[--max-memory 1GiB]`` runs Adam out of core on a synthetic parameter set of that size.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ._demo import BACKENDS, BackendUnavailable, run_demo


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _size(text: str) -> int:
    """A size argument (``3GB``, ``512MiB``); a bad one is a usage error."""
    from ._outofcore.demo import size_argument

    return size_argument(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpoptim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small MLP with SGD, RMSprop and Adam and plot the loss curves"
    )
    demo.add_argument("--backend", default="numpy", choices=sorted(BACKENDS))
    demo.add_argument(
        "--steps", type=_at_least(1), default=None, help="steps (default 300; 3 with --out-of-core)"
    )
    demo.add_argument(
        "--samples", type=_at_least(3), default=900, help="data set size (default 900)"
    )
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr: steps done, or a progress bar per out-of-core step "
        "(default: when stderr is a terminal)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo-out", help="folder for the PNG (default demo-out)")
    ooc = demo.add_argument_group("out of core (needs xpoptim[dask])")
    ooc.add_argument("--out-of-core", metavar="DIR", help="run Adam out of core in DIR")
    ooc.add_argument(
        "--size", type=_size, default="3GB", help="parameters + state + gradient (default 3GB)"
    )
    ooc.add_argument("--max-memory", type=_size, help="hard cap on the address space, e.g. 1GiB")
    ooc.add_argument(
        "--chunk-size", type=_size, default="16MiB", help="Zarr chunk size (default 16MiB)"
    )
    ooc.add_argument("--threads", type=int, default=None, help="Dask threads (default: cores)")
    args = parser.parse_args(argv)
    if args.out_of_core:
        from ._outofcore.demo import run_cli

        return run_cli(demo, args.out_of_core, args.size, args)
    try:
        run_demo(
            args.backend,
            steps=args.steps or 300,
            samples=args.samples,
            seed=args.seed,
            out=args.out,
            progress=args.progress,
        )
    except BackendUnavailable as exc:
        print(f"{parser.prog} demo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
