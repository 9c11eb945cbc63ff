"""The web console: server-rendered pages (Jinja2) with a little vanilla JavaScript.

Pages: the saga list (``/``: filters, live counts by status, paging), a saga (``/sagas/{id}``:
its DAG coloured by step state, the timeline, the event history with actors, inputs and
outputs, pending approvals and the operator actions), its trace (``/sagas/{id}/trace``: the
span waterfall from Jaeger's query API), and the sign-in page for bearer tokens. Actions are
plain HTML forms posted to ``/sagas/{id}/actions/{action}`` (the page's script asks for
confirmation and a reason first), answered with a redirect back to the saga; they go through
the same `saga.server.service.SagaService` as the API, so they are signed, checked and
authorized alike. Live updates come from ``/live`` and ``/sagas/{id}/live``
(`saga.server.sse`).

What the console shows of a saga's data follows the codec: a value sealed with payload keys
the server does not hold is shown as sealed, never decoded; error messages pass through the
redactor (`saga.runtime.redaction`, ``SAGA_REDACT``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.responses import StreamingResponse

from saga.core.messages import ErrorInfo, event_adapter
from saga.core.state import SagaState, SagaStatus, StepStatus
from saga.index.port import HistoryEntry
from saga.server import dag
from saga.server.api import query_of
from saga.server.auth import TOKEN_COOKIE, Authenticator, Principal
from saga.server.problems import Problem
from saga.server.service import SagaService, pending_approvals
from saga.server.sse import event_stream
from saga.server.traces import load_trace
from saga.views.jaeger import trace_url
from saga.views.timeline import page as timeline_page

__all__ = ["render_value", "router"]

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")

_STATUSES = [s.value for s in SagaStatus]
_ACTIONS = ("approve", "reject", "retry", "resolve", "cancel")


def _when(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(at: float | None) -> str:
    if at is None:
        return ""
    seconds = max(0.0, time.time() - at)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _duration(start: float | None, end: float | None) -> str:
    if start is None:
        return ""
    seconds = max(0.0, (end or time.time()) - start)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


templates.env.filters["when"] = _when
templates.env.filters["ago"] = _ago
templates.env.globals["duration"] = _duration


def render_value(value: Any) -> Any:
    """``value`` with every sealed object (``{"$sealed": 1, ...}``) replaced by a marker that
    names its key, for display: the console never shows ciphertext as if it were data."""
    if isinstance(value, Mapping):
        if value.get("$sealed") == 1:
            return f"\U0001f512 sealed (key {value.get('kid', '?')})"
        return {k: render_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v) for v in value]
    return value


def _json(value: Any) -> str:
    return orjson.dumps(render_value(value), option=orjson.OPT_INDENT_2).decode()


templates.env.filters["pretty"] = _json


def _service(request: Request) -> SagaService:
    service: SagaService = request.app.state.service
    return service


def _principal(request: Request) -> Principal | None:
    authenticator: Authenticator = request.app.state.authenticator
    try:
        return authenticator.authenticate(
            request.headers.get("authorization"),
            request.cookies.get(TOKEN_COOKIE),
            request.scope.get("state") or {},
        )
    except Problem:
        return None


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    settings = request.app.state.settings
    base = {"principal": _principal(request), "jaeger_ui": settings.jaeger_ui}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


async def _form(request: Request) -> dict[str, str]:
    # The console's forms are small and url-encoded: parsed here, without the multipart
    # package that FastAPI's Form() needs.
    body = (await request.body())[:65536].decode("utf-8", errors="replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _same_origin(request: Request) -> bool:
    # A form posted from another site carries its Origin; the cookie is SameSite=Strict too,
    # but a server running without authentication has no cookie to protect it.
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host")


# -- the list ------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def saga_list(
    request: Request,
    name: str | None = None,
    status: str | None = None,
    step: str | None = None,
    step_status: str | None = None,
    input: str | None = None,
    saga_id_prefix: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> Response:
    """The saga list."""
    if _principal(request) is None:
        return _login_redirect(request)
    service = _service(request)
    filters = {
        "name": name or "",
        "status": status or "",
        "step": step or "",
        "step_status": step_status or "",
        "input": input or "",
        "saga_id_prefix": saga_id_prefix or "",
    }
    error = None
    try:
        query = query_of(
            name,
            [status] if status else None,
            step,
            step_status,
            [i.strip() for i in (input or "").split(",") if i.strip()],
            saga_id_prefix,
            max(1, min(limit, 200)),
            cursor,
        )
        page = service.query(query)
    except Problem as exc:
        error, page = exc.detail, service.query(query_of(limit=max(1, min(limit, 200))))
    counts = dict(service.index.counts(name or None))
    lag = service.index.lag()
    kept = {k: v for k, v in filters.items() if v}
    context = {
        "filters": filters,
        "rows": [r.state for r in page.rows],
        "total": page.total,
        "next_url": "/?" + urlencode({**kept, "cursor": page.next_cursor})
        if page.next_cursor
        else None,
        "first_url": "/?" + urlencode(kept) if cursor else None,
        "counts": counts,
        "all_count": sum(counts.values()),
        "statuses": _STATUSES,
        "step_statuses": [s.value for s in StepStatus],
        "names": await service.names(),
        "lag": lag,
        "error": error,
        "status_url": lambda s: (
            "/?"
            + urlencode(
                {**kept, "status": s} if s else {k: v for k, v in kept.items() if k != "status"}
            )
        ),
    }
    return _page(request, "list.html", context)


@router.get("/live")
async def list_live(request: Request, name: str | None = None) -> Response:
    """Live counts by status (server-sent events)."""
    if _principal(request) is None:
        raise Problem(
            401, "unauthenticated", "sign in first", headers={"WWW-Authenticate": "Bearer"}
        )
    index = _service(request).index

    def snapshot() -> tuple[str, Any]:
        counts = dict(index.counts(name or None))
        return "counts", {"counts": counts, "total": sum(counts.values())}

    return event_stream(request, index, snapshot, poll=request.app.state.settings.poll)


# -- one saga ------------------------------------------------------------------------------------


def _events_view(entries: Sequence[HistoryEntry], redact: Any) -> list[dict[str, Any]]:
    rows = []
    start = entries[0].at if entries else 0.0
    for e in entries:
        body = dict(e.event)
        error = body.get("error")
        error_text = None
        if isinstance(error, Mapping):
            try:
                error_text = redact(ErrorInfo.model_validate(error))
            except ValueError:
                error_text = str(error.get("type", "error"))
        summary = body.get("reason") or body.get("note") or ""
        by = body.get("by")
        output = body.get("output")
        if by is None and isinstance(output, Mapping) and "approved" in output:
            # An approval's decision is recorded as its step's output, with who decided.
            by = output.get("by")
            summary = summary or output.get("note") or ""
        data = {
            k: body[k]
            for k in ("input", "output", "data", "steps", "details", "name", "if_exists")
            if k in body and body[k] not in (None, {}, [])
        }
        rows.append(
            {
                "seq": e.seq,
                "type": e.type,
                "kind": _event_kind(e.type),
                "at": e.at,
                "offset_ms": (e.at - start) * 1000,
                "step": body.get("step"),
                "attempt": body.get("attempt"),
                "by": by,
                "summary": summary,
                "error": error_text,
                "data": data,
            }
        )
    return rows


def _event_kind(kind: str) -> str:
    if kind.startswith("compensation") or kind in ("saga_compensated", "saga_aborted"):
        return "undo"
    if "failed" in kind or "timed_out" in kind or "stuck" in kind or "rejected" in kind:
        return "bad"
    if kind in ("saga_completed", "step_succeeded"):
        return "good"
    return "info"


async def _saga_context(request: Request, saga_id: str) -> dict[str, Any]:
    service = _service(request)
    settings = request.app.state.settings
    state = await service.status(saga_id)
    definition = await service.definition_for(state)
    entries = service.index.history(saga_id)
    approvals = pending_approvals(state, definition)
    actions = {
        "retry": state.status is SagaStatus.STUCK,
        "resolve": state.status is SagaStatus.STUCK,
        "cancel": not state.is_final,
    }
    trace_link = trace_url(saga_id, settings.jaeger_ui) if settings.jaeger_ui else None
    order = {s.name: i for i, s in enumerate(definition.steps)} if definition else {}
    steps = sorted(
        state.steps.items(),
        key=lambda kv: (order.get(kv[0].split("[")[0], len(order)), kv[0]),
    )
    return {
        "state": state,
        "definition": definition,
        "dag": dag.svg(definition, state) if definition is not None else None,
        "events": _events_view(entries, settings.redact()),
        "steps": steps,
        "approvals": approvals,
        "actions": actions,
        "has_trace": settings.jaeger_url is not None,
        "trace_link": trace_link,
        "redact": settings.redact(),
        "done": request.query_params.get("done"),
        "failed": request.query_params.get("failed"),
    }


@router.get("/sagas/{saga_id:path}/live")
async def saga_live(request: Request, saga_id: str) -> StreamingResponse:
    """The saga's ``seq`` and status whenever they change (server-sent events)."""
    if _principal(request) is None:
        raise Problem(
            401, "unauthenticated", "sign in first", headers={"WWW-Authenticate": "Bearer"}
        )
    index = _service(request).index

    def snapshot() -> tuple[str, Any] | None:
        row = index.get(saga_id)
        if row is None:
            return None
        return "saga", {"seq": row.state.seq, "status": row.state.status.value}

    return event_stream(request, index, snapshot, poll=request.app.state.settings.poll)


