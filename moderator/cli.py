"""The ``moderator`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moderator import stack


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moderator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stack.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
