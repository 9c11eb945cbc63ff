"""The HTTP API, under ``/api/v1``: start, status, list and search, history, counts and index
lag, and the operator requests (signal, approve, reject, cancel, retry, resolve).

Every route needs an authenticated caller (`saga.server.auth`); every request it sends goes
through `saga.server.service.SagaService` (signed as the caller, checked first). Requests
answer ``202 Accepted`` with the saga's ``seq`` when asked: the request is in Kafka, and what
it leads to shows in the saga's status once the coordinator has decided it. Errors are problem
details (`saga.server.problems`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from saga.core.state import SagaState
from saga.index.port import SagaQuery
from saga.server.auth import TOKEN_COOKIE, Authenticator, Principal
from saga.server.problems import Problem
from saga.server.service import Accepted, SagaService, pending_approvals

__all__ = [
    "AcceptedOut",
    "ApprovalIn",
    "HistoryOut",
    "PageOut",
    "ReasonIn",
    "SignalIn",
    "StartIn",
    "current_principal",
    "router",
    "service_of",
]


def service_of(request: Request) -> SagaService:
    """The application's `SagaService`."""
    service: SagaService = request.app.state.service
    return service


def current_principal(request: Request) -> Principal:
    """The authenticated caller of ``request`` (a FastAPI dependency; 401 otherwise)."""
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator.authenticate(
        request.headers.get("authorization"),
        request.cookies.get(TOKEN_COOKIE),
        request.scope.get("state") or {},
    )


Caller = Annotated[Principal, Depends(current_principal)]
Service = Annotated[SagaService, Depends(service_of)]

_STRICT = ConfigDict(extra="forbid")


class StartIn(BaseModel):
    """A start request."""

    model_config = _STRICT
    name: str = Field(min_length=1, max_length=100, description="The saga definition's name.")
    input: dict[str, Any] = Field(default_factory=dict, description="The saga input.")
    saga_id: str | None = Field(default=None, description="The id (default: a new random one).")
    if_exists: Literal["return", "refuse"] = Field(
        default="return",
        description="The id-reuse policy: 'return' keeps an existing saga of that id; 'refuse' "
        "refuses (409) a start whose name or input differs from the existing saga's.",
    )


class ReasonIn(BaseModel):
    """Why (cancel, retry) or what was done (resolve), for the audit trail."""

    model_config = _STRICT
    reason: str | None = Field(default=None, max_length=2000)


class SignalIn(BaseModel):
    """A signal for a saga's ``wait`` step."""

    model_config = _STRICT
    name: str = Field(min_length=1, max_length=100)
    data: dict[str, Any] = Field(default_factory=dict)


class ApprovalIn(BaseModel):
    """A decision on an approval step."""

    model_config = _STRICT
    step: str = Field(min_length=1, max_length=100)
    note: str = Field(default="", max_length=2000)


class AcceptedOut(BaseModel):
    """A request written to the requests topic."""

    saga_id: str
    action: str
    seq: int = Field(description="The saga's seq when asked: its outcome has a higher one.")
    by: str = Field(description="The principal the request was sent as.")
    status_url: str


class SagaOut(BaseModel):
    """A saga's latest state, and the approvals it waits for."""

    state: dict[str, Any]
    pending_approvals: list[str]


class PageOut(BaseModel):
    """One page of sagas."""

    sagas: list[dict[str, Any]]
    total: int
    next_cursor: str | None


class HistoryOut(BaseModel):
    """A saga's events, in order."""

    saga_id: str
    events: list[dict[str, Any]]


router = APIRouter(prefix="/api/v1", tags=["sagas"])


def _accepted(request: Request, a: Accepted) -> AcceptedOut:
    url = str(request.url_for("get_saga", saga_id=a.saga_id).path)
    return AcceptedOut(saga_id=a.saga_id, action=a.action, seq=a.seq, by=a.by, status_url=url)


def _state(state: SagaState) -> dict[str, Any]:
    return state.model_dump(mode="json")


@router.post("/sagas", status_code=202, response_model=AcceptedOut, summary="Start a saga")
async def start_saga(
    body: StartIn, request: Request, caller: Caller, service: Service
) -> AcceptedOut:
    """Asks for a saga to start. The input is checked against the definition where the server
    knows its model; otherwise a start the coordinator cannot run is recorded as a saga with
    status ``rejected``."""
    accepted = await service.start(caller, body.name, body.input, body.saga_id, body.if_exists)
    return _accepted(request, accepted)


