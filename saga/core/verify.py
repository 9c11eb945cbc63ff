"""`verify`: would a new definition decide a recorded saga as its own definition did?

Theory of operation
-------------------
A saga's log is the sequence of `decide`'s decisions. `verify` replays it decision by decision:

1. From the next recorded event it rebuilds the input that caused it: ``saga_started`` a
   `StartSaga` with its input (a start by a trigger is an ordinary start); ``step_succeeded``
   an ok `Reply`; a failure with an error (``step_failed``, ``step_retry_scheduled``,
   ``step_stuck`` and their compensation twins) a failed `Reply` with that error, or a `Tick`
   at the event's ``at`` (a ``Timeout`` error tries the tick first); ``step_timed_out``, an
   attempt started after its backoff or its timer (``step_scheduled``), a reminder
   (``approval_reminded``) and ``saga_deadline_passed`` a `Tick`; ``saga_aborted`` with a
   message id a `CancelSaga`, ``cancel_rejected`` likewise; ``saga_resumed`` a `RetrySaga`, or
   a `ResolveSaga` when ``*_resolved`` events follow it. The primitives' inputs:
   ``signal_received`` and ``signal_rejected`` a `SignalSaga` with the recorded name, data,
   message id and sender; an ``approval`` step's ``step_succeeded`` (its output ``approved``,
   ``by``, ``note``) an approving `DecideApproval` by that person with that note, and its
   failure with error type ``Rejected`` a rejecting one (who and the note are read back from
   the error's text); a ``request_denied`` of an ``approval`` that its step's approver list
   refused the `DecideApproval` that was denied (replayed as an approval: the record does not
   say which way it went). Events that other inputs cause along the way (``step_skipped`` for
   a condition, ``step_scheduled``, a kept signal taken when its step starts,
   ``step_expanded``, a fan-out's own success or failure) are matched as part of the decision
   they belong to. An item of a fan-out (``cook[2]``) is answered by its step's service; a
   sub-saga step (``saga: NAME``) by its child, as service ``saga:NAME``: its
   ``step_succeeded`` an ok `Reply` with the recorded output (``saga_id``, ``outputs``), its
   failure one with the recorded error (``SagaCompensated``, ``SagaRejected``), its
   compensation's success an ok reply. On the child's side, ``saga_started`` carries the
   recorded ``parent``, and ``saga_compensation_asked`` is a `CompensateSaga` whose ``parent``
   is the state's, with the event's attempt.
2. It decides that input with the **old** definition. The decision must reproduce the recorded
   events that follow (which validates the grouping of the log into decisions); the first
   candidate input that does is taken. When none does, the saga cannot be verified from that
   event on: one divergence says so (``step`` ``None``, ``got`` starting "cannot verify from
   here") and the replay stops. Events this module does not know (a newer release's) end up
   there too.
3. It decides the same input, in the same state, with the **new** definition, and compares the
   two decisions: per step, the events (type, attempt, and a scheduled step's due time) and the
   commands (phase, action, payload) and the requests to a sub-saga (its name, id, attempt
   and input; a compensation of it); per saga, its own events and a sub-saga's replies to its
   parent. Each step whose part differs is a `Divergence`.
4. The replay goes on from the recorded state (what the old definition did).

For a saga still in flight it then looks one decision ahead, from its last state: a `Tick` at
each time it waits for (its next deadline or retry, each scheduled step's ``wake_at``, each
approval's next reminder, the saga's deadline), an ok and a business-failure reply for each
attempt out (action or compensation; each item of a fan-out in flight; a running sub-saga
step's child completing, or compensated), for a sub-saga still running, its parent's
compensation, for each ``wait`` step not yet done its signal arriving (with empty data), for
each ``approval`` step waiting an approval and a rejection by each person the old definition
names (or by anyone, when it names nobody), and a retry when it is stuck; and it compares which
steps each definition has: a step the saga's state has and the new definition lacks is a
divergence unless nothing is left to do with it (failed, or compensated); a step the new
definition adds is one only if a decision above would run it (deciding it fails: the state has
no such step).

What it cannot see: inputs that never came (a reply that a participant has not sent yet is
tried as ok and as failed, with an empty output and one error type, not every output or error
type; a sub-saga's child answering with no outputs; a signal with empty data; a decision by the
old approvers only); payloads of replies and signals are the recorded ones, so a new
definition's output model is not checked against them; and two decisions that agree on events
and commands but differ in alerts (who is asked or reminded), in the reasons they give (a
condition's text), or in the times of steps' deadlines and reminders. Record-only events that
need no definition (``start_ignored``, ``start_refused``, ``saga_rejected``, and a
``request_denied`` by the authorization policy) are folded without deciding. Pure: no I/O, no
clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from saga.core.decide import Decision, Input, Tick, decide, next_due
from saga.core.definition import SagaDefinition, Step
from saga.core.messages import (
    CancelSaga,
    CompensateSaga,
    DecideApproval,
    ErrorInfo,
    EventBase,
    ParentRef,
    Phase,
    Reply,
    Request,
    RequestDenied,
    ResolveSaga,
    RetrySaga,
    SagaAborted,
    SagaCompensationAsked,
    SagaResumed,
    SagaStarted,
    SignalReceived,
    SignalRejected,
    SignalSaga,
    StartSaga,
    StepScheduled,
    StepSucceeded,
)
from saga.core.state import (
    FINAL_STATUSES,
    IN_FLIGHT,
    SagaState,
    SagaStatus,
    StepState,
    StepStatus,
    evolve,
)
from saga.core.subsagas import child_id, responder
from saga.errors import SagaError

__all__ = ["Divergence", "verify"]

CANNOT_VERIFY = "cannot verify from here"
"""How ``got`` starts when the recorded history does not replay on the old definition."""


@dataclass(frozen=True, slots=True)
class Divergence:
    """One step (or the saga itself, ``step`` ``None``) that a decision treats differently."""

    saga_id: str
    seq: int
    """The ``seq`` of the first event of the decision (for a look ahead: the next one)."""
    step: str | None
    expected: str
    """What the old definition decided (as recorded)."""
    got: str
    """What the new definition decides instead."""

    def __str__(self) -> str:
        where = f"step {self.step!r}" if self.step else "saga"
        return f"{self.saga_id} #{self.seq} {where}: expected {self.expected}; got {self.got}"


_NO_DEFINITION = frozenset({"start_ignored", "start_refused", "request_denied", "saga_rejected"})
_IGNORED_KEYS = frozenset({"by", "reason", "message_id", "note"})
_NOT_AN_APPROVER = re.compile(r"is not an approver of step '([A-Za-z0-9_.-]+)' \(")
"""How `saga.core.primitives.on_approval` words a decision by someone not on the list."""
_REJECTED_BY = "rejected by "
"""How `saga.core.primitives.on_approval` begins a rejection's error message."""
_SOMEONE = "verify:someone"
"""Who decides an approval, in a look ahead, when the old definition names no approver."""