_EMBED_CSS = (
    "<style>body{margin:4px 0 0}body>header,body>table{display:none}svg{max-width:100%;"
    "height:auto}</style>"
)


@router.get("/sagas/{saga_id:path}/timeline", response_class=HTMLResponse)
async def saga_timeline(request: Request, saga_id: str, embed: bool = False) -> Response:
    """The saga's timeline (`saga.views.timeline`); ``embed``: only its chart, for the saga
    page's frame (the page shows the header and the events itself)."""
    if _principal(request) is None:
        return _login_redirect(request)
    entries = await _service(request).history(saga_id)
    if not entries:
        return HTMLResponse("<p>No events indexed yet.</p>")
    redact = request.app.state.settings.redact()
    events = [event_adapter.validate_python(_redacted(dict(e.event), redact)) for e in entries]
    html = timeline_page(events)
    if embed:
        html = html.replace("</head>", _EMBED_CSS + "</head>", 1)
    return HTMLResponse(html)


def _redacted(event: dict[str, Any], redact: Any) -> dict[str, Any]:
    # The timeline prints error messages; they pass through the redactor like the console's.
    error = event.get("error")
    if isinstance(error, Mapping) and error.get("message"):
        info = ErrorInfo.model_validate(error)
        shown = redact(info)
        prefix = f"{info.type}: "
        event["error"] = {**error, "message": shown.removeprefix(prefix)}
    return event


