"""The README's code, run for real, the way a newcomer would paste it.

The rules, which README.md relies on:

- Every ```` ```python ```` block of README.md runs, in the README's order, in one shared
  namespace, like the cells of one notebook: later blocks use the names earlier ones define
  (``order``, ``payment``, ``restaurant``...).
- A block is illustrative only, and skipped, when the first non-blank line after its closing
  fence is exactly ``<!-- not run -->``. Nothing else skips a block: `test_the_blocks_are_found`
  pins which blocks are skipped, so a new one cannot be skipped silently.
- ``psp``, the README's stand-in for the user's payment provider, is injected as a fake that
  records charges and refunds.
- A block naming the README's broker address ``127.0.0.1:9092`` runs against the session's
  Kafka (the ``bootstrap`` fixture): the address is replaced with the session broker's and every
  ``prefix="saga"`` with a prefix unique to the run. Both substitutions must apply, or the test
  fails rather than reach for a broker on 9092 or share topics with another run.
- A block that defines ``async def test_*`` functions has them called, as pytest would.
- Blocks run in a temporary working directory (the participant's SQLite file lands there),
  with ``OTEL_TRACES_EXPORTER=none`` and ``OTEL_METRICS_EXPORTER=none``: there is no collector
  here, and the README's observer is built from those variables.
- An exception in any block fails the test; its traceback points at README.md's own lines.
"""

from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from saga import SagaStatus, StepStatus

README = Path(__file__).resolve().parents[2] / "README.md"
NOT_RUN = "<!-- not run -->"
BROKER = "127.0.0.1:9092"
PREFIX = 'prefix="saga"'


@dataclass(frozen=True)
class Block:
    line: int
    """The README line of the block's first line of code (1-based)."""
    source: str
    run: bool

    @property
    def uses_broker(self) -> bool:
        return BROKER in self.source


def readme_blocks(path: Path = README) -> list[Block]:
    """Every ```python block of README.md, with whether it is run (see the module docstring)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        start = i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"README.md:{i + 1}: the python block is never closed"
        after = next((text.strip() for text in lines[end + 1 :] if text.strip()), "")
        blocks.append(Block(start + 1, "\n".join(lines[start:end]) + "\n", after != NOT_RUN))
        i = end + 1
    return blocks


@dataclass
class FakePsp:
    """The README's ``psp``: a payment provider that remembers what it was asked."""

    charges: dict[str, float] = field(default_factory=dict)
    refunds: list[str] = field(default_factory=list)

    async def charge(self, amount: float, *, idempotency_key: str) -> str:
        self.charges[idempotency_key] = amount
        return f"ch-{idempotency_key}"

    async def refund(self, charge_id: str, *, idempotency_key: str) -> None:
        self.refunds.append(charge_id)


def against(block: Block, bootstrap: str, prefix: str) -> str:
    """The block's code aimed at the session broker under ``prefix``."""
    source = block.source
    assert PREFIX in source, (
        f"README.md:{block.line}: a block using the broker must pass {PREFIX} wherever a prefix "
        "goes, so that the test can give it a prefix of its own"
    )
    source = source.replace(f'"{BROKER}"', f'"{bootstrap}"').replace(PREFIX, f'prefix="{prefix}"')
    assert BROKER not in source, f"README.md:{block.line}: {BROKER} left after substitution"
    return source


def run_block(block: Block, source: str, namespace: dict[str, Any]) -> None:
    """Runs one block, then any ``async def test_*`` it defined; errors point at README.md."""
    before = set(namespace)
    # Leading newlines make the traceback's line numbers the README's own.
    code = compile("\n" * (block.line - 1) + source, str(README), "exec")
    exec(code, namespace)
    for name in sorted(set(namespace) - before):
        fn = namespace[name]
        if name.startswith("test_") and inspect.iscoroutinefunction(fn):
            anyio.run(fn)


