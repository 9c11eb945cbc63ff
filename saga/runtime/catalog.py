"""`Catalog`: the saga definitions a coordinator can run, by digest, name and version."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from saga.core.definition import SagaDefinition
from saga.core.state import SagaState
from saga.errors import DefinitionError

__all__ = ["Catalog"]


class Catalog:
    """Definitions by digest and by (name, version): the coordinator's own, and the published.

    New sagas start on the highest version of a name among the coordinator's own definitions
    (`for_start`). A running saga is decided with the exact definition it started on, found by
    the digest it recorded (`SagaState.digest`) among the own definitions and the published
    ones (`saga.runtime.definitions`), whatever the code holds now (`for_state`). A saga whose
    digest is known nowhere is not run on another definition: `for_state` gives ``None`` and
    `missing` says why (deploy it with ``saga deploy``). Only sagas that predate digests
    (``digest`` ``None``) fall back on their (name, version), else on the latest of their name.

    A name and version name one definition: the same definition given twice is taken once, and
    two different ones (their `SagaDefinition.digest` differs) under one name and version are
    refused, since sagas recorded under that version could not say which one they run on.

    Args:
        definitions: The coordinator's own definitions (from its code, with their models).
        published: Definitions from the definitions topic, by the digest they were published
            under (a copy of a definition with Python-only models hashes differently: see
            `saga.runtime.definitions`). An own definition with the same name and version
            takes precedence: it has the models.

    Raises:
        DefinitionError: Two different own definitions share a name and version (rule
            ``unique-version``; the problem names the saga, the version and both digests).
    """

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        published: Mapping[str, SagaDefinition] | None = None,
    ) -> None:
        self._versions: dict[tuple[str, int], SagaDefinition] = {}
        self._latest: dict[str, SagaDefinition] = {}
        for d in definitions:
            known = self._versions.get((d.name, d.version))
            if known is not None and known.digest != d.digest:
                raise DefinitionError(
                    d.name,
                    [
                        f"saga {d.name!r}, version {d.version}: [unique-version] two different "
                        f"definitions share this name and version (digests {known.digest} and "
                        f"{d.digest}); give the changed one a new version"
                    ],
                )
            if known is not None:
                continue
            self._versions[(d.name, d.version)] = d
            if d.name not in self._latest or d.version > self._latest[d.name].version:
                self._latest[d.name] = d
        self._own = list(self._versions.values())
        self._by_digest: dict[str, SagaDefinition] = {}
        for digest, d in (published or {}).items():
            own = self._versions.get((d.name, d.version))
            # Own first: the same content with its Python-only models.
            self._by_digest[digest] = own if own is not None and own.digest == digest else d
            self._versions.setdefault((d.name, d.version), self._by_digest[digest])
        self._by_digest.update({d.digest: d for d in self._own})

    @property
    def latest(self) -> Mapping[str, SagaDefinition]:
        """The highest version of each name among the own definitions."""
        return self._latest

    def all(self) -> list[SagaDefinition]:
        """The own definitions, every version (what a restarted coordinator is given again)."""
        return list(self._own)

    def known(self) -> list[SagaDefinition]:
        """Every definition a running saga may be decided with: own and published."""
        return list({id(d): d for d in self._by_digest.values()}.values())

    def by_digest(self, digest: str) -> SagaDefinition | None:
        """The definition published or given under ``digest``, if any."""
        return self._by_digest.get(digest)

    def for_start(self, name: str) -> SagaDefinition | None:
        """The definition a new saga called ``name`` starts on: the highest own version.

        A version known only from the definitions topic never starts a saga: it lacks the
        Python-only models of its code (inputs would go unchecked), and a coordinator whose
        code dropped a version (or is older than the one published) must not start sagas on
        code it does not hold; the topic is there so that sagas already running can finish.
        """
        return self._latest.get(name)

    def for_state(self, state: SagaState) -> SagaDefinition | None:
        """The definition a running saga is decided with (see the class docstring); ``None``
        when its digest is known nowhere (`missing` says why)."""
        if state.digest is not None:
            return self._by_digest.get(state.digest)
        return self._versions.get((state.name, state.version)) or self._latest.get(state.name)

    def missing(self, state: SagaState) -> str | None:
        """Why `for_state` has no definition for ``state`` (``None`` when it has one)."""
        if self.for_state(state) is not None:
            return None
        if state.digest is None:
            return f"saga {state.saga_id!r}: no definition named {state.name!r}"
        return (
            f"saga {state.saga_id!r} ({state.name!r}, version {state.version}) runs on "
            f"definition {state.digest}, which no coordinator knows: deploy it with "
            "`saga deploy` (it is neither in this coordinator's code nor in the definitions "
            "topic); its inputs are set aside meanwhile"
        )

    def services(self) -> list[str]:
        """Every service named by a step of any known definition, sorted."""
        # A step of a kind that has no service (a wait, a timer) names none.
        return sorted({s.service for d in self.known() for s in d.steps if s.service})
