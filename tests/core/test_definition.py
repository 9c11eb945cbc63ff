"""Saga definitions: the three ways to write one, and every rule `definition.py` names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from saga.core.definition import (
    Dependency,
    DependencyType,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepKind,
)
from saga.core.graph import dot, mermaid
from saga.errors import DefinitionError, SagaError
from tests.core.support import make_step

ORDER_YAML = """
name: order
version: 3
description: take an order
steps:
  - name: location
    service: geo
    action: check
    compensation: forget
  - name: payment
    service: billing
    action: charge
    compensation: refund
    depends_on: location
    input:
      amount: $.input.total
      where: $.steps.location.output.zone
    retry:
      max_attempts: 5
      initial_backoff: 0.5
      retry_on: [ConnectionError, Timeout]
    timeout: 12
  - name: audit
    service: audit
    action: record
    compensation: erase
    depends_on: ["payment:ss"]
  - name: restaurant
    service: kitchen
    action: accept
    kind: pivot
    depends_on:
      - step: payment
      - {step: audit, type: ff}
  - name: rider
    service: riders
    action: assign
    kind: retriable
    depends_on: restaurant
    input: {order: $.saga_id, items: [$.input.items.0, literal]}
"""


def _data(*steps: dict[str, Any], name: str = "s") -> dict[str, Any]:
    return {"name": name, "steps": list(steps)}


def _s(name: str, **fields: Any) -> dict[str, Any]:
    """A compensatable step as plain data."""
    data: dict[str, Any] = {"name": name, "service": "svc", "action": f"do-{name}"}
    if fields.get("kind", "compensatable") == "compensatable":
        data["compensation"] = f"undo-{name}"
    data.update(fields)
    return data


def _problems(data: Any) -> tuple[str, ...]:
    with pytest.raises(DefinitionError) as caught:
        SagaDefinition.from_dict(data)
    assert caught.value.saga == (data.get("name", "?") if isinstance(data, dict) else "?")
    for problem in caught.value.problems:
        assert problem in str(caught.value)
    return caught.value.problems


def _one_problem(data: dict[str, Any], rule: str, step: str) -> str:
    """Asserts ``data`` breaks ``rule`` at ``step`` (and that this is its only problem)."""
    problems = _problems(data)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert f"[{rule}]" in problem
    assert f"step {step!r}" in problem
    assert f"saga {data['name']!r}" in problem
    return problem


# -- valid definitions -----------------------------------------------------------------------------


def test_python_definition() -> None:
    d = SagaDefinition(
        name="order",
        steps=(
            Step(name="a", service="sa", action="do-a", compensation="undo-a"),
            Step(name="b", service="sb", action="do-b", compensation="undo-b", depends_on="a"),
        ),
    )
    assert d.version == 1
    assert d.step("b").depends_on == (Dependency(step="a"),)
    assert d.step("b").depends_on[0].type is DependencyType.FINISH_TO_START
    assert d.dependents("a") == (("b", DependencyType.FINISH_TO_START),)
    assert d.dependents("b") == ()
    assert d.pivot is None
    assert d.has_step("a")
    assert not d.has_step("zz")
    with pytest.raises(KeyError):
        d.step("zz")


def test_yaml_definition() -> None:
    d = SagaDefinition.from_yaml(ORDER_YAML)
    assert d.name == "order"
    assert d.version == 3
    assert [s.name for s in d.steps] == ["location", "payment", "audit", "restaurant", "rider"]
    assert d.pivot == "restaurant"
    payment = d.step("payment")
    assert payment.retry == RetryPolicy(
        max_attempts=5, initial_backoff=0.5, retry_on=("ConnectionError", "Timeout")
    )
    assert payment.timeout == 12
    assert d.step("audit").depends_on == (
        Dependency(step="payment", type=DependencyType.START_TO_START),
    )
    assert d.step("restaurant").depends_on == (
        Dependency(step="payment"),
        Dependency(step="audit", type=DependencyType.FINISH_TO_FINISH),
    )
    assert d.step("rider").kind is StepKind.RETRIABLE
    assert d.step("rider").compensation is None
    assert sorted(d.dependents("payment")) == [
        ("audit", DependencyType.START_TO_START),
        ("restaurant", DependencyType.FINISH_TO_START),
    ]


def test_yaml_and_json_files(tmp_path: Path) -> None:
    from_text = SagaDefinition.from_yaml(ORDER_YAML)
    yaml_file = tmp_path / "order.yaml"
    yaml_file.write_text(ORDER_YAML)
    json_file = tmp_path / "order.json"
    json_file.write_text(json.dumps(from_text.to_dict()))
    assert SagaDefinition.from_yaml(yaml_file) == from_text
    assert SagaDefinition.from_json(json_file) == from_text
    assert SagaDefinition.from_json(json.dumps(from_text.to_dict()).encode()) == from_text


def test_file_paths_given_as_strings_are_read_as_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's form: `SagaDefinition.from_yaml("order.yaml")`, relative to the cwd.
    from_text = SagaDefinition.from_yaml(ORDER_YAML)
    monkeypatch.chdir(tmp_path)
    Path("order.yaml").write_text(ORDER_YAML)
    Path("order.yml").write_text(ORDER_YAML)
    Path("order.json").write_text(json.dumps(from_text.to_dict()))
    assert SagaDefinition.from_yaml("order.yaml") == from_text
    assert SagaDefinition.from_yaml("order.yml") == from_text
    assert SagaDefinition.from_yaml(str(tmp_path / "order.yaml")) == from_text
    assert SagaDefinition.from_yaml("order.json") == from_text  # JSON is YAML
    assert SagaDefinition.from_json("order.json") == from_text
    assert SagaDefinition.from_json(str(tmp_path / "order.json")) == from_text


def test_file_loaders_and_load_by_suffix(tmp_path: Path) -> None:
    from_text = SagaDefinition.from_yaml(ORDER_YAML)
    (tmp_path / "order.yaml").write_text(ORDER_YAML)
    (tmp_path / "order.saga").write_text(ORDER_YAML)  # any name: the loader says the format
    (tmp_path / "order.json").write_text(json.dumps(from_text.to_dict()))
    assert SagaDefinition.from_yaml_file(tmp_path / "order.yaml") == from_text
    assert SagaDefinition.from_yaml_file(str(tmp_path / "order.saga")) == from_text
    assert SagaDefinition.from_json_file(tmp_path / "order.json") == from_text
    assert SagaDefinition.load(tmp_path / "order.yaml") == from_text
    assert SagaDefinition.load(str(tmp_path / "order.json")) == from_text
    assert SagaDefinition.load(tmp_path / "order.saga") == from_text


@pytest.mark.parametrize(
    "load",
    [
        lambda p: SagaDefinition.from_yaml(p),
        lambda p: SagaDefinition.from_yaml(str(p)),
        lambda p: SagaDefinition.from_json(p),
        lambda p: SagaDefinition.from_yaml_file(p),
        lambda p: SagaDefinition.from_json_file(p),
        lambda p: SagaDefinition.load(p),
    ],
    ids=["yaml-path", "yaml-str", "json-path", "yaml_file", "json_file", "load"],
)
def test_a_missing_file_is_named_in_the_error(tmp_path: Path, load: Any) -> None:
    missing = tmp_path / "nowhere" / "order.yaml"
    with pytest.raises(FileNotFoundError) as caught:
        load(missing)
    message = str(caught.value)
    assert "no saga definition file" in message
    assert str(missing) in message
    assert "Input should be a valid dictionary" not in message


def test_a_missing_relative_file_says_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"order\.json") as caught:
        SagaDefinition.from_json("order.json")
    assert str(tmp_path / "order.json") in str(caught.value)


def test_text_is_still_text() -> None:
    # Multi-line text, or text not ending in a file suffix, is never taken for a path.
    one_line = "{name: one, steps: [{name: a, service: s, action: x, kind: pivot}]}"
    assert SagaDefinition.from_yaml(one_line).name == "one"
    mentions_a_file = ORDER_YAML + "# see order.yaml\n"
    assert SagaDefinition.from_yaml(mentions_a_file) == SagaDefinition.from_yaml(ORDER_YAML)
    as_json = json.dumps(SagaDefinition.from_yaml(one_line).to_dict())
    assert SagaDefinition.from_json(as_json).name == "one"
    assert SagaDefinition.from_json(as_json.encode()).name == "one"


def test_json_text_definition() -> None:
    text = json.dumps(_data(_s("a"), _s("b", depends_on=["a:sf"])))
    d = SagaDefinition.from_json(text)
    assert d.step("b").depends_on == (Dependency(step="a", type=DependencyType.START_TO_FINISH),)


@pytest.mark.parametrize(
    "source",
    [
        ORDER_YAML,
        "name: one\nsteps:\n  - {name: a, service: s, action: x, kind: pivot}\n",
    ],
)
def test_round_trip_through_plain_data(source: str) -> None:
    d = SagaDefinition.from_yaml(source)
    data = d.to_dict()
    assert SagaDefinition.from_dict(data) == d
    assert SagaDefinition.from_json(json.dumps(data)) == d
    assert SagaDefinition.from_dict(data).to_dict() == data
    assert json.loads(json.dumps(data)) == data  # plain JSON data, nothing else


def test_to_dict_drops_python_only_models() -> None:
    class Payload(BaseModel):
        amount: int

    d = SagaDefinition(
        name="s",
        steps=(make_step("a", input_model=Payload, output_model=Payload),),
        input_model=Payload,
    )
    data = d.to_dict()
    assert "input_model" not in data
    assert "input_model" not in data["steps"][0]
    assert "output_model" not in data["steps"][0]
    assert SagaDefinition.from_dict(data) == SagaDefinition(name="s", steps=(make_step("a"),))


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("a", DependencyType.FINISH_TO_START),
        ("a:fs", DependencyType.FINISH_TO_START),
        ("a:ss", DependencyType.START_TO_START),
        ("a:ff", DependencyType.FINISH_TO_FINISH),
        ("a:sf", DependencyType.START_TO_FINISH),
        ("a:SS", DependencyType.START_TO_START),
        ("a:start_to_finish", DependencyType.START_TO_FINISH),
        ({"step": "a"}, DependencyType.FINISH_TO_START),
        ({"step": "a", "type": "ff"}, DependencyType.FINISH_TO_FINISH),
        ({"step": "a", "type": "finish_to_finish"}, DependencyType.FINISH_TO_FINISH),
        (Dependency(step="a", type=DependencyType.START_TO_START), DependencyType.START_TO_START),
    ],
)
def test_dependency_shorthand(written: Any, expected: DependencyType) -> None:
    assert Dependency.model_validate(written) == Dependency(step="a", type=expected)
    d = SagaDefinition.from_dict(_data(_s("a"), _s("b", depends_on=written)))
    assert d.step("b").depends_on == (Dependency(step="a", type=expected),)
    assert d.dependents("a") == (("b", expected),)


def test_unknown_dependency_type_is_a_schema_error() -> None:
    problems = _problems(_data(_s("a"), _s("b", depends_on="a:xx")))
    assert any("step 'b'" in p and "[schema]" in p and "depends_on" in p for p in problems)


def test_definitions_are_frozen() -> None:
    d = SagaDefinition(name="s", steps=(make_step("a"),))
    with pytest.raises(ValidationError):
        d.name = "t"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        d.steps[0].timeout = 1  # type: ignore[misc]


def test_graph_renders_every_step_and_edge() -> None:
    d = SagaDefinition.from_yaml(ORDER_YAML)
    text = mermaid(d)
    assert text.startswith("flowchart LR\n")
    assert "s_payment -->|SS| s_audit" in text
    assert "s_audit -->|FF| s_restaurant" in text
    graph = dot(d)
    assert '"restaurant" [label=' in graph
    assert "shape=diamond" in graph
    assert '"payment" -> "audit" [label="SS"];' in graph


# -- the rules, one bad definition each ------------------------------------------------------------


def test_rule_unique_names() -> None:
    _one_problem(_data(_s("a"), _s("a")), "unique-names", "a")


def test_rule_known_dependency() -> None:
    problem = _one_problem(_data(_s("a"), _s("b", depends_on="ghost")), "known-dependency", "b")
    assert "'ghost'" in problem


def test_rule_acyclic_cycle() -> None:
    data = _data(_s("a", depends_on="c"), _s("b", depends_on="a"), _s("c", depends_on="b:ss"))
    problem = _one_problem(data, "acyclic", "a")
    assert "a -> b -> c -> a" in problem


def test_rule_acyclic_cycle_of_mixed_dependency_types() -> None:
    data = _data(_s("a", depends_on="b:ff"), _s("b", depends_on="a:sf"))
    _one_problem(data, "acyclic", "a")


def test_rule_acyclic_self_dependency() -> None:
    problem = _one_problem(_data(_s("a"), _s("b", depends_on="b")), "acyclic", "b")
    assert "itself" in problem


def test_rule_compensation_required() -> None:
    step = _s("pay")
    del step["compensation"]
    _one_problem(_data(_s("a"), step), "compensation-required", "pay")


@pytest.mark.parametrize("kind", ["pivot", "retriable"])
def test_rule_no_compensation(kind: str) -> None:
    steps = [_s("p", kind="pivot")] if kind == "retriable" else []
    steps.append(
        _s("x", kind=kind, compensation="undo", depends_on=steps[0]["name"] if steps else ())
    )
    problem = _one_problem(_data(*steps), "no-compensation", "x")
    assert kind in problem


def test_rule_single_pivot() -> None:
    problems = _problems(_data(_s("a"), _s("p", kind="pivot"), _s("q", kind="pivot")))
    # two steps share the blame: both are named
    assert problems == ("saga 's', steps ['p', 'q']: [single-pivot] a saga has at most one pivot",)


def test_rule_retriable_needs_a_pivot() -> None:
    problem = _one_problem(
        _data(_s("a"), _s("r", kind="retriable", depends_on="a")), "retriable-after-pivot", "r"
    )
    assert "needs a pivot" in problem


def test_rule_retriable_not_an_ancestor_of_the_pivot() -> None:
    data = _data(_s("r", kind="retriable"), _s("p", kind="pivot", depends_on="r"))
    problems = _problems(data)
    assert any("[retriable-after-pivot]" in p and "step 'r'" in p and "'p'" in p for p in problems)


def test_rule_compensatable_before_pivot() -> None:
    data = _data(_s("p", kind="pivot"), _s("c", depends_on="p"))
    problems = _problems(data)
    assert any("[compensatable-before-pivot]" in p and "step 'c'" in p for p in problems)


def test_rule_compensatable_before_pivot_through_a_retriable_step() -> None:
    data = _data(
        _s("p", kind="pivot"), _s("r", kind="retriable", depends_on="p"), _s("c", depends_on="r")
    )
    problems = _problems(data)
    assert any("[compensatable-before-pivot]" in p and "step 'c'" in p for p in problems)


def test_rule_pivot_order() -> None:
    # No declared path runs from the pivot to c or from r to the pivot, but the engine runs
    # c before p and r after p, so c waiting for r can never happen.
    data = _data(_s("p", kind="pivot"), _s("r", kind="retriable"), _s("c", depends_on="r"))
    problem = _one_problem(data, "pivot-order", "c")
    assert "c -> p -> r -> c" in problem


def test_rule_pivot_order_allows_unrelated_branches() -> None:
    d = SagaDefinition.from_dict(
        _data(_s("c1"), _s("c2"), _s("p", kind="pivot"), _s("r", kind="retriable"))
    )
    assert d.pivot == "p"


def test_rule_input_reference_without_finish_to_start() -> None:
    data = _data(_s("a", input={"x": "$.steps.b.output.id"}), _s("b"))
    problem = _one_problem(data, "input-reference", "a")
    assert "'b'" in problem


def test_rule_input_reference_start_to_start_is_not_enough() -> None:
    data = _data(_s("a"), _s("b", depends_on="a:ss", input={"x": "$.steps.a.output.id"}))
    _one_problem(data, "input-reference", "b")


def test_rule_input_reference_through_a_transitive_finish_to_start() -> None:
    data = _data(
        _s("a"), _s("b", depends_on="a"), _s("c", depends_on="b", input=["$.steps.a.output"])
    )
    SagaDefinition.from_dict(data)


def test_rule_input_reference_to_an_unknown_step() -> None:
    problem = _one_problem(_data(_s("a", input=["$.steps.ghost.output"])), "input-reference", "a")
    assert "'ghost'" in problem


def test_rule_input_reference_with_an_unknown_root() -> None:
    problem = _one_problem(
        _data(_s("a", input={"x": {"y": "$.inptu.total"}})), "input-reference", "a"
    )
    assert "'inptu'" in problem


def test_several_problems_reported_at_once() -> None:
    broken = _s("b", depends_on="ghost")
    del broken["compensation"]
    data = _data(_s("a"), _s("a"), broken, _s("p", kind="pivot", compensation="u"))
    problems = _problems(data)
    tags = sorted(p[p.index("[") : p.index("]") + 1] for p in problems)
    assert tags == [
        "[compensation-required]",
        "[known-dependency]",
        "[no-compensation]",
        "[unique-names]",
    ]
    assert any("step 'b'" in p and "[known-dependency]" in p for p in problems)
    assert any("step 'b'" in p and "[compensation-required]" in p for p in problems)
    assert any("step 'p'" in p and "[no-compensation]" in p for p in problems)


def test_python_definitions_are_checked_too() -> None:
    with pytest.raises(DefinitionError) as caught:
        SagaDefinition(name="s", steps=(make_step("a", after=["ghost"]),))
    assert isinstance(caught.value, SagaError)
    assert "[known-dependency]" in str(caught.value)
    assert "step 'a'" in str(caught.value)


# -- schema errors ---------------------------------------------------------------------------------


def test_schema_missing_field_names_the_step() -> None:
    step = _s("pay")
    del step["name"]
    problems = _problems(_data(_s("a"), step))
    assert problems == ("saga 's', step '#1': [schema] name: Field required",)


def test_a_command_step_without_its_service_names_the_step() -> None:
    step = _s("pay")
    del step["service"]
    problems = _problems(_data(_s("a"), step))
    assert problems == (
        "saga 's', step 'pay': [step-work] a step with an action needs the service that runs it",
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout", -1),
        ("timeout", 0),
        ("retry", {"max_attempts": 0}),
        ("retry", {"initial_backoff": -0.5}),
        ("retry", {"jitter": 1.5}),
        ("kind", "optional"),
        ("name_typo", "x"),
    ],
)
def test_schema_bad_field_names_the_step_and_field(field: str, value: Any) -> None:
    problems = _problems(_data(_s("a"), _s("pay", **{field: value})))
    assert len(problems) == 1, problems
    assert problems[0].startswith("saga 's', step 'pay': [schema] ")
    assert field in problems[0]


def test_schema_error_in_the_only_step_is_reported_once() -> None:
    problems = _problems(_data(_s("pay", timeout=-1)))
    assert problems == ("saga 's', step 'pay': [schema] timeout: Input should be greater than 0",)


def test_schema_errors_at_saga_level() -> None:
    assert any("[schema] name" in p for p in _problems({"steps": [_s("a")]}))
    assert any("[schema] steps" in p for p in _problems({"name": "s", "steps": []}))
    assert any("[schema] definition" in p for p in _problems([1]))
    assert any("[schema] version" in p for p in _problems({**_data(_s("a")), "version": 0}))


def test_schema_error_in_a_nameless_step_names_its_position() -> None:
    problems = _problems(_data(_s("a"), {"service": "s", "action": "x", "compensation": "u"}))
    assert any("step '#1'" in p and "name: Field required" in p for p in problems)


# -- finite numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "NaN"])
@pytest.mark.parametrize(
    ("field", "where"),
    [
        ("timeout", "timeout"),
        ("retry.initial_backoff", "retry.initial_backoff"),
        ("retry.multiplier", "retry.multiplier"),
        ("retry.max_backoff", "retry.max_backoff"),
        ("retry.jitter", "retry.jitter"),
        ("compensation_retry.max_backoff", "compensation_retry.max_backoff"),
    ],
)
def test_rule_finite_rejects_inf_and_nan_in_every_float(field: str, where: str, value: Any) -> None:
    # An infinite timeout or backoff would leave a saga waiting for ever.
    head, _, tail = field.partition(".")
    step = _s("pay", **({head: {tail: value}} if tail else {head: value}))
    problem = _one_problem(_data(_s("a"), step), "finite", "pay")
    assert problem.startswith(f"saga 's', step 'pay': [finite] {where}: ")
    assert "a finite number" in problem


@pytest.mark.parametrize(
    "text",
    [
        "name: s\nsteps:\n  - {name: a, service: s, action: x, kind: pivot, timeout: .inf}\n",
        "name: s\nsteps:\n  - {name: a, service: s, action: x, kind: pivot, timeout: .nan}\n",
        "name: s\nsteps:\n  - name: a\n    service: s\n    action: x\n    kind: pivot\n"
        "    retry: {max_backoff: .inf}\n",
    ],
)
def test_rule_finite_in_yaml(text: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        SagaDefinition.from_yaml(text)
    (problem,) = caught.value.problems
    assert problem.startswith("saga 's', step 'a': [finite] ")


def test_rule_finite_in_json() -> None:
    text = '{"name": "s", "steps": [{"name": "a", "service": "s", "action": "x", "kind": "pivot",'
    with pytest.raises(DefinitionError) as caught:
        SagaDefinition.from_json(text + ' "timeout": Infinity}]}')
    assert caught.value.problems[0].startswith("saga 's', step 'a': [finite] timeout: ")


def test_python_definitions_refuse_inf_and_nan_too() -> None:
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValidationError, match="finite number"):
            Step(name="a", service="s", action="x", kind="pivot", timeout=bad)
        with pytest.raises(ValidationError, match="finite number"):
            RetryPolicy(max_backoff=bad)


# -- the digest ------------------------------------------------------------------------------------


def test_digest_is_a_stable_hash_of_the_content() -> None:
    d = SagaDefinition.from_yaml(ORDER_YAML)
    assert len(d.digest) == 16
    assert all(c in "0123456789abcdef" for c in d.digest)
    # Whichever way it is written: Python, YAML, JSON, or with the defaults spelled out.
    assert SagaDefinition.from_json(json.dumps(d.to_dict())).digest == d.digest
    spelled = d.model_dump(mode="json")
    assert SagaDefinition.from_dict(spelled).digest == d.digest
    assert SagaDefinition.from_dict(json.loads(json.dumps(spelled, indent=3))).digest == d.digest
    # A known value, so that a change to the hashing (which would make every recorded digest
    # look foreign) is seen here first.
    one = SagaDefinition(name="one", steps=(Step(name="a", service="s", action="x", kind="pivot"),))
    assert one.digest == SagaDefinition.from_dict(one.to_dict()).digest
    assert one.digest == "8abdabb898f7f145"


@pytest.mark.parametrize(
    "change",
    [
        lambda data: data["steps"][0].update(timeout=11),
        lambda data: data["steps"][0].update(action="other"),
        lambda data: data["steps"][1]["retry"].update(max_attempts=6),
        lambda data: data.update(description="changed"),
        lambda data: data["steps"].reverse(),
    ],
)
def test_digest_changes_with_any_field(change: Any) -> None:
    d = SagaDefinition.from_yaml(ORDER_YAML)
    data = d.to_dict()
    change(data)
    assert SagaDefinition.from_dict(data).digest != d.digest


def test_digest_covers_python_only_models() -> None:
    class Payload(BaseModel):
        amount: int

    class Other(BaseModel):
        amount: str

    plain = SagaDefinition(name="s", steps=(make_step("a"),))
    typed = SagaDefinition(name="s", steps=(make_step("a"),), input_model=Payload)
    step_typed = SagaDefinition(name="s", steps=(make_step("a", output_model=Payload),))
    other = SagaDefinition(name="s", steps=(make_step("a"),), input_model=Other)
    assert len({plain.digest, typed.digest, step_typed.digest, other.digest}) == 4
    again = SagaDefinition(name="s", steps=(make_step("a"),), input_model=Payload)
    assert again.digest == typed.digest


def test_malformed_yaml_or_json_is_not_a_definition_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        SagaDefinition.from_json("{")


# -- retry policies --------------------------------------------------------------------------------


def test_backoff_is_deterministic() -> None:
    policy = RetryPolicy()
    assert policy.backoff(2, "saga/a/action") == policy.backoff(2, "saga/a/action")
    assert RetryPolicy().backoff(2, "saga/a/action") == policy.backoff(2, "saga/a/action")
    seeds = {policy.backoff(2, f"saga-{i}/a/action") for i in range(20)}
    assert len(seeds) > 1  # the jitter does depend on the seed


def test_backoff_without_jitter_is_exact_and_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.5, multiplier=3, max_backoff=10, jitter=0)
    assert [policy.backoff(n, "s") for n in range(1, 6)] == [0.5, 1.5, 4.5, 10, 10]


def test_allows_retry() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=("Timeout",))
    assert policy.allows_retry(1, "Timeout")
    assert policy.allows_retry(2, "Timeout")
    assert not policy.allows_retry(3, "Timeout")
    assert not policy.allows_retry(1, "ConnectionError")
    assert RetryPolicy(max_attempts=2).allows_retry(1, "anything")
    assert not RetryPolicy(max_attempts=1).allows_retry(1, "anything")


policies = st.builds(
    RetryPolicy,
    initial_backoff=st.floats(0.001, 100),
    multiplier=st.floats(1, 10),
    max_backoff=st.floats(0, 1000),
    jitter=st.floats(0, 1),
)


@settings(max_examples=200, deadline=None)
@given(policy=policies, attempt=st.integers(1, 60), seed=st.text(max_size=20))
def test_backoff_stays_in_the_jitter_band_and_under_the_cap(
    policy: RetryPolicy, attempt: int, seed: str
) -> None:
    base = min(policy.initial_backoff * policy.multiplier ** (attempt - 1), policy.max_backoff)
    delay = policy.backoff(attempt, seed)
    assert delay == policy.backoff(attempt, seed)
    assert base * (1 - policy.jitter) - 1e-9 <= delay <= base * (1 + policy.jitter) + 1e-9
    assert 0 <= delay <= policy.max_backoff * (1 + policy.jitter) + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.01, 10),
    multiplier=st.floats(2, 4),
    jitter=st.floats(0, 0.3),
    attempt=st.integers(1, 30),
    seed=st.text(max_size=10),
)
def test_backoff_grows_until_the_cap(
    initial: float, multiplier: float, jitter: float, attempt: int, seed: str
) -> None:
    # With a multiplier of at least 2 and jitter of at most 30%, the bands of successive
    # attempts do not overlap, so every delay is longer than the one before, up to the cap.
    cap = 1e6
    policy = RetryPolicy(
        initial_backoff=initial, multiplier=multiplier, jitter=jitter, max_backoff=cap
    )
    if initial * multiplier**attempt <= cap:
        assert policy.backoff(attempt + 1, seed) > policy.backoff(attempt, seed)
