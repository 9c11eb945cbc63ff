"""`SagaService`: what the HTTP API and the console do, in one place.

Reads come from the saga index (`saga.index.port.SagaIndex`), falling back on the snapshots
topic for a saga the index has not seen yet (one just started). Every request is sent through
a `saga.runtime.client.SagaClient` of the caller's principal: signed with that principal's key
where the server runs signed (so that the coordinator verifies and authorizes it like any
other request, and records the principal as who asked), or carrying the principal as an
unverified ``by`` where it runs unsigned. Before anything is written, the service checks what
it can: that the saga exists, that the request makes sense in its state (a retry needs a stuck
saga, an approval a waiting approval step), that a start's input fits its definition, and,
given the policy, that the principal may ask. A request that fails a check writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ValidationError

from saga.core.definition import SagaDefinition
from saga.core.policy import Action, Policy, authorize
from saga.core.state import SagaState, SagaStatus, StepStatus
from saga.errors import SagaExists, UnknownSaga, UsageError
from saga.index.port import HistoryEntry, Page, SagaIndex, SagaQuery
from saga.runtime.catalog import Catalog
from saga.runtime.client import SagaClient
from saga.runtime.definitions import DefinitionStore, published_digests
from saga.runtime.ports import Topics, Transport
from saga.runtime.trust import SigningKey
from saga.server.auth import Principal
from saga.server.problems import Problem

__all__ = ["Accepted", "SagaService", "pending_approvals"]

log = logging.getLogger("saga.server")

_CATALOG_REFRESH = 5.0
"""Seconds between reloads of the definitions topic when a name or digest is not known."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A request the service sent."""

    saga_id: str
    action: str
    seq: int
    """The saga's ``seq`` when asked: what follows the request has a higher one."""
    by: str


def pending_approvals(state: SagaState, definition: SagaDefinition | None) -> list[str]:
    """The saga's approval steps that wait for a decision now."""
    if definition is None or state.is_final:
        return []
    return [
        s.name
        for s in definition.steps
        if s.approval is not None
        and (st := state.steps.get(s.name)) is not None
        and st.status is StepStatus.RUNNING
    ]


