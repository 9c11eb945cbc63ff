"""Definitions: both schemas, every rule, and retry policies."""

from __future__ import annotations

import pytest

from saga import DefinitionError, DependencyType, RetryPolicy, SagaDefinition, Step

YAML = """
name: order
version: 2
steps:
  - {name: pay, service: payment, action: charge, compensation: refund,
     input: {amount: "$.input.total"}}
  - {name: kitchen, service: restaurant, action: accept, compensation: cancel, depends_on: [pay]}
  - {name: rider, service: rider, action: assign, compensation: release,
     depends_on: ["kitchen:ss"]}
  - {name: cook, service: restaurant, action: cook, kind: pivot,
     depends_on: [kitchen, {step: rider, type: ff}]}
  - {name: notify, service: mail, action: send, kind: retriable, depends_on: [cook],
     retry: {max_attempts: 8, initial_backoff: 0.5}}
"""


def step(name: str, **kw: object) -> Step:
    kw.setdefault("service", "svc")
    kw.setdefault("action", "do")
    if kw.get("kind", "compensatable") == "compensatable":
        kw.setdefault("compensation", "undo")
    return Step(name=name, **kw)  # type: ignore[arg-type]


def test_yaml_json_and_python_agree() -> None:
    d = SagaDefinition.from_yaml(YAML)
    assert d.pivot == "cook"
    assert d.step("rider").depends_on[0].type is DependencyType.START_TO_START
    assert d.step("cook").depends_on[1].type is DependencyType.FINISH_TO_FINISH
    assert d.step("notify").retry.max_attempts == 8
    import json

    again = SagaDefinition.from_json(json.dumps(d.to_dict()))
    assert again == d
    assert SagaDefinition.from_dict(d.to_dict()).to_dict() == d.to_dict()


def rule_of(exc: DefinitionError) -> str:
    return " ".join(exc.problems)


@pytest.mark.parametrize(
    ("steps", "rule", "names"),
    [
        ([step("a"), step("a")], "[unique-names]", "step 'a'"),
        ([step("a", depends_on=["ghost"])], "[known-dependency]", "step 'a'"),
        ([step("a", depends_on=["b"]), step("b", depends_on=["a"])], "[acyclic]", "a -> b -> a"),
        ([step("a", depends_on=["a"])], "[acyclic]", "step 'a'"),
        ([Step(name="a", service="s", action="x")], "[compensation-required]", "step 'a'"),
        ([step("p", kind="pivot", compensation="undo")], "[no-compensation]", "step 'p'"),
        ([step("p", kind="pivot"), step("q", kind="pivot")], "[single-pivot]", "'p', 'q'"),
        ([step("r", kind="retriable")], "[retriable-after-pivot]", "step 'r'"),
        (
            [step("r", kind="retriable"), step("p", kind="pivot", depends_on=["r"])],
            "[retriable-after-pivot]",
            "step 'r'",
        ),
        (
            [step("p", kind="pivot"), step("c", depends_on=["p"])],
            "[compensatable-before-pivot]",
            "step 'c'",
        ),
        (
            [
                step("p", kind="pivot"),
                step("r", kind="retriable", depends_on=["p"]),
                step("c", depends_on=["r"]),
            ],
            "[compensatable-before-pivot]",
            "step 'c'",
        ),
        (
            [step("a"), step("b", input={"x": "$.steps.a.output.id"})],
            "[input-reference]",
            "step 'b'",
        ),
        (
            [step("a"), step("b", depends_on=["a:ss"], input={"x": "$.steps.a.output.id"})],
            "[input-reference]",
            "finish-to-start",
        ),
        ([step("a", input={"x": "$.nowhere"})], "[input-reference]", "step 'a'"),
    ],
)
def test_each_rule_names_the_step_and_the_rule(steps: list[Step], rule: str, names: str) -> None:
    with pytest.raises(DefinitionError) as info:
        SagaDefinition(name="bad", steps=steps)
    text = str(info.value)
    assert rule in text
    assert names in text
    assert "saga 'bad'" in text


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(DefinitionError) as info:
        SagaDefinition(
            name="bad",
            steps=[Step(name="a", service="s", action="x"), step("b", depends_on=["zzz"])],
        )
    assert len(info.value.problems) == 2


def test_schema_errors_name_the_step() -> None:
    with pytest.raises(DefinitionError) as info:
        SagaDefinition.from_dict(
            {
                "name": "bad",
                "steps": [
                    {
                        "name": "slow",
                        "service": "s",
                        "action": "x",
                        "compensation": "y",
                        "timeout": -1,
                    }
                ],
            }
        )
    assert "step 'slow'" in str(info.value)
    assert "timeout" in str(info.value)


def test_backoff_is_deterministic_exponential_capped_and_jittered_within_band() -> None:
    policy = RetryPolicy(initial_backoff=1, multiplier=2, max_backoff=10, jitter=0.2)
    assert policy.backoff(1, "s") == policy.backoff(1, "s")
    bases = [1, 2, 4, 8, 10, 10]
    for attempt, base in enumerate(bases, start=1):
        value = policy.backoff(attempt, f"seed-{attempt}")
        assert base * 0.8 <= value <= base * 1.2
    spread = {round(policy.backoff(3, f"saga-{i}"), 6) for i in range(20)}
    assert len(spread) > 10  # different sagas do not retry in lockstep


def test_retry_policy_limits_attempts_and_error_types() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=("Timeout",))
    assert policy.allows_retry(1, "Timeout")
    assert not policy.allows_retry(1, "ValueError")
    assert not policy.allows_retry(3, "Timeout")
