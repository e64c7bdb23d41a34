"""Command line: ``xpnet info`` (and ``python -m xpnet``)."""

from __future__ import annotations

import argparse
import platform
import sys

from . import __version__
from .backend import available_backends


def _info(args: argparse.Namespace) -> int:
    print(f"xpnet {__version__} (Python {platform.python_version()}, {platform.platform()})")
    print("backends:")
    for entry in available_backends():
        version = entry["version"] or "not installed"
        devices = ", ".join(entry["devices"]) or "-"
        line = f"  {entry['library']:<17} {version:<14} devices: {devices}"
        if entry["note"]:
            line += f"  ({entry['note']})"
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpnet",
        description="Backprop layers on any Array API backend (NumPy, CuPy, torch, array_api_strict).",
    )
    parser.add_argument("--version", action="version", version=f"xpnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print the version, the backends found and their devices")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
