"""`DefinitionStore`: every saga definition ever deployed, in a compacted topic.

Theory of operation
-------------------
A saga finishes on the exact definition it started on (its `SagaState.digest`), even after
the code that defined it is gone. So every definition a coordinator runs, or ``saga deploy``
publishes, is written to ``<prefix>.definitions`` (`saga.runtime.ports.Topics.definitions`),
one record per ``name@version``: its plain data (`SagaDefinition.to_dict`), its digest, who
published it and when. Every coordinator reads the whole topic when it starts and can then
decide any saga whose definition was ever published (`saga.runtime.catalog.Catalog`).

A name and version name one content for good: publishing another content under them is
refused (`DefinitionError`, naming the saga, the version and both digests), and publishing the
same again writes nothing. Two publishers racing on one key are settled by the log's order:
the first record of a key wins; the loser finds out when it reads back what it wrote, is
refused, and writes the winner's record again, so that compaction (which keeps the last
record of a key) keeps the winner.

Python-only models (``input_model``, ``output_model``) are not plain data: a definition loaded
from the topic has none, so it checks neither inputs nor outputs against them. Its digest as
recorded still names the content it was published with (the models' JSON schemas are part of
the digest, `SagaDefinition.digest`), which is why `Published` carries the digest as recorded
rather than recomputing it. A coordinator's own definitions, with their models, take
precedence over the topic's copies of them.

A record that does not parse, whose content does not match its digest, or that contradicts an
earlier record of its key is reported (logged, and listed in `DefinitionStore.problems`) and
left out; it stops nothing.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from saga.core.definition import SagaDefinition
from saga.errors import DefinitionError
from saga.runtime.ports import Clock, Outgoing, SystemClock, Topics, Transport

__all__ = [
    "DefinitionRecord",
    "DefinitionStore",
    "PublishResult",
    "Published",
    "definition_key",
    "published_digests",
]

log = logging.getLogger("saga.definitions")


def definition_key(name: str, version: int) -> str:
    """The definitions topic's key of one version of a saga: ``name@version``."""
    return f"{name}@{version}"


class DefinitionRecord(BaseModel):
    """The value of one record of the definitions topic (JSON)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    version: int
    digest: str
    """`SagaDefinition.digest` of the definition as published (with its Python-only models)."""
    definition: dict[str, object]
    """`SagaDefinition.to_dict`: loadable again by `SagaDefinition.from_dict`."""
    models: list[str] = []
    """The Python-only models it had (``input_model``, ``steps.NAME.output_model``, ...),
    which the topic cannot hold: their schemas are in the digest, so a copy without them
    hashes differently."""
    published_by: str | None = None
    published_at: float


@dataclass(frozen=True, slots=True)
class Published:
    """A definition as read from the topic."""

    definition: SagaDefinition
    """Without Python-only models (see the module docstring)."""
    digest: str
    """The digest it was published under: the one sagas started on it recorded."""
    published_by: str | None
    published_at: float
    models: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """``name@version``."""
        return definition_key(self.definition.name, self.definition.version)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What `DefinitionStore.publish` did."""

    new: list[SagaDefinition] = field(default_factory=list)
    """Written now."""
    existing: list[SagaDefinition] = field(default_factory=list)
    """Already in the topic with the same digest: nothing written."""


