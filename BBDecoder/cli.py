"""Command line: ``bbdecoder`` / ``python -m BBDecoder``.

``bbdecoder demo [--out DIR] [--epochs N]`` trains a small CNN on drawn shapes with every
analysis on and writes the report; ``bbdecoder report SAVE_PATH`` (re)builds ``report.html``
for a folder a ``Master_analyzer`` wrote to, in this process or an earlier one;
``bbdecoder compare RUN_A RUN_B [...] --out DIR`` writes ``DIR/compare.html``, the runs side by side.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ._version import __version__
from .errors import BBDecoderError


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bbdecoder`` (subcommands ``demo``, ``report`` and ``compare``)."""
    from .demo import DEFAULT_OUT

    parser = argparse.ArgumentParser(prog="bbdecoder", description="See inside a PyTorch model while it trains.")
    parser.add_argument("--version", action="version", version=f"BBDecoder {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on drawn shapes (CPU, 1-2 minutes) and write the report",
        description="Train a small CNN on procedurally drawn shapes (nothing is downloaded), run every "
        "analysis, write report.html and print its path and the accuracy per epoch.",
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"output folder (default: {DEFAULT_OUT}; a fresh DIR-1, DIR-2… if DIR is not empty)",
    )
    demo.add_argument("--epochs", type=_at_least(1), default=5, metavar="N", help="training epochs (default: 5)")
    demo.add_argument(
        "--samples", type=_at_least(100), default=3000, metavar="N", help="training images (default: 3000)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed of data and model (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    report = commands.add_parser(
        "report",
        help="write report.html for a save_path",
        description="Build the static HTML report of a folder a Master_analyzer wrote to, and print its path.",
    )
    report.add_argument("save_path", metavar="SAVE_PATH", help="the folder given to Master_analyzer")
    report.add_argument("--title", default=None, help="page title (default: 'BBDecoder report: <model>')")

    compare = commands.add_parser(
        "compare",
        help="write compare.html: several save_paths side by side",
        description="Overlay two or more runs (folders Master_analyzer wrote to) on one static page: gradient "
        "norms, update ratios, activation health, weight evolution and alerts, layers matched by name.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="the save_path folders to compare (two or more)")
    compare.add_argument("--out", required=True, metavar="DIR", help="folder for compare.html (created if missing)")
    compare.add_argument("--names", nargs="+", default=None, metavar="NAME", help="a name per run (default: folders)")
    compare.add_argument("--title", default=None, help="page title")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, epochs=args.epochs, samples=args.samples, seed=args.seed, progress=not args.no_progress)
        elif args.command == "report":
            from .report import build_report

            print(build_report(args.save_path, title=args.title))
        elif args.command == "compare":
            from .report.compare import compare_runs

            print(compare_runs(args.runs, args.out, names=args.names, title=args.title))
    except BBDecoderError as error:
        print(f"bbdecoder {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bbdecoder {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
