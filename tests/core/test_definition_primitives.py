"""The primitives in the YAML/JSON schema: one definition using every one of them, written
three ways, and the message of each rule that a broken one breaks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from saga.core.definition import Approval, Dependency, SagaDefinition, Step, StepKind
from saga.core.triggers import Outcome, Trigger
from saga.errors import DefinitionError

ORDER_YAML = """
name: order
version: 2
description: a pasta order, with every primitive
deadline: 172800
steps:
  - name: pay
    service: payment
    action: charge
    compensation: refund
    input: {amount: $.input.total, customer: $.input.customer}
  - name: manager
    approval:
      approvers: [ann, bob]
      remind_after: 3600
      escalate_after: 7200
      escalate_to: boss
    when: $.input.total > 100
    timeout: 86400
    depends_on: pay
  - name: cook
    service: kitchen
    action: cook
    compensation: discard
    for_each: $.input.dishes
    max_parallel: 2
    input: {dish: $.item.name, order: $.input.order}
    depends_on: manager
  - name: confirm
    wait: cooked
    timeout: 600
    depends_on: cook
  - name: invoice
    saga: billing
    timeout: 120
    input: {order: $.input.order, eta: $.steps.confirm.output.eta}
    depends_on: confirm
  - name: pack
    service: kitchen
    action: pack
    compensation: unpack
    delay: 60
    depends_on: [invoice]
  - name: deliver
    service: rider
    action: deliver
    kind: pivot
    start_at: $.input.deliver_at
    depends_on: [pack]
  - name: notify
    service: notification
    action: notify_customer
    kind: retriable
    depends_on: [deliver]
triggers:
  - topic: orders.placed
    when: $.event.type == "order-placed" and $.event.total > 0
    saga_id: order-{$.event.order_id}
    input:
      order: $.event.order_id
      total: $.event.total
      customer: $.event.customer
      dishes: $.event.dishes
      deliver_at: $.event.deliver_at
outcomes:
  - topic: orders.completed
    "on": [completed]  # quoted: YAML 1.1 reads a bare on as true
    value: {order: $.input.order, eta: $.steps.confirm.output.eta, at: $.at}
  - topic: orders.cancelled
    "on": [compensated, stuck]
