"""``saga keys new|list|remove`` and ``saga policy check``: the signing keys, the keyring of
trusted public keys, and the authorization policy (`saga.runtime.trust`, `saga.core.policy`).

None of them talks to Kafka. ``keys new`` writes a private key file (mode 0600) and adds its
public key to the keyring, creating the keyring when it does not exist; hand each key file to
its principal's process only (``SAGA_SIGNING_KEY``), and the keyring to every process
(``SAGA_KEYRING``). Rotating a key: ``keys new`` with the same principal (a new key id; with
``--out`` another directory, or ``--force`` to replace the key file), move the process to the
new key, and ``keys remove`` the old id once the messages it signed have drained.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from saga.cli.common import CliError, definitions, out
from saga.errors import UsageError
from saga.runtime.trust import Keyring, TrustError, load_policy, new_key

__all__ = ["add_commands"]


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``keys`` and ``policy`` to the ``saga`` parser's subcommands."""
    # --keyring (default $SAGA_KEYRING) comes with the common options: `keys new` adds the
    # public key to it (creating it; without one, the entry is printed), the others read it.
    keys = sub.add_parser("keys", help="create, list and remove message signing keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "new",
        parents=[common],
        help="create a principal's signing key and add its public key to the keyring",
    )
    p.add_argument("principal")
    p.add_argument("--key-id", help="the key's id (default: PRINCIPAL-DATE-RANDOM)")
    p.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="where to write PRINCIPAL.key (default: the current directory)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace PRINCIPAL.key if it exists (rotation)"
    )
    p.set_defaults(handler=_new)

    p = actions.add_parser("list", parents=[common], help="list the keyring's keys")
    p.set_defaults(handler=_list)

    p = actions.add_parser("remove", parents=[common], help="remove a key from the keyring")
    p.add_argument("key_id")
    p.set_defaults(handler=_remove)

    p = actions.add_parser(
        "data-key",
        parents=[common],
        help="create a payload key file, or rotate it: add a new key and make it current",
    )
    p.add_argument("file", help="the key file (SAGA_PAYLOAD_KEYS of the processes)")
    p.add_argument("--key-id", help="the new key's id (default: k<N+1>)")
    p.set_defaults(handler=_data_key)

    policy = sub.add_parser("policy", help="check an authorization policy file")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "check",
        parents=[common],
        help="validate a policy file against the keyring (and the definitions, with --app)",
    )
    p.add_argument("file")
    p.add_argument(
        "--app", help="MODULE:ATTR naming the definitions: check saga names and services too"
    )
    p.set_defaults(handler=_check)


# The handlers are async (the CLI's `Handler`) but only touch small local files: each calls a
# synchronous function that does the work.


async def _new(args: argparse.Namespace) -> int:
    return _new_key(args)


async def _list(args: argparse.Namespace) -> int:
    return _list_keys(args)


async def _remove(args: argparse.Namespace) -> int:
    return _remove_key(args)


async def _check(args: argparse.Namespace) -> int:
    return _check_policy(args)


async def _data_key(args: argparse.Namespace) -> int:
    from saga.adapters.sealing import KeyFileError, new_data_key_file

    try:
        key_id = new_data_key_file(args.file, args.key_id)
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    data = {"file": str(args.file), "current": key_id}
    out(
        args,
        data,
        f"{args.file}: key {key_id} is now current (older keys kept to open older records)",
    )
    return 0


def _keyring_path(args: argparse.Namespace) -> Path:
    found = args.keyring or os.environ.get("SAGA_KEYRING")
    if not found:
        raise CliError("no keyring: pass --keyring FILE or set SAGA_KEYRING")
    return Path(found)


def _load_keyring(path: Path) -> Keyring:
    try:
        return Keyring.load(path)
    except TrustError as exc:
        raise CliError(str(exc)) from None