class DefinitionStore:
    """Reads and publishes the definitions topic of one prefix.

    Args:
        transport: The broker.
        topics: The topic names (its ``definitions`` topic is used).
        clock: Time source for ``published_at``.
    """

    def __init__(self, transport: Transport, topics: Topics, *, clock: Clock | None = None):
        self.transport = transport
        self.topics = topics
        self.clock = clock or SystemClock()
        self.problems: list[str] = []
        """What the latest read left out, one line each."""
        self._raw: dict[str, bytes] = {}

    async def ensure_topic(self) -> None:
        """Creates the definitions topic (compacted, one partition) if it is missing."""
        t = self.topics.definitions
        await self.transport.ensure_topics([t], 1, compacted=[t])

    async def read(self) -> list[Published]:
        """Every definition in the topic, the first valid record of each key (see the module
        docstring); what is left out is in `problems`."""
        self.problems = []
        found: dict[str, Published] = {}
        raw: dict[str, bytes] = {}
        topic = self.topics.definitions
        for partition in range(await self.transport.partitions(topic)):
            async for record in self.transport.read(topic, partition):
                where = f"{topic}/{partition}@{record.offset}"
                if record.value is None:
                    continue  # a tombstone: nobody deletes definitions, but it is harmless
                item = self._parse(where, record.key, record.value)
                if item is None:
                    continue
                first = found.get(item.key)
                if first is None:
                    found[item.key] = item
                    raw[item.key] = record.value
                elif first.digest != item.digest:
                    self._problem(
                        f"{where}: saga {item.definition.name!r}, version "
                        f"{item.definition.version}: digest {item.digest} contradicts "
                        f"{first.digest}, published first; the first is kept"
                    )
        self._raw = raw
        return list(found.values())

    async def load(self) -> list[SagaDefinition]:
        """Every definition in the topic (`read`, without what was recorded about them)."""
        return [p.definition for p in await self.read()]

    async def publish(
        self, definitions: Iterable[SagaDefinition], *, by: str | None = None
    ) -> PublishResult:
        """Publishes the definitions that are not in the topic yet.

        Args:
            definitions: The definitions to publish.
            by: Who publishes (default: the user's login name).

        Raises:
            DefinitionError: A definition has another digest than the one already published
                under its name and version (rule ``unique-version``); nothing is written then.
        """
        wanted = list({d.digest: d for d in definitions}.values())
        await self.ensure_topic()
        known = {p.key: p for p in await self.read()}
        result = PublishResult()
        fresh: list[SagaDefinition] = []
        for d in wanted:
            there = known.get(definition_key(d.name, d.version))
            if there is None:
                fresh.append(d)
            elif there.digest == d.digest:
                result.existing.append(d)
            else:
                raise _conflict(d, there.digest)
        if not fresh:
            return result
        who = by if by is not None else _login()
        now = self.clock.now()
        records = [_record(self.topics.definitions, d, who, now) for d in fresh]
        async with self.transport.producer() as producer:
            await producer.send(records)
        # Read back: another publisher may have written the same key first (module docstring).
        after = {p.key: p for p in await self.read()}
        for d in fresh:
            key = definition_key(d.name, d.version)
            winner = after.get(key)
            if winner is not None and winner.digest != d.digest:
                async with self.transport.producer() as producer:
                    await producer.send(
                        [Outgoing(self.topics.definitions, key.encode(), self._raw[key])]
                    )
                raise _conflict(d, winner.digest)
            result.new.append(d)
        return result

    def _parse(self, where: str, key: bytes | None, value: bytes) -> Published | None:
        try:
            rec = DefinitionRecord.model_validate_json(value)
        except ValidationError as exc:
            self._problem(f"{where}: not a definition record: {exc.errors()[0]['msg']}")
            return None
        label = f"{where}: saga {rec.name!r}, version {rec.version}"
        try:
            d = SagaDefinition.from_dict(rec.definition)
        except DefinitionError as exc:
            self._problem(f"{label}: its definition does not load: {'; '.join(exc.problems)}")
            return None
        if key != definition_key(d.name, d.version).encode() or (d.name, d.version) != (
            rec.name,
            rec.version,
        ):
            self._problem(f"{label}: its key {key!r} does not name its definition")
            return None
        if not rec.models and d.digest != rec.digest:
            self._problem(f"{label}: its content hashes to {d.digest}, not {rec.digest}")
            return None
        return Published(d, rec.digest, rec.published_by, rec.published_at, tuple(rec.models))

    def _problem(self, text: str) -> None:
        log.warning("definitions topic: %s (left out)", text)
        self.problems.append(text)


def _record(topic: str, d: SagaDefinition, by: str | None, now: float) -> Outgoing:
    rec = DefinitionRecord(
        name=d.name,
        version=d.version,
        digest=d.digest,
        definition=d.to_dict(),
        models=_models(d),
        published_by=by,
        published_at=now,
    )
    key = definition_key(d.name, d.version).encode()
    return Outgoing(topic, key, rec.model_dump_json().encode())


def _models(d: SagaDefinition) -> list[str]:
    found = ["input_model"] if d.input_model is not None else []
    for s in d.steps:
        found += [f"steps.{s.name}.{k}" for k in ("input_model", "output_model") if getattr(s, k)]
    return found


def _conflict(d: SagaDefinition, published: str) -> DefinitionError:
    return DefinitionError(
        d.name,
        [
            f"saga {d.name!r}, version {d.version}: [unique-version] another definition is "
            f"published under this name and version (digest {published}, this one is "
            f"{d.digest}); give the changed one a new version"
        ],
    )


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment nor the password database
        return None


def published_digests(items: Sequence[Published]) -> dict[str, SagaDefinition]:
    """The definitions by the digest they were published under."""
    return {p.digest: p.definition for p in items}
