"""The states a partition holds in memory, with idle sagas kept packed.

A coordinator holds every unfinished saga of its partitions. Most of them, in a system with
approvals, waits and long timers, sit still for minutes or days: a `SagaState` is a few pydantic
models (a few KiB each with their dicts), while its JSON is a few hundred bytes. `HeldStates`
therefore keeps a saga that has not changed for ``park_after`` seconds as its compact JSON and
rebuilds the model when it is read. A state read is an equal state either way; a saga that
changes again is held as a model until it goes idle again.

Order matters for the cost: states are kept in the order of their last change, so finding
the idle ones looks only at those, never at the whole partition. Finished sagas are never
packed (retention evicts them on its own schedule and reads them where they are).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

from saga.core.state import SagaState

__all__ = ["HeldStates", "pack", "unpack"]


def pack(state: SagaState) -> bytes:
    """The state's compact JSON (fields at their defaults left out)."""
    return state.__pydantic_serializer__.to_json(state, exclude_defaults=True)


def unpack(data: bytes) -> SagaState:
    """The state `pack` was given (only for bytes `pack` wrote: the engine's own values)."""
    state: SagaState = SagaState.__pydantic_validator__.validate_json(data)
    return state


class HeldStates(MutableMapping[str, SagaState]):
    """Saga states by id; unfinished ones idle for ``park_after`` seconds are held packed
    (`park`).

    Args:
        states: The states to start with (recovery's fold).
        park_after: Seconds without a change after which an unfinished saga is packed.
    """

    def __init__(self, states: dict[str, SagaState] | None = None, park_after: float = 30.0):
        self.park_after = park_after
        self._running: dict[str, SagaState] = {}
        """Unfinished sagas held as models, oldest change first."""
        self._final: dict[str, SagaState] = {}
        self._packed: dict[str, bytes] = {}
        self._parked_at = float("-inf")
        for saga_id, state in sorted((states or {}).items(), key=lambda i: i[1].updated_at):
            self[saga_id] = state

    def __getitem__(self, saga_id: str) -> SagaState:
        state = self._running.get(saga_id)
        if state is None:
            state = self._final.get(saga_id)
        if state is None:
            return unpack(self._packed[saga_id])
        return state

    def __setitem__(self, saga_id: str, state: SagaState) -> None:
        self._packed.pop(saga_id, None)
        self._running.pop(saga_id, None)  # re-inserted last: the most recent change
        self._final.pop(saga_id, None)
        (self._final if state.is_final else self._running)[saga_id] = state

    def __delitem__(self, saga_id: str) -> None:
        if self._running.pop(saga_id, None) is None and self._final.pop(saga_id, None) is None:
            del self._packed[saga_id]

    def __contains__(self, saga_id: object) -> bool:
        return saga_id in self._running or saga_id in self._final or saga_id in self._packed

    def __iter__(self) -> Iterator[str]:
        yield from list(self._running)
        yield from list(self._final)
        yield from list(self._packed)

    def __len__(self) -> int:
        return len(self._running) + len(self._final) + len(self._packed)

    @property
    def packed(self) -> int:
        """How many states are held packed."""
        return len(self._packed)

    def unfinished(self) -> int:
        """Sagas not in a final status, without unpacking any."""
        return len(self._running) + len(self._packed)

    def next_park(self) -> float | None:
        """When the longest-unchanged unfinished saga held as a model is due to be packed (at
        most every tenth of ``park_after``: sagas going idle one after another are packed
        together, not each on a wake-up of its own)."""
        for state in self._running.values():  # the first is the oldest change
            return max(state.updated_at + self.park_after, self._parked_at + self.park_after / 10)
        return None

    def park(self, now: float) -> int:
        """Packs the unfinished sagas unchanged since ``now - park_after``; returns how many."""
        self._parked_at = now
        limit = now - self.park_after
        idle: list[str] = []
        for saga_id, state in self._running.items():  # oldest change first
            if state.updated_at > limit:
                break
            idle.append(saga_id)
        for saga_id in idle:
            self._packed[saga_id] = pack(self._running.pop(saga_id))
        return len(idle)
