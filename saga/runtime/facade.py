"""What a coordinator offers as a client: start, cancel, retry, resolve, status and wait.

A coordinator is also a client of the topics (requests go through the requests topic like
anyone's), with one advantage: it has the states of the sagas whose partitions it owns in
memory, so `status` and `wait` answer from there, and fall back to the snapshots for the
others. `CoordinatorFacade` is that part of `saga.runtime.coordinator.Coordinator`; the loop,
the rebalancing and the transactions are in the coordinator's own module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import anyio

from saga.core.messages import IfExists
from saga.core.state import SagaState
from saga.errors import SagaTimeout, UnknownSaga
from saga.runtime.catalog import Catalog
from saga.runtime.client import SagaClient
from saga.runtime.ports import Headers, TopicPartition, Topics, Transport

__all__ = ["CoordinatorFacade"]


class CoordinatorFacade:
    """The client side of a coordinator (see the module docstring).

    Its subclass sets the attributes below and calls `_serve_facade` once it has them.
    """

    transport: Transport
    topics: Topics
    partition_count: int
    catalog: Catalog
    _client: SagaClient

    def _serve_facade(self) -> None:
        self._waiters: dict[str, set[anyio.Event]] = defaultdict(set)
        self._assigned = anyio.Event()
        self._owned_inputs: frozenset[TopicPartition] = frozenset()

    def local_status(self, saga_id: str) -> SagaState | None:
        """The saga's state if its partition is owned here (no I/O)."""
        raise NotImplementedError

    def _wake(self, saga_id: str) -> None:
        """Wakes whoever waits for the saga (its new state is final)."""
        for waiter in self._waiters.pop(saga_id, ()):
            waiter.set()

    async def start(
        self,
        name: str,
        input: Mapping[str, Any],
        saga_id: str | None = None,
        *,
        headers: Headers = (),
        if_exists: IfExists = "return",
    ) -> str:
        """Starts a saga and returns its id (a new random id unless one is given).

        ``if_exists`` is the id-reuse policy, as for `saga.runtime.client.SagaClient.start`.

        Raises:
            UnknownSaga: This coordinator has no definition called ``name``.
            pydantic.ValidationError: The input does not fit the definition's input model.
            SagaExists: ``if_exists="refuse"`` and the id names a saga with another name or
                input.
        """
        definition = self.catalog.for_start(name)
        if definition is None:
            known = sorted(self.catalog.latest)
            raise UnknownSaga(f"no saga definition named {name!r}; known: {known}")
        if definition.input_model is not None:
            definition.input_model.model_validate(input)
        return await self._client.start(name, input, saga_id, headers=headers, if_exists=if_exists)

    async def cancel(self, saga_id: str, reason: str = "cancelled by request") -> int:
        """Asks for the saga to be cancelled (compensated), honoured until its pivot starts.

        Returns:
            The saga's ``seq`` when asked: `wait` with ``after=`` it waits for what follows.
        """
        return await self._client.cancel(saga_id, reason)

    async def retry(self, saga_id: str, reason: str | None = None) -> int:
        """Re-drives a stuck saga: its stuck steps or compensations run again (``reason``: why,
        for the audit trail).

        Returns:
            The saga's ``seq`` when asked: ``wait(saga_id, t, after=seq)`` waits for the
            re-driven run, not for the stuck state it had.
        """
        return await self._client.retry(saga_id, reason)

    async def resolve(self, saga_id: str, note: str = "resolved by an operator") -> int:
        """Declares a stuck saga's stuck steps handled by hand; the saga then carries on.

        Returns:
            The saga's ``seq`` when asked (see `retry`).
        """
        return await self._client.resolve(saga_id, note)

    async def signal(self, saga_id: str, name: str, data: Mapping[str, Any] | None = None) -> int:
        """Delivers a named signal to the saga (see `saga.runtime.client.SagaClient.signal`).

        Returns:
            The saga's ``seq`` when asked.
        """
        return await self._client.signal(saga_id, name, data)

    async def approve(self, saga_id: str, step: str, note: str = "") -> int:
        """Approves the saga's approval step ``step``.

        Returns:
            The saga's ``seq`` when asked.
        """
        return await self._client.approve(saga_id, step, note)

    async def reject(self, saga_id: str, step: str, note: str = "") -> int:
        """Rejects the saga's approval step ``step`` (the saga compensates).

        Returns:
            The saga's ``seq`` when asked.
        """
        return await self._client.reject(saga_id, step, note)

    async def status(self, saga_id: str) -> SagaState | None:
        """The saga's latest committed state (from memory if owned here, else the snapshots)."""
        return await self._client.status(saga_id)

    async def wait(self, saga_id: str, timeout: float, *, after: int = 0) -> SagaState:
        """Waits until the saga ends (completed, compensated or stuck) and returns its state.

        Args:
            saga_id: The saga.
            timeout: Seconds to wait at most.
            after: Only a final state with a ``seq`` past this counts: pass what `retry`,
                `resolve` or `cancel` returned to wait for what the request led to.

        Raises:
            SagaTimeout: It did not end within ``timeout`` seconds.
        """
        deadline = anyio.current_time() + timeout
        with anyio.move_on_after(timeout):
            while True:
                state = self.local_status(saga_id)
                if state is not None and state.is_final and state.seq > after:
                    return state
                if state is None and self._owns(saga_id) is False:
                    remaining = max(0.0, deadline - anyio.current_time())
                    return await self._client.wait(saga_id, remaining, after=after)
                waiter = anyio.Event()
                self._waiters[saga_id].add(waiter)
                try:
                    # Woken by a commit; the bound covers a partition moving here meanwhile.
                    with anyio.move_on_after(0.5):
                        await waiter.wait()
                finally:
                    waiters = self._waiters.get(saga_id)
                    if waiters is not None:
                        waiters.discard(waiter)
                        if not waiters:
                            del self._waiters[saga_id]
        state = await self.status(saga_id)
        where = state.status.value if state else "not started"
        raise SagaTimeout(f"saga {saga_id!r} did not end within {timeout}s (it is {where})")

    def _owns(self, saga_id: str) -> bool | None:
        """Whether this coordinator owns the saga's partition (None: not known yet)."""
        if not self._assigned.is_set():
            return None
        p = self.transport.partition_for(saga_id.encode(), self.partition_count)
        return (self.topics.requests, p) in self._owned_inputs
