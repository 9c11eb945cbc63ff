"""``saga contract [--check] [--out DIR]``: write or check the published wire contract.

It writes the JSON Schemas of every message and the AsyncAPI document (`saga.contract`) into
``DIR`` (``contract`` by default: run it from the repository's root). ``--check`` writes
nothing and exits 1, listing what differs, when the files there are not what the code generates
now: CI's way of keeping the checked-in contract current. Neither talks to Kafka.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from saga.cli.common import CliError, out

__all__ = ["add_commands"]


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``contract`` to the ``saga`` parser's subcommands."""
    p = sub.add_parser(
        "contract",
        parents=[common],
        help="write (or --check) the wire contract: JSON Schemas and the AsyncAPI document",
    )
    p.add_argument(
        "--out",
        default="contract",
        metavar="DIR",
        help="the contract directory (default: %(default)s)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files in DIR are not what the code generates",
    )
    p.set_defaults(handler=_contract)


async def _contract(args: argparse.Namespace) -> int:
    # Here, not at the top: the generators (pydantic's schemas of every message, the AsyncAPI
    # document) are for this command only, and the other commands of the CLI should not load them.
    from saga.contract import stale, write

    target = Path(args.out)
    if args.check:
        problems = stale(target)
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise CliError(
                f"the wire contract in {target} is out of date:\n{listed}\n"
                f"run `saga contract --out {target}` and commit the result"
            )
        out(
            args, {"current": True, "out": str(target)}, f"the wire contract in {target} is current"
        )
        return 0
    written, removed = write(target)
    lines = [f"wrote {p}" for p in written] + [f"removed {p}" for p in removed]
    text = "\n".join(lines) or f"the wire contract in {target} is current"
    out(args, {"written": written, "removed": removed, "out": str(target)}, text)
    return 0