def verify(
    old: SagaDefinition, new: SagaDefinition, events: Sequence[EventBase]
) -> list[Divergence]:
    """Every decision of one saga's history that ``new`` would make differently than ``old``.

    Args:
        old: The definition the saga started on (its digest is the saga's).
        new: The definition to check.
        events: The saga's events, in order, from its first.

    Returns:
        The divergences, in the order of the history (empty: ``new`` decides it the same).
    """
    found: list[Divergence] = []
    state: SagaState | None = None
    added = [s.name for s in new.steps if not old.has_step(s.name)]
    i = 0
    while i < len(events):
        head = events[i]
        if _record_only(head):
            state = _fold(state, events[i : i + 1])
            i += 1
            continue
        matched = _replay_one(old, state, events, i)
        if matched is None:
            where = head.step if hasattr(head, "step") else None
            detail = f"{head.type} (seq {head.seq})"
            found.append(
                Divergence(
                    head.saga_id,
                    head.seq,
                    where if isinstance(where, str) else None,
                    detail,
                    f"{CANNOT_VERIFY}: no input makes the old definition record {detail}",
                )
            )
            return found
        message, decision = matched
        found += _compare(head.saga_id, head.seq, decision, _decide(new, state, message, added))
        state = decision.state
        i += len(decision.events)
    if state is not None and (not state.is_final or state.status is SagaStatus.STUCK):
        found += _look_ahead(old, new, state)
    return found


