"""`Catalog`: the saga definitions a coordinator can run, by name and version."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from saga.core.definition import SagaDefinition
from saga.core.state import SagaState
from saga.errors import DefinitionError

__all__ = ["Catalog"]


class Catalog:
    """Definitions by (name, version); new sagas start on the highest version of a name.

    A running saga is decided with the exact version it started on only while that version is
    in the catalog, that is, while the process is still given the old definition. A saga whose
    version is missing runs on the latest version of its name, which may not fit its history:
    such an input is dead-lettered (reason ``undecidable``) rather than stopping the partition.

    A name and version name one definition: the same definition given twice is taken once, and
    two different ones (their `SagaDefinition.digest` differs) under one name and version are
    refused, since sagas recorded under that version could not say which one they run on.

    Raises:
        DefinitionError: Two different definitions share a name and version (rule
            ``unique-version``; the problem names the saga, the version and both digests).
    """

    def __init__(self, definitions: Iterable[SagaDefinition]) -> None:
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

    @property
    def latest(self) -> Mapping[str, SagaDefinition]:
        """The highest version of each name."""
        return self._latest

    def all(self) -> list[SagaDefinition]:
        """Every definition, every version."""
        return list(self._versions.values())

    def for_start(self, name: str) -> SagaDefinition | None:
        """The definition a new saga called ``name`` starts on."""
        return self._latest.get(name)

    def for_state(self, state: SagaState) -> SagaDefinition | None:
        """The definition a running saga runs on: its own version, else the latest of its name."""
        return self._versions.get((state.name, state.version)) or self._latest.get(state.name)

    def services(self) -> list[str]:
        """Every service named by a step of any definition, sorted."""
        return sorted({s.service for d in self._versions.values() for s in d.steps})
