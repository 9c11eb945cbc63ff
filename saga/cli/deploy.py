"""``saga deploy``, ``saga definitions`` and ``saga verify``: versions and the deploy gate.

``deploy`` publishes definitions to the definitions topic (`saga.runtime.definitions`), so
that every coordinator can finish the sagas started on them; different content under a
published name and version is refused (exit status 1). ``definitions`` lists what the topic
holds with the number of sagas in flight on each. ``verify`` replays the recorded history of
every saga in flight, and of a sample of finished ones, against new definitions
(`saga.core.verify`) and exits 1 when any decision would differ: the gate a CI job runs before
a deploy.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from saga.cli.common import CliError, client, definitions, out

# The engine's modules are imported by the handlers that use them: the other commands of the
# CLI (`saga coordinator` first) do not load this family's.
if TYPE_CHECKING:
    from saga.core.definition import SagaDefinition
    from saga.core.state import SagaState
    from saga.runtime.catalog import Catalog
    from saga.runtime.client import SagaClient
    from saga.runtime.definitions import Published

__all__ = ["add_commands"]


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds the commands to the ``saga`` parser's subcommands."""
    p = sub.add_parser("deploy", parents=[common], help="publish saga definitions")
    p.add_argument("--app", required=True, help="MODULE:ATTR naming the definitions")
    p.set_defaults(handler=_deploy)

    p = sub.add_parser(
        "definitions", parents=[common], help="list published definitions and their sagas"
    )
    p.set_defaults(handler=_definitions)

    p = sub.add_parser(
        "verify", parents=[common], help="replay sagas against new definitions (a deploy gate)"
    )
    p.add_argument("--app", required=True, help="MODULE:ATTR naming the new definitions")
    p.add_argument(
        "--sample",
        type=int,
        default=20,
        metavar="N",
        help="finished sagas to replay too, the latest first (default: %(default)s)",
    )
    p.set_defaults(handler=_verify)


def _label(d: SagaDefinition, digest: str | None = None) -> str:
    return f"{d.name}@{d.version} ({digest or d.digest})"


async def _deploy(args: argparse.Namespace) -> int:
    from saga.runtime.definitions import DefinitionStore

    found = definitions(args.app)
    async with client(args) as c:
        store = DefinitionStore(c.transport, c.topics)
        result = await store.publish(found)
    data = {
        "new": [{"key": f"{d.name}@{d.version}", "digest": d.digest} for d in result.new],
        "existing": [{"key": f"{d.name}@{d.version}", "digest": d.digest} for d in result.existing],
        "problems": store.problems,
    }
    lines = [f"published      {_label(d)}" for d in result.new]
    lines += [f"already there  {_label(d)}" for d in result.existing]
    lines += [f"left out       {p}" for p in store.problems]
    out(args, data, "\n".join(lines))
    return 0


def _in_flight(state: SagaState) -> bool:
    return not state.is_final


async def _definitions(args: argparse.Namespace) -> int:
    from saga.runtime.definitions import DefinitionStore

    async with client(args) as c:
        store = DefinitionStore(c.transport, c.topics)
        await store.ensure_topic()
        published = await store.read()
        states = [s async for s in c.states() if _in_flight(s)]
    counts = Counter(s.digest or f"{s.name}@{s.version}" for s in states)
    rows = []
    for p in sorted(published, key=lambda p: (p.definition.name, p.definition.version)):
        d = p.definition
        n = counts.get(p.digest, 0) + counts.get(p.key, 0)
        rows.append(
            {
                "name": d.name,
                "version": d.version,
                "digest": p.digest,
                "in_flight": n,
                "published_by": p.published_by,
                "published_at": p.published_at,
            }
        )
    lines = [f"{'NAME':<24} {'VERSION':>7}  {'DIGEST':<16}  {'IN FLIGHT':>9}"]
    lines += [
        f"{r['name']:<24} {r['version']:>7}  {r['digest']:<16}  {r['in_flight']:>9}" for r in rows
    ]
    lines += [f"left out: {p}" for p in store.problems]
    out(args, {"definitions": rows, "problems": store.problems}, "\n".join(lines))
    return 0


async def _verify(args: argparse.Namespace) -> int:
    from saga.core.state import SagaStatus
    from saga.runtime.catalog import Catalog
    from saga.runtime.definitions import DefinitionStore, published_digests

    if args.sample < 0:
        raise CliError(f"--sample {args.sample}: give 0 or more")
    new = Catalog(definitions(args.app))
    async with client(args) as c:
        store = DefinitionStore(c.transport, c.topics)
        await store.ensure_topic()
        published: list[Published] = await store.read()
        # The old definitions: by digest, from the topic and from the new code (unchanged ones).
        old = Catalog(new.all(), published_digests(published))
        states = [s async for s in c.states() if s.name in new.latest]
        live = [s for s in states if _in_flight(s) or s.status is SagaStatus.STUCK]
        done = [s for s in states if s.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)]
        done.sort(key=lambda s: s.started_at, reverse=True)
        chosen = [(s, True) for s in live] + [(s, False) for s in done[: args.sample]]
        reports = []
        for state, in_flight in sorted(chosen, key=lambda x: x[0].saga_id):
            reports.append(await _check(c, old, new, state, in_flight))
    diverged = [r for r in reports if r["divergences"] or r["error"]]
    lines: list[str] = []
    for r in reports:
        where = "in flight" if r["in_flight"] else "finished"
        head = f"{r['saga_id']} ({r['name']}, {where}, {r['old']} -> {r['new']})"
        if r["error"]:
            lines.append(f"FAIL {head}: {r['error']}")
        elif r["divergences"]:
            lines.append(f"FAIL {head}")
            lines += [f"  {d['text']}" for d in r["divergences"]]
        else:
            lines.append(f"ok   {head}")
    summary = (
        f"{len(reports)} sagas replayed ({sum(r['in_flight'] for r in reports)} in flight): "
        f"{len(diverged)} diverge"
    )
    lines.append(summary)
    data = {"checked": len(reports), "diverged": len(diverged), "sagas": reports}
    out(args, data, "\n".join(lines))
    if diverged and not args.json:
        print(f"saga: {summary}: the new definitions would change these sagas", file=sys.stderr)
    return 1 if diverged else 0


async def _check(
    c: SagaClient, old: Catalog, new: Catalog, state: SagaState, in_flight: bool
) -> dict[str, Any]:
    target = new.latest[state.name]
    before = old.for_state(state)
    from saga.core.verify import Divergence, verify

    report: dict[str, Any] = {
        "saga_id": state.saga_id,
        "name": state.name,
        "in_flight": in_flight,
        "old": state.digest or f"{state.name}@{state.version}",
        "new": target.digest,
        "error": None,
        "divergences": [],
    }
    if before is None:
        report["error"] = old.missing(state)
        return report
    if state.digest == target.digest:
        return report  # the same content: nothing can differ
    found: list[Divergence] = verify(before, target, await c.events(state.saga_id))
    report["divergences"] = [
        {"seq": d.seq, "step": d.step, "expected": d.expected, "got": d.got, "text": str(d)}
        for d in found
    ]
    return report
