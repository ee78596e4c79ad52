"""The ``functrain`` console command: ``functrain demo`` and ``functrain plot RUN_DIR``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="functrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from functrain import demo

    demo_parser = commands.add_parser("demo", help="train a small GPT on the Python standard library")
    demo.add_arguments(demo_parser)

    plot_parser = commands.add_parser("plot", help="draw a run's loss and metric curves to a PNG")
    plot_parser.add_argument("run_dir", help="the run's output_dir")
    plot_parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "demo":
        from functrain import demo

        demo.main_from_args(ns)
        return 0
    if ns.command == "plot":
        from functrain.io.plot import plot_run

        try:
            print(plot_run(ns.run_dir, ns.out))
        except FileNotFoundError as e:
            print(f"functrain plot: {e}", file=sys.stderr)
            return 2
        return 0
    raise AssertionError(ns.command)


if __name__ == "__main__":
    sys.exit(main())