"""

ORDER = SagaDefinition(
    name="order",
    version=2,
    description="a pasta order, with every primitive",
    deadline=172_800,
    steps=(
        Step(
            name="pay",
            service="payment",
            action="charge",
            compensation="refund",
            input={"amount": "$.input.total", "customer": "$.input.customer"},
        ),
        Step(
            name="manager",
            approval=Approval(
                approvers=("ann", "bob"),
                remind_after=3600,
                escalate_after=7200,
                escalate_to=("boss",),
            ),
            when="$.input.total > 100",
            timeout=86_400,
            depends_on=(Dependency(step="pay"),),
        ),
        Step(
            name="cook",
            service="kitchen",
            action="cook",
            compensation="discard",
            for_each="$.input.dishes",
            max_parallel=2,
            input={"dish": "$.item.name", "order": "$.input.order"},
            depends_on=(Dependency(step="manager"),),
        ),
        Step(name="confirm", wait="cooked", timeout=600, depends_on=(Dependency(step="cook"),)),
        Step(
            name="invoice",
            saga="billing",
            timeout=120,
            input={"order": "$.input.order", "eta": "$.steps.confirm.output.eta"},
            depends_on=(Dependency(step="confirm"),),
        ),
        Step(
            name="pack",
            service="kitchen",
            action="pack",
            compensation="unpack",
            delay=60,
            depends_on=(Dependency(step="invoice"),),
        ),
        Step(
            name="deliver",
            service="rider",
            action="deliver",
            kind=StepKind.PIVOT,
            start_at="$.input.deliver_at",
            depends_on=(Dependency(step="pack"),),
        ),
        Step(
            name="notify",
            service="notification",
            action="notify_customer",
            kind=StepKind.RETRIABLE,
            depends_on=(Dependency(step="deliver"),),
        ),
    ),
    triggers=(
        Trigger(
            topic="orders.placed",
            when='$.event.type == "order-placed" and $.event.total > 0',
            saga_id="order-{$.event.order_id}",
            input={
                "order": "$.event.order_id",
                "total": "$.event.total",
                "customer": "$.event.customer",
                "dishes": "$.event.dishes",
                "deliver_at": "$.event.deliver_at",
            },
        ),
    ),
    outcomes=(
        Outcome(
            topic="orders.completed",
            on=("completed",),
            value={"order": "$.input.order", "eta": "$.steps.confirm.output.eta", "at": "$.at"},
        ),
        Outcome(topic="orders.cancelled", on=("compensated", "stuck")),
    ),
)


def _loaded() -> dict[str, SagaDefinition]:
    data = yaml.safe_load(ORDER_YAML)
    return {
        "yaml": SagaDefinition.from_yaml(ORDER_YAML),
        "json": SagaDefinition.from_json(json.dumps(data)),
        "json bytes": SagaDefinition.from_json(json.dumps(data).encode()),
        "dict": SagaDefinition.from_dict(data),
    }


def test_the_yaml_uses_every_primitive() -> None:
    d = SagaDefinition.from_yaml(ORDER_YAML)
    kinds = {s.name: s.kind_of_work for s in d.steps}
    assert kinds == {
        "pay": "command",
        "manager": "approval",
        "cook": "command",
        "confirm": "wait",
        "invoice": "saga",
        "pack": "command",
        "deliver": "command",
        "notify": "command",
    }
    manager = d.step("manager")
    assert manager.approval == Approval(
        approvers=("ann", "bob"), remind_after=3600, escalate_after=7200, escalate_to=("boss",)
    )
    assert manager.when == "$.input.total > 100"
    assert (d.step("cook").for_each, d.step("cook").max_parallel) == ("$.input.dishes", 2)
    assert d.step("confirm").wait == "cooked"
    assert d.step("invoice").saga == "billing"
    assert d.step("pack").delay == 60
    assert d.step("deliver").start_at == "$.input.deliver_at"
    assert d.deadline == 172_800
    assert d.pivot == "deliver"
    assert [t.topic for t in d.triggers] == ["orders.placed"]
    assert [(o.topic, o.on) for o in d.outcomes] == [
        ("orders.completed", ("completed",)),
        ("orders.cancelled", ("compensated", "stuck")),
    ]
    # An item of the fan-out is a unit of its own, under its item name.
    assert d.unit("cook[1]").name == "cook[1]"
    assert d.unit("cook[1]").service == "kitchen"
    # Only steps that send commands have services; the approval, wait and saga steps run in
    # the coordinator.
    assert d.services == {"payment", "kitchen", "rider", "notification"}


@pytest.mark.parametrize("how", ["yaml", "json", "json bytes", "dict"])
def test_each_way_of_writing_it_equals_the_python_definition(how: str) -> None:
    d = _loaded()[how]
    assert d == ORDER
    assert d.digest == ORDER.digest


@pytest.mark.parametrize("how", ["python", "yaml", "json"])
def test_it_round_trips_through_plain_data_with_the_same_digest(how: str) -> None:
    d = ORDER if how == "python" else _loaded()[how]
    data = d.to_dict()
    again = SagaDefinition.from_dict(data)
    assert again == d
    assert again.digest == d.digest == ORDER.digest
    assert again.to_dict() == data
    # Through JSON and YAML text too, as `saga deploy` publishes it.
    assert SagaDefinition.from_json(json.dumps(data)).digest == d.digest
    assert SagaDefinition.from_yaml(yaml.safe_dump(data)).digest == d.digest
    # The primitives are in the plain data, not dropped as defaults.
    steps = {s["name"]: s for s in data["steps"]}
    assert steps["manager"]["approval"]["escalate_to"] == ["boss"]
    assert steps["cook"]["max_parallel"] == 2
    assert steps["invoice"]["saga"] == "billing"
    assert data["triggers"][0]["saga_id"] == "order-{$.event.order_id}"


def test_a_change_to_any_primitive_changes_the_digest() -> None:
    base = yaml.safe_load(ORDER_YAML)
    edits: list[Callable[[dict[str, Any]], None]] = [
        lambda d: _step(d, "manager")["approval"].update(remind_after=1800),
        lambda d: _step(d, "manager").update(when="$.input.total > 200"),
        lambda d: _step(d, "cook").update(max_parallel=3),
        lambda d: _step(d, "confirm").update(wait="ready"),
        lambda d: _step(d, "invoice").update(saga="invoicing"),
        lambda d: _step(d, "pack").update(delay=61),
        lambda d: _step(d, "deliver").update(start_at="$.input.deliver_by"),
        lambda d: d.update(deadline=3600),
        lambda d: d["triggers"][0].update(saga_id="o-{$.event.order_id}"),
        lambda d: d["outcomes"][1].update(on=["compensated"]),
    ]
    digests = {ORDER.digest}
    for edit in edits:
        data = yaml.safe_load(ORDER_YAML)
        edit(data)
        assert data != base
        digests.add(SagaDefinition.from_dict(data).digest)
    assert len(digests) == len(edits) + 1


# -- broken definitions -------------------------------------------------------------------


def _step(data: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in data["steps"] if s["name"] == name)
    return found


def _replace(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    """An edit of step ``name``: each field set (``None``: removed)."""

    def edit(data: dict[str, Any]) -> None:
        step = _step(data, name)
        for key, value in fields.items():
            if value is None:
                step.pop(key, None)
            else:
                step[key] = value

    return edit


def _add(**step: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["steps"].append(step)

    return edit


def _trigger(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["triggers"][0].update(fields)

    return edit


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str, str]] = {
    # name: (the edit, where the message says it is, what it says)
    "step-work: two kinds of work": (
        _replace("confirm", service="kitchen", action="wait"),
        "step 'confirm': [step-work]",
        "it has action and wait",
    ),
    "step-work: no work": (
        _replace("pay", service=None, action=None),
        "step 'pay': [step-work]",
        "it has none of them",
    ),
    "step-work: an approval with a service": (
        _replace("manager", service="kitchen"),
        "step 'manager': [step-work]",
        "an approval step runs in the coordinator: it has no service",
    ),
    "step-work: a saga step with a compensation": (
        _replace("invoice", compensation="void"),
        "step 'invoice': [step-work]",
        "a saga step is compensated by compensating its child",
    ),
    "step-work: an action without a service": (
        _replace("pack", service=None),
        "step 'pack': [step-work]",
        "a step with an action needs the service that runs it",
    ),
    "no-effect: a compensation": (
        _replace("manager", compensation="unapprove"),
        "step 'manager': [no-effect]",
        "an approval step changes nothing, so it has no compensation",
    ),
    "no-effect: the pivot": (
        _replace("confirm", kind="pivot"),
        "step 'confirm': [no-effect]",
        "a wait step cannot be the pivot",
    ),
    "unique-signal": (
        _add(name="confirm_again", wait="cooked", timeout=60, depends_on=["cook"]),
        "step 'confirm_again': [unique-signal]",
        "signal 'cooked' is already waited for by step 'confirm'",
    ),
    "condition: does not parse": (
        _replace("manager", when="$.input.total >"),
        "step 'manager': [condition]",
        "when '$.input.total >': at 16: expected a value",
    ),
    "condition: reads a later step": (
        _replace("manager", when="$.steps.confirm.output.eta > 5"),
        "step 'manager': [condition]",
        "reads the output of 'confirm' but does not depend on it finish-to-start",
    ),
    "start-at: with a delay": (
        _replace("deliver", delay=30),
        "step 'deliver': [start-at]",
        "a step has a delay or a start_at, not both",
    ),
    "start-at: not a reference": (
        _replace("deliver", start_at="tomorrow"),
        "step 'deliver': [start-at]",
        "start_at must be one reference such as $.input.deliver_at, not 'tomorrow'",
    ),
    "start-at: a later step": (
        _replace("pack", delay=None, start_at="$.steps.deliver.output.at"),
        "step 'pack': [start-at]",
        "reads the output of 'deliver' but does not depend on it finish-to-start",
    ),
    "for-each: not a reference": (
        _replace("cook", for_each="dishes"),
        "step 'cook': [for-each]",
        "for_each must be one reference such as $.input.dishes, not 'dishes'",
    ),
    "for-each: a wait step": (
        _replace("confirm", for_each="$.input.dishes"),
        "step 'confirm': [for-each]",
        "only a step that sends a command can run for each item",
    ),
    "for-each: the pivot": (
        _replace("deliver", for_each="$.input.dishes"),
        "step 'deliver': [for-each]",
        "the pivot is one point of no return: it cannot fan out",
    ),
    "for-each: $.item elsewhere": (
        _replace("pack", input={"dish": "$.item.name"}),
        "step 'pack': [input-reference]",
        "reads $.item, which only the input of a for_each step has",
    ),
    "trigger-condition": (
        _trigger(when="$.order.total > 0"),
        "trigger on 'orders.placed': [trigger-condition]",
        "expected $.event or $.meta at the start of a path",
    ),
    "trigger-reference: saga_id": (
        _trigger(saga_id="order-{$.order.id}"),
        "trigger on 'orders.placed': [trigger-reference]",
        "saga_id reads '$.order.id': use $.event or $.meta",
    ),
    "trigger-reference: input": (
        _trigger(input={"order": "$.input.order"}),
        "trigger on 'orders.placed': [trigger-reference]",
        "input reads '$.input.order': use $.event or $.meta",
    ),
    "trigger-topic": (
        lambda d: d["triggers"].append({"topic": "orders.placed"}),
        "trigger on 'orders.placed': [trigger-topic]",
        "the saga subscribes to this topic more than once",
    ),
    "outcome-reference": (
        lambda d: d["outcomes"][0].update(value={"x": "$.steps.nope.output"}),
        "outcome to 'orders.completed': [outcome-reference]",
        "reads step 'nope', which is not a step",
    ),
}


ALSO = {
    "no-effect: the pivot": [
        "saga 'order', steps ['confirm', 'deliver']: [single-pivot] a saga has at most one pivot"
    ],
}
"""The other rules a case's edit breaks, by case."""


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_yaml_names_the_step_and_the_rule(case: str) -> None:
    edit, where, what = BROKEN[case]
    data = yaml.safe_load(ORDER_YAML)
    edit(data)
    texts: list[tuple[Callable[[str], SagaDefinition], str]] = [
        (SagaDefinition.from_yaml, yaml.safe_dump(data, sort_keys=False)),
        (SagaDefinition.from_json, json.dumps(data)),
    ]
    for load, text in texts:
        with pytest.raises(DefinitionError) as caught:
            load(text)
        assert caught.value.saga == "order"
        # The rule's message names the saga, the step (or the trigger or outcome) and the rule,
        # and says what is wrong; the edit breaks no other rule (but those of `ALSO`).
        problems = caught.value.problems
        others = [p for p in problems if not p.startswith(f"saga 'order', {where} ")]
        assert others == ALSO.get(case, []), problems
        (problem,) = [p for p in problems if p not in others]
        assert what in problem
        assert problem in str(caught.value)