# -- replaying ------------------------------------------------------------------------------


def _record_only(e: EventBase) -> bool:
    """Whether ``e`` is a record that no definition decided. A denied approval is decided when
    its step's approver list denied it; a denial by the authorization policy is not."""
    if isinstance(e, RequestDenied):
        return _denied_step(e) is None
    return e.type in _NO_DEFINITION


def _denied_step(e: RequestDenied) -> str | None:
    """The step of an approval that its approver list denied (else ``None``)."""
    if e.request != "approval":
        return None
    found = _NOT_AN_APPROVER.search(e.reason)
    return found.group(1) if found else None


def _replay_one(
    old: SagaDefinition, state: SagaState | None, events: Sequence[EventBase], i: int
) -> tuple[Input, Decision] | None:
    """The first candidate input whose old decision records ``events[i:]``'s next events."""
    for message in _candidates(old, state, events, i):
        decision = _decide(old, state, message)
        if not isinstance(decision, Decision) or not decision.events:
            continue
        recorded = events[i : i + len(decision.events)]
        if len(recorded) == len(decision.events) and all(
            _same(a, b) for a, b in zip(decision.events, recorded, strict=True)
        ):
            return message, decision
    return None


def _candidates(
    d: SagaDefinition, state: SagaState | None, events: Sequence[EventBase], i: int
) -> Iterator[Input]:
    e = events[i]
    data = e.model_dump(mode="python")
    at, saga_id = e.at, e.saga_id
    tick = Tick(saga_id, at)
    if isinstance(e, SagaStarted):
        yield StartSaga(
            message_id=f"{saga_id}/verify",
            saga_id=saga_id,
            saga_name=e.name,
            input=e.input,
            at=at,
            by=e.by,
            parent=e.parent,
        )
        return
    if isinstance(e, SagaCompensationAsked):
        # A sub-saga's parent compensating the step that started it; the request named the
        # parent's step as the child recorded it at its start, and the compensation attempt.
        parent = state.parent if state is not None else None
        if parent is not None:
            yield CompensateSaga(
                message_id=e.message_id,
                saga_id=saga_id,
                parent=ParentRef(saga_id=parent.saga_id, step=parent.step, attempt=e.attempt),
                at=at,
                by=e.by,
            )
        return
    if isinstance(e, SagaAborted) or e.type == "cancel_rejected":
        mid = data.get("message_id")
        if mid is not None:
            reason = str(data.get("reason") or "")
            yield CancelSaga(
                message_id=mid,
                saga_id=saga_id,
                reason=reason.removeprefix("cancelled: ") or "cancelled by request",
                at=at,
                by=data.get("by"),
            )
        yield tick
        return
    if isinstance(e, SagaResumed):
        resolved = i + 1 < len(events) and events[i + 1].type.endswith("_resolved")
        mid = e.message_id or f"{saga_id}/verify/{e.seq}"
        if resolved:
            yield ResolveSaga(
                message_id=mid,
                saga_id=saga_id,
                note=e.reason or "resolved by an operator",
                at=at,
                by=e.by,
            )
        yield RetrySaga(message_id=mid, saga_id=saga_id, at=at, reason=e.reason, by=e.by)
        return
    if isinstance(e, SignalReceived | SignalRejected):
        yield SignalSaga(
            message_id=e.message_id,
            saga_id=saga_id,
            name=e.name,
            data=e.data if isinstance(e, SignalReceived) else {},
            at=at,
            by=e.by,
        )
        return
    if isinstance(e, RequestDenied):
        denied = _denied_step(e)
        if denied is not None:
            yield DecideApproval(
                message_id=e.message_id, saga_id=saga_id, step=denied, approve=True, at=at, by=e.by
            )
        return
    step, attempt = data.get("step"), data.get("attempt")
    if not isinstance(step, str) or not isinstance(attempt, int) or not d.has_step(step):
        yield tick
        return
    sd = d.step(step)
    if sd.approval is not None:
        yield from _decisions(e, sd, f"{saga_id}/verify/{e.seq}")
        yield tick  # a reminder, an escalation, or the final timeout
        return
    service = responder(sd)  # an item's is its step's; a sub-saga step's, saga:NAME
    if service is None:
        # A wait step's outcomes are a signal (recorded as its own event, matched above) or
        # its timeout; a kept signal is taken inside the decision that starts the step.
        yield tick
        return
    phase: Phase = "compensation" if e.type.startswith("compensation") else "action"
    if data.get("phase") in ("action", "compensation"):
        phase = data["phase"]

    def reply(ok: bool, error: ErrorInfo | None = None, output: Any = None) -> Reply:
        return Reply(
            message_id=f"{saga_id}/{step}/{phase}/{attempt}/verify",
            saga_id=saga_id,
            step=step,
            phase=phase,
            attempt=attempt,
            service=service,
            ok=ok,
            output=output,
            error=error,
            at=at,
        )

    if e.type == "step_succeeded":
        yield reply(True, output=data.get("output") or {})
    elif e.type == "compensation_succeeded":
        yield reply(True)
    elif isinstance(error := getattr(e, "error", None), ErrorInfo):
        if error.type == "Timeout":
            yield tick
            yield reply(False, error)
        else:
            yield reply(False, error)
            yield tick
    elif e.type == "step_timed_out":
        yield tick
        yield reply(False, ErrorInfo(type="Timeout", message="no reply before the deadline"))
    else:
        yield tick  # an attempt started after its backoff, or anything a timer caused