def _parse_input_filters(items: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise Problem(
                422,
                "invalid-request",
                f"input filter {item!r} must be KEY=VALUE (VALUE as JSON, else as text)",
                errors=[
                    {"loc": ["query", "input"], "msg": "expected KEY=VALUE", "type": "value_error"}
                ],
            )
        try:
            found[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            found[key] = raw
    return found


def query_of(
    name: str | None = None,
    status: list[str] | None = None,
    step: str | None = None,
    step_status: str | None = None,
    input: list[str] | None = None,
    saga_id_prefix: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> SagaQuery:
    """The index query of the list's parameters (shared with the console)."""
    return SagaQuery(
        name=name or None,
        status=tuple(s for s in (status or ()) if s),
        step=step or None,
        step_status=step_status or None,
        input=_parse_input_filters([i for i in (input or ()) if i]),
        saga_id_prefix=saga_id_prefix or None,
        limit=limit,
        cursor=cursor or None,
    )


@router.get("/sagas", response_model=PageOut, summary="List and search sagas")
async def list_sagas(
    caller: Caller,
    service: Service,
    name: str | None = None,
    status: Annotated[list[str] | None, Query(description="Any of these statuses.")] = None,
    step: str | None = None,
    step_status: str | None = None,
    input: Annotated[
        list[str] | None,
        Query(description="KEY=VALUE: the input's top-level KEY equals VALUE (JSON, else text)."),
    ] = None,
    saga_id_prefix: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> PageOut:
    """Sagas from the index, most recently updated first, a page at a time (pass
    ``next_cursor`` as ``cursor`` for the next)."""
    del caller
    q = query_of(name, status, step, step_status, input, saga_id_prefix, limit, cursor)
    page = service.query(q)
    return PageOut(
        sagas=[_state(r.state) for r in page.rows], total=page.total, next_cursor=page.next_cursor
    )


@router.get("/sagas/{saga_id:path}/history", response_model=HistoryOut, summary="A saga's events")
async def get_history(saga_id: str, caller: Caller, service: Service) -> HistoryOut:
    """The saga's events in log order, each with who asked (``by``) where a request caused it."""
    del caller
    entries = await service.history(saga_id)
    return HistoryOut(saga_id=saga_id, events=[dict(e.event) for e in entries])


@router.get("/counts", summary="Sagas by status")
async def get_counts(
    caller: Caller, service: Service, name: str | None = None
) -> Mapping[str, int]:
    """How many sagas the index holds, by status (of one saga name, or of all)."""
    del caller
    return dict(service.index.counts(name))


@router.get("/index/lag", summary="How far the index is behind the log")
async def get_lag(caller: Caller, service: Service) -> dict[str, Any]:
    """Log records not yet indexed, by partition and in all."""
    del caller
    lag = service.index.lag()
    return {
        "behind": {str(p): n for p, n in lag.behind.items()},
        "total": lag.total,
        "updated_at": lag.updated_at,
    }


@router.post("/sagas/{saga_id:path}/cancel", status_code=202, response_model=AcceptedOut)
async def cancel_saga(
    saga_id: str, request: Request, caller: Caller, service: Service, body: ReasonIn | None = None
) -> AcceptedOut:
    """Asks for the saga to be cancelled (honoured until its pivot starts)."""
    a = await service.act(caller, saga_id, "cancel", text=body.reason if body else None)
    return _accepted(request, a)


@router.post("/sagas/{saga_id:path}/retry", status_code=202, response_model=AcceptedOut)
async def retry_saga(
    saga_id: str, request: Request, caller: Caller, service: Service, body: ReasonIn | None = None
) -> AcceptedOut:
    """Asks for a stuck saga's stuck steps or compensations to run again."""
    a = await service.act(caller, saga_id, "retry", text=body.reason if body else None)
    return _accepted(request, a)


@router.post("/sagas/{saga_id:path}/resolve", status_code=202, response_model=AcceptedOut)
async def resolve_saga(
    saga_id: str, request: Request, caller: Caller, service: Service, body: ReasonIn | None = None
) -> AcceptedOut:
    """Declares a stuck saga's stuck steps handled by hand (``reason``: what was done)."""
    a = await service.act(caller, saga_id, "resolve", text=body.reason if body else None)
    return _accepted(request, a)


@router.post("/sagas/{saga_id:path}/signal", status_code=202, response_model=AcceptedOut)
async def signal_saga(
    saga_id: str, body: SignalIn, request: Request, caller: Caller, service: Service
) -> AcceptedOut:
    """Delivers a signal to the saga (its ``wait`` step for it completes with ``data``)."""
    a = await service.act(caller, saga_id, "signal", signal=body.name, data=body.data)
    return _accepted(request, a)


@router.post("/sagas/{saga_id:path}/approve", status_code=202, response_model=AcceptedOut)
async def approve_step(
    saga_id: str, body: ApprovalIn, request: Request, caller: Caller, service: Service
) -> AcceptedOut:
    """Approves the saga's waiting approval step ``step`` (as the caller)."""
    a = await service.act(caller, saga_id, "approve", step=body.step, text=body.note)
    return _accepted(request, a)


@router.post("/sagas/{saga_id:path}/reject", status_code=202, response_model=AcceptedOut)
async def reject_step(
    saga_id: str, body: ApprovalIn, request: Request, caller: Caller, service: Service
) -> AcceptedOut:
    """Rejects the saga's waiting approval step ``step``: the saga compensates."""
    a = await service.act(caller, saga_id, "reject", step=body.step, text=body.note)
    return _accepted(request, a)


# Last of the saga routes: a sub-saga's id holds "/" (``<parent>/<step>``), so the bare
# path would also match the suffixed ones above.
@router.get("/sagas/{saga_id:path}", response_model=SagaOut, summary="A saga's status")
async def get_saga(saga_id: str, caller: Caller, service: Service) -> SagaOut:
    """The saga's latest state (404 problem if there is no such saga)."""
    del caller
    state = await service.status(saga_id)
    definition = await service.definition_for(state)
    return SagaOut(state=_state(state), pending_approvals=pending_approvals(state, definition))
