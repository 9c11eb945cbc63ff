"""Triggers and outcomes, purely: what a record of a trigger topic becomes, what an ended saga
publishes, and the rules both obey."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from saga.core.codec import Limits
from saga.core.conditions import ConditionError
from saga.core.events import SagaAborted, SagaCompensated, SagaCompleted, SagaStuck, StartIgnored
from saga.core.messages import StartSaga
from saga.core.state import SagaState, SagaStatus, StepState, StepStatus
from saga.core.triggers import (
    Outcome,
    OutcomeRecord,
    Refused,
    Skip,
    Trigger,
    condition,
    outcome_records,
    problems,
    start_for,
)

ORDER = {"order_id": "A-17", "total": 120, "dishes": ["carbonara", "pesto"], "type": "placed"}


def _start(trigger: Trigger, value: Any = ORDER, offset: int = 7, **kw: Any) -> Any:
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return start_for(trigger, "order", "orders", 2, offset, raw, 1000.0, **kw)


def test_an_event_starts_a_saga_with_the_event_as_input_and_an_id_from_its_record() -> None:
    start = _start(Trigger(topic="orders"))
    assert isinstance(start, StartSaga)
    assert start.saga_id == "order-orders-2-7"
    assert start.saga_name == "order"
    assert start.input == ORDER
    assert start.at == 1000.0
    assert start.if_exists == "return"


def test_the_same_record_is_the_same_request_and_another_record_is_another_saga() -> None:
    t = Trigger(topic="orders")
    first, again, other = _start(t), _start(t), _start(t, offset=8)
    assert first == again
    assert isinstance(first, StartSaga)
    assert isinstance(other, StartSaga)
    assert other.saga_id != first.saga_id
    assert other.message_id != first.message_id


def test_two_sagas_on_one_topic_get_different_default_ids() -> None:
    raw = orjson.dumps(ORDER)
    a = start_for(Trigger(topic="orders"), "order", "orders", 0, 1, raw, 0.0)
    b = start_for(Trigger(topic="orders"), "audit", "orders", 0, 1, raw, 0.0)
    assert isinstance(a, StartSaga)
    assert isinstance(b, StartSaga)
    assert a.saga_id != b.saga_id


def test_a_long_topic_name_still_gives_a_valid_stable_id() -> None:
    topic = "t" * 249
    raw = orjson.dumps(ORDER)
    a = start_for(Trigger(topic=topic), "order", topic, 0, 1, raw, 0.0)
    b = start_for(Trigger(topic=topic), "order", topic, 0, 2, raw, 0.0)
    assert isinstance(a, StartSaga)
    assert isinstance(b, StartSaga)
    assert len(a.saga_id) <= 200
    assert a.saga_id != b.saga_id


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$.event.order_id", "A-17"),
        ("order-{$.event.order_id}", "order-A-17"),
        ("{$.meta.topic}/{$.event.order_id}/{$.event.total}", "orders/A-17/120"),
        ("$.meta.key", "k-1"),
    ],
)
def test_a_saga_id_template_is_a_reference_or_text_with_references(
    template: str, expected: str
) -> None:
    start = _start(Trigger(topic="orders", saga_id=template), key=b"k-1")
    assert isinstance(start, StartSaga)
    assert start.saga_id == expected


def test_an_input_template_maps_the_event() -> None:
    t = Trigger(
        topic="orders",
        input={"order": "$.event.order_id", "first": "$.event.dishes.0", "from": "$.meta.offset"},
    )
    start = _start(t)
    assert isinstance(start, StartSaga)
    assert start.input == {"order": "A-17", "first": "carbonara", "from": 7}


def test_a_condition_filters_events_and_a_skip_says_why() -> None:
    t = Trigger(topic="orders", when='$.event.type == "placed" and $.event.total > 100')
    assert isinstance(_start(t), StartSaga)
    skip = _start(t, {**ORDER, "total": 40})
    assert isinstance(skip, Skip)
    assert "$.event.total > 100 does not hold (40 > 100)" in skip.detail
    # A missing field is not an error: the condition does not hold.
    assert isinstance(_start(t, {"order_id": "B"}), Skip)


def test_a_condition_reads_where_the_event_came_from() -> None:
    t = Trigger(topic="orders", when="$.meta.partition == 2 and $.meta.offset >= 7")
    assert isinstance(_start(t), StartSaga)
    assert isinstance(_start(t, offset=6), Skip)


def test_a_string_that_looks_like_a_path_is_left_alone_in_a_condition() -> None:
    t = Trigger(topic="orders", when="$.event.type == '$.event'")
    assert isinstance(_start(t, {**ORDER, "type": "$.event"}), StartSaga)
    assert isinstance(_start(t), Skip)


def test_a_tombstone_is_skipped() -> None:
    assert isinstance(_start(Trigger(topic="orders"), None), Skip)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_utf8"),
        (b"", "empty"),
        (b"[1, 2]", "not_an_object"),
        (b'"placed"', "not_an_object"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "too_deep"),
    ],
)
def test_a_malformed_event_is_refused_with_its_reason(value: bytes, reason: str) -> None:
    refused = _start(Trigger(topic="orders"), value)
    assert isinstance(refused, Refused)
    assert refused.reason == reason
    assert refused.detail


def test_an_event_over_the_size_bound_is_refused() -> None:
    refused = _start(Trigger(topic="orders"), {"x": "y" * 200}, limits=Limits(max_bytes=150))
    assert isinstance(refused, Refused)
    assert refused.reason == "too_large"


@pytest.mark.parametrize(
    ("trigger", "reason"),
    [
        (Trigger(topic="orders", saga_id="$.event.missing"), "no_saga_id"),
        (Trigger(topic="orders", saga_id="$.event.dishes"), "no_saga_id"),
        (Trigger(topic="orders", saga_id="o-{$.event.nothing}"), "no_saga_id"),
        (Trigger(topic="orders", saga_id="__{$.event.order_id}"), "invalid_saga_id"),
        (Trigger(topic="orders", input="$.event.dishes"), "input_not_an_object"),
        (Trigger(topic="orders", input={"x": "$.event.nope"}), "input_unresolved"),
    ],
)
def test_an_event_its_templates_do_not_fit_is_refused(trigger: Trigger, reason: str) -> None:
    refused = _start(trigger)
    assert isinstance(refused, Refused)
    assert refused.reason == reason


def test_a_boolean_is_not_a_saga_id() -> None:
    refused = _start(Trigger(topic="orders", saga_id="$.event.flag"), {"flag": True})
    assert isinstance(refused, Refused)
    assert refused.reason == "no_saga_id"


def test_a_trigger_condition_reads_only_its_roots() -> None:
    with pytest.raises(ConditionError, match=r"expected \$.event or \$.meta"):
        condition("$.input.total > 1")
    with pytest.raises(ConditionError, match="at 16"):
        condition("$.event.total >")


# -- outcomes ---------------------------------------------------------------------------------


def _state(status: SagaStatus, reason: str | None = None) -> SagaState:
    return SagaState(
        saga_id="A-17",
        name="order",
        version=2,
        status=status,
        input={"order": "A-17", "total": 120},
        steps={
            "pay": StepState(status=StepStatus.SUCCEEDED, output={"charge": "c-1"}),
            "cook": StepState(),
        },
        seq=9,
        started_at=1.0,
        updated_at=5.0,
        finished_at=5.0,
        reason=reason,
    )


def test_a_completed_saga_publishes_the_default_event_keyed_by_its_id() -> None:
    state = _state(SagaStatus.COMPLETED)
    (record,) = outcome_records(
        [Outcome(topic="orders.done")], state, [SagaCompleted(saga_id="A-17", seq=9, at=5.0)]
    )
    assert isinstance(record, OutcomeRecord)
    assert (record.topic, record.key) == ("orders.done", b"A-17")
    assert orjson.loads(record.value) == {
        "saga_id": "A-17",
        "saga_name": "order",
        "status": "completed",
        "reason": None,
        "at": 5.0,
        "seq": 9,
    }


def test_an_outcome_template_reads_the_saga_and_missing_data_is_null() -> None:
    state = _state(SagaStatus.COMPENSATED, reason="kitchen closed")
    value = {
        "order": "$.input.order",
        "why": "$.reason",
        "charge": "$.steps.pay.output.charge",
        "dish": "$.steps.cook.output.dish",
        "pay": "$.steps.pay.status",
        "kind": "order-cancelled",
        "what": "$.status",
    }
    outcomes = [
        Outcome(topic="orders.cancelled", on=("compensated",), value=value),
        Outcome(topic="orders.done", on=("completed",)),
    ]
    (record,) = outcome_records(outcomes, state, [SagaCompensated(saga_id="A-17", seq=9, at=5.0)])
    assert record.topic == "orders.cancelled"
    assert orjson.loads(record.value) == {
        "order": "A-17",
        "why": "kitchen closed",
        "charge": "c-1",
        "dish": None,
        "pay": "succeeded",
        "kind": "order-cancelled",
        "what": "compensated",
    }


def test_only_the_event_that_ends_the_saga_publishes() -> None:
    outcomes = [Outcome(topic="out")]
    done = _state(SagaStatus.COMPLETED)
    again = StartIgnored(
        saga_id="A-17", seq=10, at=6.0, message_id="m", reason="exists", differs=[]
    )
    assert outcome_records(outcomes, done, [again]) == []
    aborted = SagaAborted(saga_id="A-17", seq=3, at=2.0, reason="cancelled")
    assert outcome_records(outcomes, _state(SagaStatus.COMPENSATING, "x"), [aborted]) == []
    stuck = _state(SagaStatus.STUCK, "payment unknown")
    (record,) = outcome_records(
        outcomes, stuck, [SagaStuck(saga_id="A-17", seq=9, at=5.0, reason="payment unknown")]
    )
    assert orjson.loads(record.value)["reason"] == "payment unknown"
    assert (
        outcome_records(
            [Outcome(topic="out", on=("completed",))],
            stuck,
            [SagaStuck(saga_id="A-17", seq=9, at=5.0, reason="payment unknown")],
        )
        == []
    )


# -- rules ------------------------------------------------------------------------------------


def test_problems_name_the_saga_the_trigger_and_the_rule() -> None:
    triggers = [
        Trigger(topic="orders", when="$.event.total >"),
        Trigger(topic="orders", saga_id="o-{$.input.id}"),
        Trigger(topic="refunds", saga_id="o-{oops", input={"x": "$.steps.a.output"}),
    ]
    outcomes = [
        Outcome(
            topic="done", value={"a": "$.steps.nope.output", "b": "$.foo", "c": "$.steps.pay.x"}
        ),
        Outcome(topic="fine", value={"a": "$.steps.pay.output.id", "s": "$.steps", "i": "$.input"}),
    ]
    found = list(problems("order", triggers, outcomes, {"pay"}))
    assert found == [
        "saga 'order', trigger on 'orders': [trigger-condition] '$.event.total >': at 16: "
        "expected a value after '>'",
        "saga 'order', trigger on 'orders': [trigger-topic] the saga subscribes to this topic "
        "more than once",
        "saga 'order', trigger on 'orders': [trigger-reference] saga_id reads '$.input.id': use "
        "$.event or $.meta",
        "saga 'order', trigger on 'refunds': [trigger-reference] saga_id 'o-{oops': a brace that "
        "is not part of a {$.path} reference",
        "saga 'order', trigger on 'refunds': [trigger-reference] input reads "
        "'$.steps.a.output': use $.event or $.meta",
        "saga 'order', outcome to 'done': [outcome-reference] reads step 'nope', which is not a "
        "step",
        "saga 'order', outcome to 'done': [outcome-reference] unknown reference root 'foo' (use "
        "$.saga_id, $.name, $.version, $.status, $.reason, $.at, $.seq, $.input, $.steps)",
        "saga 'order', outcome to 'done': [outcome-reference] $.steps.pay.x: a step has a status "
        "and an output",
    ]


def test_a_valid_definition_has_no_problems() -> None:
    triggers = [
        Trigger(topic="orders", when="exists($.event.order_id)", saga_id="$.event.order_id")
    ]
    assert list(problems("order", triggers, [Outcome(topic="done")], {"pay"})) == []
