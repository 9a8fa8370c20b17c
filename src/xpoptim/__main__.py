"""Command line of xpoptim.

``python -m xpoptim demo [--backend B] [--steps N] [--out DIR]`` trains a small MLP with
SGD, RMSprop and Adam; ``python -m xpoptim demo --out-of-core DIR --size 3GB
[--max-memory 1GiB]`` runs Adam out of core on a synthetic parameter set of that size.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ._demo import BACKEND_MODULES, run_demo


def _size(text: str) -> int:
    """A size argument (``3GB``, ``512MiB``); a bad one is a usage error."""
    from ._outofcore_demo import size_argument

    return size_argument(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpoptim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small MLP with SGD, RMSprop and Adam and plot the loss curves"
    )
    demo.add_argument("--backend", default="numpy", choices=sorted(BACKEND_MODULES))
    demo.add_argument(
        "--steps", type=int, default=None, help="steps (default 300; 3 with --out-of-core)"
    )
    demo.add_argument("--samples", type=int, default=900, help="data set size (default 900)")
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
    ooc.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar per step (default: when stderr is a terminal)",
    )
    args = parser.parse_args(argv)
    if args.out_of_core:
        from ._outofcore_demo import run_cli

        return run_cli(demo, args.out_of_core, args.size, args)
    run_demo(
        args.backend, steps=args.steps or 300, samples=args.samples, seed=args.seed, out=args.out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