@dataclass
class SagaService:
    """The API's and the console's operations on sagas.

    Use as an async context manager: it holds one client (one producer) per principal that
    has sent a request.

    Args:
        transport: The broker (sealing, when payload keys are configured).
        index: The saga index.
        prefix: Topic name prefix.
        definitions: Definitions the server knows with their Python models (``--app``); the
            published ones are read from the definitions topic.
        signers: Signing keys by principal; requests of a principal without one are refused
            (403). ``None``: the server runs unsigned and records callers as unverified claims.
        policy: The authorization policy, to refuse (403) before writing what the coordinator
            would deny; ``None`` leaves the decision to the coordinator alone.
        partitions: Partition count if the server's first request creates the engine's topics.
    """

    transport: Transport
    index: SagaIndex
    prefix: str = "saga"
    definitions: Sequence[SagaDefinition] = ()
    signers: Mapping[str, SigningKey] | None = None
    policy: Policy | None = None
    partitions: int = 6
    _clients: dict[str, SagaClient] = field(default_factory=dict, init=False)
    _reader: SagaClient | None = field(default=None, init=False)
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack, init=False)
    _catalog: Catalog | None = field(default=None, init=False)
    _catalog_at: float = field(default=0.0, init=False)
    _lock: anyio.Lock = field(default_factory=anyio.Lock, init=False)

    async def __aenter__(self) -> SagaService:
        self._reader = await self._stack.enter_async_context(
            SagaClient(self.transport, prefix=self.prefix, partitions=self.partitions)
        )
        await self.refresh_definitions()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @property
    def signed(self) -> bool:
        """Whether requests are signed (with the caller's key)."""
        return self.signers is not None

    # -- definitions ---------------------------------------------------------------------------

    async def refresh_definitions(self) -> Catalog:
        """Reads the definitions topic again (the catalog of every definition ever deployed)."""
        async with self._lock:
            store = DefinitionStore(self.transport, Topics(self.prefix))
            try:
                published = published_digests(await store.read())
            except Exception as exc:  # a missing topic must not stop the console
                log.warning("cannot read the definitions topic: %s", exc)
                published = {}
            self._catalog = Catalog(self.definitions, published)
            self._catalog_at = time.monotonic()
            return self._catalog

    async def catalog(self, *, refresh_if_missing: str | None = None) -> Catalog:
        """The catalog; reloaded first when it lacks ``refresh_if_missing`` (a saga name) and
        was loaded more than a few seconds ago."""
        catalog = self._catalog or await self.refresh_definitions()
        stale = time.monotonic() - self._catalog_at > _CATALOG_REFRESH
        if refresh_if_missing is not None and stale:
            names = {d.name for d in catalog.all()}
            if refresh_if_missing not in names:
                catalog = await self.refresh_definitions()
        return catalog

    async def definition_for(self, state: SagaState) -> SagaDefinition | None:
        """The definition the saga runs on, if the server knows it."""
        catalog = await self.catalog()
        found = catalog.for_state(state)
        if found is None and time.monotonic() - self._catalog_at > _CATALOG_REFRESH:
            found = (await self.refresh_definitions()).for_state(state)
        return found

    async def names(self) -> list[str]:
        """The names of the sagas the server knows a definition of."""
        return sorted({d.name for d in (await self.catalog()).all()})

    # -- reads -----------------------------------------------------------------------------------

    async def status(self, saga_id: str) -> SagaState:
        """The saga's latest state: the index's, else the snapshots'.

        Raises:
            Problem: 404, no such saga.
        """
        row = self.index.get(saga_id)
        if row is not None:
            return row.state
        assert self._reader is not None, "use SagaService as an async context manager"
        try:
            state = await self._reader.status(saga_id)
        except UsageError:
            state = None
        if state is None:
            raise Problem(
                404,
                "unknown-saga",
                f"no saga with id {saga_id!r} has been recorded under prefix {self.prefix!r}",
                title="Unknown saga",
            )
        return state

    def query(self, query: SagaQuery) -> Page:
        """Sagas matching ``query`` (the index's answer; 422 for a cursor it did not hand out
        or a limit it does not take)."""
        try:
            return self.index.query(query)
        except UsageError as exc:
            raise Problem(422, "invalid-query", str(exc)) from None

    async def history(self, saga_id: str) -> Sequence[HistoryEntry]:
        """The saga's events (404 if there is no such saga)."""
        entries = self.index.history(saga_id)
        if not entries:
            await self.status(saga_id)  # 404 for an unknown saga
        return entries

    # -- requests --------------------------------------------------------------------------------

    async def _client(self, principal: Principal) -> SagaClient:
        client = self._clients.get(principal.name)
        if client is None:
            if self.signers is not None:
                signer = self.signers.get(principal.name)
                if signer is None:
                    raise Problem(
                        403,
                        "no-signing-key",
                        f"principal {principal.name!r} has no signing key on this server, so "
                        "its requests cannot be signed; give the server its key "
                        "(--principal-keys DIR/<principal>.key)",
                    )
                client = SagaClient(
                    self.transport, prefix=self.prefix, partitions=self.partitions, signer=signer
                )
            else:
                client = SagaClient(
                    self.transport,
                    prefix=self.prefix,
                    partitions=self.partitions,
                    actor=principal.name,
                )
            self._clients[principal.name] = await self._stack.enter_async_context(client)
        return client

    def _authorize(
        self, principal: Principal, action: Action, saga_name: str, step: str | None = None
    ) -> None:
        if self.policy is None:
            return
        denied = authorize(self.policy, principal.name, action, saga_name, step)
        if denied is not None:
            raise Problem(403, "forbidden", denied)

    async def start(
        self,
        principal: Principal,
        name: str,
        input: Mapping[str, Any],
        saga_id: str | None = None,
        if_exists: Literal["return", "refuse"] = "return",
    ) -> Accepted:
        """Starts a saga, after checking its input against its definition where the server
        knows it (422 with the invalid fields otherwise; nothing is written)."""
        catalog = await self.catalog(refresh_if_missing=name)
        known = {d.name for d in catalog.all()}
        if known and name not in known:
            raise Problem(
                422,
                "unknown-saga-name",
                f"no saga definition named {name!r} is deployed under prefix {self.prefix!r} "
                f"(known: {', '.join(sorted(known))})",
                errors=[
                    {"loc": ["body", "name"], "msg": f"unknown saga {name!r}", "type": "unknown"}
                ],
            )
        definition = catalog.for_start(name)
        if definition is not None and definition.input_model is not None:
            _check_input(definition.input_model, name, input)
        self._authorize(principal, "start", name)
        client = await self._client(principal)
        try:
            saga_id = await client.start(name, input, saga_id, if_exists=if_exists)
        except UsageError as exc:
            raise Problem(
                422,
                "invalid-saga-id",
                str(exc),
                errors=[{"loc": ["body", "saga_id"], "msg": str(exc), "type": "value_error"}],
            ) from None
        except SagaExists as exc:
            raise Problem(409, "saga-exists", str(exc), title="Saga exists") from None
        return Accepted(saga_id, "start", 0, principal.name)

    async def act(
        self,
        principal: Principal,
        saga_id: str,
        action: Literal["cancel", "retry", "resolve", "signal", "approve", "reject"],
        *,
        text: str | None = None,
        step: str | None = None,
        signal: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Accepted:
        """Sends one operator request about an existing saga, after the checks of the module
        docstring (404, 409, 403; nothing written when one fails)."""
        state = await self.status(saga_id)
        policy_action: Action = "approve" if action == "reject" else action
        step_name = step if action in ("approve", "reject") else signal
        self._authorize(principal, policy_action, state.name, step_name)
        await self._check_applies(state, action, step, signal)
        client = await self._client(principal)
        try:
            if action == "cancel":
                seq = await client.cancel(saga_id, text or f"cancelled by {principal.name}")
            elif action == "retry":
                seq = await client.retry(saga_id, text)
            elif action == "resolve":
                seq = await client.resolve(saga_id, text or f"resolved by {principal.name}")
            elif action == "signal":
                assert signal is not None
                seq = await client.signal(saga_id, signal, data)
            else:
                assert step is not None
                decide = client.approve if action == "approve" else client.reject
                seq = await decide(saga_id, step, text or "")
        except UnknownSaga as exc:
            raise Problem(404, "unknown-saga", str(exc), title="Unknown saga") from None
        return Accepted(saga_id, action, seq, principal.name)

    async def _check_applies(
        self, state: SagaState, action: str, step: str | None, signal: str | None
    ) -> None:
        def conflict(detail: str) -> Problem:
            return Problem(409, "not-applicable", detail, title="Not applicable now")

        where = f"saga {state.saga_id!r} is {state.status.value}"
        if action in ("retry", "resolve") and state.status is not SagaStatus.STUCK:
            raise conflict(f"{where}: only a stuck saga can be {action}d")
        if action == "cancel" and state.is_final:
            raise conflict(f"{where}: it has ended, there is nothing to cancel")
        if action == "signal" and state.is_final:
            raise conflict(f"{where}: it has ended and takes no signal {signal!r}")
        if action == "signal" and signal is not None:
            definition = await self.definition_for(state)
            if definition is not None and definition.waits_for(signal) is None:
                raise Problem(
                    422,
                    "unknown-signal",
                    f"saga {state.saga_id!r} ({state.name}) has no step waiting for signal "
                    f"{signal!r}",
                    errors=[
                        {"loc": ["body", "name"], "msg": "no step waits for it", "type": "unknown"}
                    ],
                )
        if action in ("approve", "reject"):
            definition = await self.definition_for(state)
            waiting = pending_approvals(state, definition)
            if step not in waiting:
                shown = ", ".join(waiting) or "none"
                raise conflict(
                    f"{where}: step {step!r} is not an approval waiting for a decision "
                    f"(waiting: {shown})"
                )


def _check_input(model: type[BaseModel], name: str, input: Mapping[str, Any]) -> None:
    try:
        model.model_validate(dict(input))
    except ValidationError as exc:
        errors = [
            {
                "loc": ["body", "input", *(str(p) for p in e["loc"])],
                "msg": e["msg"],
                "type": e["type"],
            }
            for e in exc.errors()
        ]
        fields = ", ".join(".".join(e["loc"][2:]) or "input" for e in errors)
        raise Problem(
            422,
            "invalid-input",
            f"the input does not fit saga {name!r}: invalid {fields}",
            errors=errors,
        ) from None