def _decisions(e: EventBase, sd: Step, mid: str) -> Iterator[DecideApproval]:
    """The approver's decisions that could have recorded ``e`` for approval step ``sd``."""
    common = {"message_id": mid, "saga_id": e.saga_id, "step": sd.name, "at": e.at}
    if isinstance(e, StepSucceeded) and e.output.get("approved") is True:
        by, note = e.output.get("by"), e.output.get("note")
        yield DecideApproval(
            approve=True,
            note=note if isinstance(note, str) else "",
            by=by if isinstance(by, str) else None,
            **common,
        )
        return
    error = getattr(e, "error", None)
    if not isinstance(error, ErrorInfo) or error.type != "Rejected":
        return
    text = error.message.removeprefix(_REJECTED_BY)
    if text == error.message:
        return
    # "rejected by WHO[: NOTE]": a name with ": " in it is ambiguous, so every split is a
    # candidate (the first whose decision is the recorded one is taken), and no note last.
    splits = [(text[:k], text[k + 2 :]) for k in range(len(text)) if text.startswith(": ", k)]
    for by, note in [*splits, (text, "")]:
        yield DecideApproval(approve=False, note=note, by=None if by == "None" else by, **common)


def _decide(
    d: SagaDefinition, state: SagaState | None, message: Input, added: Sequence[str] = ()
) -> Decision | _Failed:
    """``decide``, or why it failed (a definition that does not fit the state raises)."""
    try:
        return decide(d, state, message, message.at)
    except (SagaError, KeyError) as exc:
        lacks = [n for n in added if state is not None and n not in state.steps]
        why = f" (the saga started without step(s) {lacks} that it adds)" if lacks else ""
        return _Failed(
            f"the new definition cannot decide it{why}: {type(exc).__name__}: {exc}",
            lacks[0] if lacks else None,
        )


@dataclass(frozen=True, slots=True)
class _Failed:
    """Why `decide` raised, and the added step it was about, when one is."""

    reason: str
    step: str | None


def _fold(state: SagaState | None, events: Sequence[EventBase]) -> SagaState | None:
    for e in events:
        state = evolve(state, e)
    return state


def _same(a: EventBase, b: EventBase) -> bool:
    # Who asked, and free text that quotes it, are not the definition's doing.
    return _plain(a) == _plain(b)