@router.get("/sagas/{saga_id:path}/trace", response_class=HTMLResponse)
async def saga_trace(request: Request, saga_id: str) -> Response:
    """The saga's trace, drawn from Jaeger's query API."""
    if _principal(request) is None:
        return _login_redirect(request)
    settings = request.app.state.settings
    service = _service(request)
    try:
        state: SagaState | None = await service.status(saga_id)
    except Problem as exc:
        return _page(request, "missing.html", {"problem": exc, "saga_id": saga_id}, exc.status)
    if settings.jaeger_url is None:
        view = None
    else:
        view = await load_trace(saga_id, settings.jaeger_url)
    trace_link = trace_url(saga_id, settings.jaeger_ui) if settings.jaeger_ui else None
    return _page(
        request,
        "trace.html",
        {"state": state, "trace": view, "trace_link": trace_link, "saga_id": saga_id},
    )


@router.post("/sagas/{saga_id:path}/actions/{action}")
async def saga_action(request: Request, saga_id: str, action: str) -> Response:
    """An operator action from the saga page; redirects back to it with the outcome."""
    form = await _form(request)
    reason, step = form.get("reason", ""), form.get("step", "")
    principal = _principal(request)
    if principal is None:
        return _login_redirect(request)
    if not _same_origin(request):
        raise Problem(403, "cross-origin", "this form was posted from another site")
    if action not in _ACTIONS:
        raise Problem(404, "not-found", f"no action {action!r} (one of {', '.join(_ACTIONS)})")
    service = _service(request)
    back = f"/sagas/{saga_id}"
    try:
        await service.act(
            principal,
            saga_id,
            action,  # type: ignore[arg-type]  # checked against _ACTIONS above
            text=reason.strip() or None,
            step=step or None,
        )
    except Problem as exc:
        return RedirectResponse(back + "?" + urlencode({"failed": exc.detail}), status_code=303)
    what = f"{action} of {step}" if step else action
    return RedirectResponse(back + "?" + urlencode({"done": f"{what} sent"}), status_code=303)


# -- signing in ----------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str = "/") -> Response:
    """The sign-in page: paste a bearer token."""
    return _page(request, "login.html", {"next": next if next.startswith("/") else "/"})


@router.post("/login")
async def login(request: Request) -> Response:
    """Checks the token and keeps it in a cookie."""
    form = await _form(request)
    token, next = form.get("token", ""), form.get("next", "/")
    authenticator: Authenticator = request.app.state.authenticator
    target = next if next.startswith("/") and not next.startswith("//") else "/"
    try:
        authenticator.authenticate(f"Bearer {token.strip()}", None, {})
    except Problem as exc:
        return _page(request, "login.html", {"next": target, "error": exc.detail}, 401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        TOKEN_COOKIE,
        token.strip(),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Forgets the token."""
    del request
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(TOKEN_COOKIE)
    return response


# Last of the saga routes: a sub-saga's id holds "/" (``<parent>/<step>``), so the bare
# path would also match the suffixed ones above.
@router.get("/sagas/{saga_id:path}", response_class=HTMLResponse)
async def saga_page(request: Request, saga_id: str) -> Response:
    """One saga."""
    if _principal(request) is None:
        return _login_redirect(request)
    try:
        context = await _saga_context(request, saga_id)
    except Problem as exc:
        return _page(request, "missing.html", {"problem": exc, "saga_id": saga_id}, exc.status)
    return _page(request, "saga.html", context)