@pytest.fixture
def namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    return {"__name__": "readme", "psp": FakePsp()}


def test_the_blocks_are_found() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 5, "the tour's python blocks are missing from README.md"
    skipped = [b for b in blocks if not b.run]
    # Illustrative blocks, each marked `<!-- not run -->`: the operator's retry-and-wait needs a
    # stuck saga. A new skip must be added here, on purpose.
    assert [b.source.split("\n")[0] for b in skipped] == ["seq = await coordinator.retry(saga_id)"]
    on_broker = [b for b in blocks if b.run and b.uses_broker]
    assert len(on_broker) == 1, "exactly one block (section 3's in-process run) uses the broker"
    assert any("def test_" in b.source for b in blocks if b.run), "the harness block is missing"
    for b in blocks:
        if b.run:
            compile(b.source, f"README.md:{b.line}", "exec")  # no top-level await in a run block


def test_the_blocks_without_a_broker_run(namespace: dict[str, Any]) -> None:
    """Definition, participants, interceptor and the harness test: no Kafka needed."""
    for block in readme_blocks():
        if block.run and not block.uses_broker:
            run_block(block, block.source, namespace)
    psp: FakePsp = namespace["psp"]
    # The harness test refused the order at the restaurant: charged once, refunded once.
    assert len(psp.charges) == 1
    assert psp.refunds == [f"ch-{key}" for key in psp.charges]


@pytest.mark.kafka
@pytest.mark.timeout(150)
def test_every_block_runs_and_the_in_process_saga_completes_on_kafka(
    bootstrap: str, namespace: dict[str, Any]
) -> None:
    prefix = f"readme-{uuid.uuid4().hex[:8]}"
    for block in readme_blocks():
        if not block.run:
            continue
        source = against(block, bootstrap, prefix) if block.uses_broker else block.source
        run_block(block, source, namespace)
        if block.uses_broker:
            state = namespace.get("state")
            assert state is not None, f"README.md:{block.line}: the block leaves no `state`"
            assert state.status is SagaStatus.COMPLETED, state
            assert {n: s.status for n, s in state.steps.items()} == dict.fromkeys(
                ("payment", "restaurant", "rider", "cook", "notify"), StepStatus.SUCCEEDED
            )
            psp: FakePsp = namespace["psp"]
            ((key, amount),) = psp.charges.items()
            assert amount == 12
            assert state.steps["payment"].output == {"charge_id": f"ch-{key}"}
            assert psp.refunds == []


def test_the_skip_rule_is_exact(tmp_path: Path) -> None:
    text = (
        "```python\nx = 1\n```\n\n<!-- not run -->\n"
        "```python\ny = 2\n```\n<!-- not run, but a comment -->\n"
        "```python\nz = 3\n```\n"
    )
    fake = tmp_path / "README.md"
    fake.write_text(text)
    assert [(b.line, b.run) for b in readme_blocks(fake)] == [(2, False), (7, True), (11, True)]


def test_a_failing_block_fails_and_points_at_its_readme_line() -> None:
    block = Block(40, "raise RuntimeError('boom')\n", True)
    with pytest.raises(RuntimeError, match="boom") as caught:
        run_block(block, block.source, {})
    frame = caught.traceback[-1]
    assert Path(str(frame.path)) == README
    assert frame.lineno + 1 == 40  # pytest's lineno is 0-based


def test_substitution_refuses_a_block_it_cannot_aim() -> None:
    block = Block(1, f'KafkaTransport("{BROKER}")\nCoordinator([], transport=t)\n', True)
    with pytest.raises(AssertionError, match="prefix"):
        against(block, "127.0.0.1:1", "p")
    ok = Block(1, f't = KafkaTransport("{BROKER}")\nc(t, {PREFIX})\n', True)
    assert (
        against(ok, "127.0.0.1:1", "p") == 't = KafkaTransport("127.0.0.1:1")\nc(t, prefix="p")\n'
    )
