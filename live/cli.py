"""The `stemlive` command: dispatches to each folder's own ``cli.py``."""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import version


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stemlive",
        description="Live 4D-STEM analysis: PACBED thickness/tilt and atom positions while the scan runs.",
    )
    ap.add_argument("--version", action="version", version=f"stemlive {version('stemlive')}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import commands, demo, simulator
    from ..simulate import cli as simulate_cli
    from ..simulate import train_cli
    from ..models import cli as models_cli
    from ..models import atoms_cli
    from ..dashboards import cli as dashboard_cli

    demo.add_parser(sub)
    commands.add_parsers(sub)
    simulator.add_parser(sub)
    dashboard_cli.add_parser(sub)
    simulate_cli.add_parsers(sub)
    train_cli.add_parsers(sub)
    models_cli.add_parsers(sub)
    atoms_cli.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .processes import end_children, install_signal_handlers

    args = build_parser().parse_args(argv)
    install_signal_handlers()  # SIGTERM ends a command as Ctrl-C does
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        end_children()
        print(f"{getattr(exc, 'reason', 'interrupted')}; rerun the same command to continue where it stopped",
              file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError) as exc:  # incl. ModelMismatch
        print(f"stemlive {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