def _plain(e: EventBase) -> dict[str, Any]:
    return {k: v for k, v in e.model_dump(mode="json").items() if k not in _IGNORED_KEYS}


# -- comparing ------------------------------------------------------------------------------


def _compare(
    saga_id: str, seq: int, expected: Decision | _Failed, got: Decision | _Failed
) -> list[Divergence]:
    old = _parts(expected)
    if isinstance(got, _Failed):
        # The new definition cannot decide this state at all: one divergence, not one per
        # step of what the old one did.
        whole = "; ".join(f"{k or 'saga'}: {', '.join(v)}" for k, v in old.items())
        return [Divergence(saga_id, seq, got.step, whole or "nothing", got.reason)]
    new = _parts(got)
    found: list[Divergence] = []
    for step in sorted(old.keys() | new.keys(), key=lambda s: (s is not None, s or "")):
        a, b = old.get(step, []), new.get(step, [])
        if a != b:
            found.append(
                Divergence(saga_id, seq, step, "; ".join(a) or "nothing", "; ".join(b) or "nothing")
            )
    return found


def _parts(decision: Decision | _Failed) -> dict[str | None, list[str]]:
    """A decision's events and commands, by step (``None``: the saga's own)."""
    if isinstance(decision, _Failed):
        return {decision.step: [decision.reason]}
    parts: dict[str | None, list[str]] = {}
    if decision.rejected is not None:
        parts.setdefault(None, []).append(f"rejected: {decision.rejected}")
    for e in decision.events:
        step = getattr(e, "step", None) if not isinstance(e, SagaAborted) else None
        attempt = getattr(e, "attempt", None)
        label = e.type if attempt is None else f"{e.type} (attempt {attempt})"
        if isinstance(e, StepScheduled):
            label += f" due at {e.due_at:g}"  # a changed delay or start time is a change
        if isinstance(e, SagaAborted) and e.step:
            label += f" by {e.step}"
        parts.setdefault(step if isinstance(step, str) else None, []).append(label)
    for c in decision.commands:
        parts.setdefault(c.step, []).append(f"command {c.phase} {c.action} {c.payload}")
    for r in decision.requests:
        step, label = _request_part(r)
        parts.setdefault(step, []).append(label)
    for reply in decision.replies:
        # A sub-saga's answer to its parent's step: the saga's own part.
        outcome = f"ok {reply.output}" if reply.error is None else f"failed {reply.error.type}"
        parts.setdefault(None, []).append(
            f"reply to {reply.saga_id} step {reply.step} {reply.phase} "
            f"(attempt {reply.attempt}) {outcome}"
        )
    return parts


def _request_part(r: Request) -> tuple[str | None, str]:
    """The step a request to another saga belongs to (a sub-saga step's), and its label."""
    if isinstance(r, StartSaga) and r.parent is not None:
        return r.parent.step, (
            f"start saga {r.saga_name} as {r.saga_id} (attempt {r.parent.attempt}) {r.input}"
        )
    if isinstance(r, CompensateSaga):
        return r.parent.step, f"compensate saga {r.saga_id} (attempt {r.parent.attempt})"
    return None, f"request {r.type} to {r.saga_id}"


def _look_ahead(old: SagaDefinition, new: SagaDefinition, state: SagaState) -> list[Divergence]:
    """What differs one decision ahead of an in-flight saga, and in the steps it has."""
    seq = state.seq + 1
    found: list[Divergence] = []
    for name, ss in state.steps.items():
        if not new.has_step(name) and ss.status not in (StepStatus.FAILED, StepStatus.COMPENSATED):
            found.append(
                Divergence(
                    state.saga_id,
                    seq,
                    name,
                    f"step {name!r} ({ss.status.value}) is part of the saga",
                    "the new definition has no such step",
                )
            )
    added = [s.name for s in new.steps if not old.has_step(s.name)]
    for message in _next_inputs(old, state):
        expected, got = _decide(old, state, message), _decide(new, state, message, added)
        found += [d for d in _compare(state.saga_id, seq, expected, got) if d not in found]
    return found


