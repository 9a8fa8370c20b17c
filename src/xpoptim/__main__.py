"""Command line: ``python -m xpoptim demo [--backend B] [--steps N] [--out DIR]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ._demo import BACKEND_MODULES, run_demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpoptim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small MLP with SGD, RMSprop and Adam and plot the loss curves"
    )
    demo.add_argument("--backend", default="numpy", choices=sorted(BACKEND_MODULES))
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--samples", type=int, default=900, help="data set size (default 900)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo-out", help="folder for the PNG (default demo-out)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args.backend, steps=args.steps, samples=args.samples, seed=args.seed, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
