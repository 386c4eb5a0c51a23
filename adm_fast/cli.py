"""The adm-fast command."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="adm-fast", description="A fast, exact engine for ADM.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are built and usable here, and why not")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main
        return info_main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