def _next_inputs(d: SagaDefinition, state: SagaState) -> Iterator[Input]:
    saga_id = state.saga_id
    at = state.updated_at
    for due in _due_times(state):
        yield Tick(saga_id, max(due, at))
    final = state.status in FINAL_STATUSES
    for name, ss in state.steps.items():
        if not d.has_step(name):
            continue
        sd = d.step(name)
        if sd.wait is not None and not final and ss.status in _SIGNAL_TAKEN:
            # Taken now (running), or kept for when the step waits.
            yield SignalSaga(
                message_id=f"{saga_id}/verify/signal/{sd.wait}",
                saga_id=saga_id,
                name=sd.wait,
                at=at,
            )
        elif sd.approval is not None and ss.status is StepStatus.RUNNING:
            people = dict.fromkeys((*sd.approval.approvers, *sd.approval.escalate_to))
            for who in people or (_SOMEONE,):
                for approve in (True, False):
                    yield DecideApproval(
                        message_id=f"{saga_id}/verify/{name}/{who}/{approve}",
                        saga_id=saga_id,
                        step=name,
                        approve=approve,
                        note="verify",
                        at=at,
                        by=who,
                    )
        yield from _replies_ahead(saga_id, name, sd, ss, at)
    if state.status is SagaStatus.STUCK:
        yield RetrySaga(message_id=f"{saga_id}/verify/retry", saga_id=saga_id, at=at)
    parent = state.parent
    if parent is not None and state.status is SagaStatus.RUNNING and state.undo_for is None:
        # A sub-saga's parent may compensate it at any time (its first compensation attempt).
        yield CompensateSaga(
            message_id=f"{saga_id}/verify/compensate",
            saga_id=saga_id,
            parent=ParentRef(saga_id=parent.saga_id, step=parent.step, attempt=1),
            at=at,
        )


def _replies_ahead(saga_id: str, name: str, sd: Step, ss: StepState, at: float) -> Iterator[Reply]:
    """An ok and a business-failure reply to the attempt of ``name`` that is out, if one is:
    a participant's (an item of a fan-out's is its own), or a sub-saga step's child's."""
    service = responder(sd)
    if ss.status not in IN_FLIGHT or service is None or ss.deadline_at is None:
        return
    phase: Phase = "action" if ss.status is StepStatus.RUNNING else "compensation"
    attempt = ss.attempt if phase == "action" else ss.compensation_attempt
    output: dict[str, Any] = {}
    error = ErrorInfo(type="StepFailed", message="verify: a failure", business=True)
    if sd.saga is not None and phase == "action":
        # What `saga.core.subsagas.replies_to_parent` sends: the child's id and outputs, or
        # that it was compensated.
        output = {"saga_id": ss.child or child_id(saga_id, name), "outputs": {}}
        error = ErrorInfo(type="SagaCompensated", message="verify: compensated", business=True)
    elif sd.saga is not None:
        error = ErrorInfo(type="PastPivot", message="verify: past its pivot", business=True)
    base = {
        "saga_id": saga_id,
        "step": name,
        "phase": phase,
        "attempt": attempt,
        "service": service,
        "at": at,
    }
    yield Reply(message_id=f"{saga_id}/{name}/{phase}/{attempt}/ok", ok=True, output=output, **base)
    yield Reply(message_id=f"{saga_id}/{name}/{phase}/{attempt}/no", ok=False, error=error, **base)


_SIGNAL_TAKEN = frozenset({StepStatus.PENDING, StepStatus.SCHEDULED, StepStatus.RUNNING})
"""The statuses of a ``wait`` step in which its signal is taken (or kept for it)."""


def _due_times(state: SagaState) -> list[float]:
    """Every time the saga waits for, earliest first: its next deadline or retry (what the
    coordinator ticks at next), then each later timer (a tick after a restart or a pause
    fires every timer due by then)."""
    first = next_due(state)
    if first is None:
        return []
    later = {ss.wake_at for ss in state.steps.values() if ss.wake_at is not None}
    if state.deadline_at is not None and state.status is SagaStatus.RUNNING:
        later.add(state.deadline_at)
    return [first, *sorted(t for t in later if t > first)]