def _new_key(args: argparse.Namespace) -> int:
    from saga.core.policy import valid_name

    if not valid_name(args.principal):
        raise CliError(
            f"{args.principal!r} is not a valid principal: use letters, digits and . _ - @"
        )
    if args.key_id is not None and not valid_name(args.key_id):
        raise CliError(f"--key-id {args.key_id!r}: use letters, digits and . _ - @")
    out_dir = Path(args.out)
    if not out_dir.is_dir():
        raise CliError(f"--out {out_dir}: no such directory")
    key_file = out_dir / f"{args.principal}.key"
    found = args.keyring or os.environ.get("SAGA_KEYRING")
    ring_path = Path(found) if found else None
    ring = None
    if ring_path is not None:
        ring = _load_keyring(ring_path) if ring_path.exists() else Keyring(source=str(ring_path))
        if args.key_id is not None and args.key_id in ring:
            raise CliError(f"key id {args.key_id!r} is in keyring {ring_path} already")
    key = new_key(args.principal, args.key_id)
    try:
        # The keyring first: a key file whose public key is nowhere would sign messages that
        # every process refuses.
        if ring is not None and ring_path is not None:
            ring.with_key(key.public_entry()).save(ring_path)
        key.save(key_file, overwrite=args.force)
    except (TrustError, OSError, UsageError) as exc:
        if ring is not None and ring_path is not None and ring_path.exists():
            ring.save(ring_path)  # as it was
        hint = " (or pass --force to replace it)" if isinstance(exc, TrustError) else ""
        raise CliError(f"{exc}{hint}") from None
    entry = key.public_entry()
    data = {
        "principal": key.principal,
        "key_id": key.key_id,
        "key_file": str(key_file),
        "keyring": str(ring_path) if ring_path else None,
        "public_key": entry.public_key_b64,
    }
    text = f"wrote {key_file} (principal {key.principal!r}, key id {key.key_id!r}, mode 0600)\n"
    if ring_path is not None:
        text += f"added its public key to keyring {ring_path}\n"
    else:
        text += (
            "no keyring given: add this entry under `keys:` in the keyring file\n"
            f"  {key.key_id}:\n    principal: {key.principal}\n"
            f"    public_key: {entry.public_key_b64}\n"
        )
    out(args, data, text)
    return 0


def _list_keys(args: argparse.Namespace) -> int:
    from rich.table import Table

    path = _keyring_path(args)
    ring = _load_keyring(path)
    rows = [
        {"key_id": e.key_id, "principal": e.principal, "public_key": e.public_key_b64}
        for e in ring.entries()
    ]
    text = "\n".join(f"{r['key_id']}\t{r['principal']}" for r in rows) or f"no keys in {path}"
    table = Table(header_style="bold", caption=f"{len(rows)} keys in {path}")
    table.add_column("key id")
    table.add_column("principal")
    table.add_column("public key", overflow="fold")
    for r in rows:
        table.add_row(r["key_id"], r["principal"], r["public_key"])
    out(args, {"keyring": str(path), "keys": rows}, text, table)
    return 0


def _remove_key(args: argparse.Namespace) -> int:
    path = _keyring_path(args)
    ring = _load_keyring(path)
    try:
        smaller = ring.without_key(args.key_id)
    except UsageError as exc:
        raise CliError(str(exc)) from None
    removed = ring.get(args.key_id)
    assert removed is not None
    smaller.save(path)
    left = [e.key_id for e in smaller.entries() if e.principal == removed.principal]
    text = f"removed key {args.key_id!r} of {removed.principal!r} from {path}"
    if not left:
        text += f"; {removed.principal!r} has no key left, so its messages will all be refused"
    data = {
        "keyring": str(path),
        "removed": args.key_id,
        "principal": removed.principal,
        "keys_left": left,
    }
    out(args, data, text)
    return 0


def _check_policy(args: argparse.Namespace) -> int:
    from saga.core.policy import PolicyError, check_policy

    ring = _load_keyring(_keyring_path(args))
    try:
        policy = load_policy(args.file)
        saga_names = services = None
        if args.app:
            found = definitions(args.app)
            saga_names = {d.name for d in found}
            services = {s for d in found for s in d.services}
        check_policy(
            policy, known_principals=ring.principals(), saga_names=saga_names, services=services
        )
    except (TrustError, PolicyError) as exc:
        raise CliError(str(exc)) from None
    data = {
        "policy": args.file,
        "ok": True,
        "rules": len(policy.rules),
        "principals": sorted(policy.principals()),
        "checked_against_definitions": bool(args.app),
    }
    against = " and the definitions" if args.app else ""
    text = f"policy {args.file} is valid ({len(policy.rules)} rules) against the keyring{against}"
    out(args, data, text)
    return 0
