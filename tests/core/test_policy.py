"""The authorization policy: every refusal of the file names its rule and problem, and
`authorize` allows what a rule allows and nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saga.core.policy import (
    ACTIONS,
    Action,
    Policy,
    PolicyError,
    authorize,
    check_policy,
    parse_policy,
    valid_name,
)
from saga.errors import DefinitionError

POLICY = """
version: 1
coordinators: [coordinator]
services:
  payment: [payment]
  restaurant: [restaurant, restaurant-eu]
groups:
  operators: [alice, bob]
rules:
  - name: shop starts orders
    who: [shop]
    may: [start, cancel]
    sagas: [order_pasta]
  - name: operators
    who: [group:operators]
    may: [retry, resolve, cancel]
    sagas: "*"
  - name: chef approves
    who: carol
    may: [approve]
    sagas: [order_pasta]
    steps: [cook]
  - name: anyone signals
    who: [group:operators, dave]
    may: [signal]
    sagas: [order_pasta]
"""


def policy() -> Policy:
    return parse_policy(POLICY, "policy.yaml")


def problems(text: str) -> tuple[str, ...]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "bad.yaml")
    assert "policy bad.yaml is invalid" in str(info.value)
    return info.value.problems


def with_rule(rule: str) -> str:
    return f"version: 1\ncoordinators: [coordinator]\nrules:\n{rule}"


# -- parsing ---------------------------------------------------------------------------------------


def test_a_valid_policy_reads_as_written() -> None:
    p = policy()
    assert p.coordinators == {"coordinator"}
    assert p.services["restaurant"] == {"restaurant", "restaurant-eu"}
    assert p.groups == {"operators": {"alice", "bob"}}
    assert [r.label for r in p.rules] == [
        "rule 1 ('shop starts orders')",
        "rule 2 ('operators')",
        "rule 3 ('chef approves')",
        "rule 4 ('anyone signals')",
    ]
    assert p.rules[1].who == {"alice", "bob"}
    assert p.rules[1].groups == {"operators"}
    assert p.rules[3].principals == {"dave"}
    assert p.principals() == {
        "coordinator",
        "payment",
        "restaurant",
        "restaurant-eu",
        "alice",
        "bob",
        "shop",
        "carol",
        "dave",
    }
    assert p.is_coordinator("coordinator")
    assert not p.is_coordinator("payment")
    assert p.speaks_for("restaurant-eu", "restaurant")
    assert not p.speaks_for("payment", "restaurant")
    assert not p.speaks_for("payment", "no-such-service")


def test_policy_error_is_a_definition_error_listing_every_problem() -> None:
    found = problems(
        with_rule(
            "  - {who: [], may: [start], sagas: [a]}\n"
            "  - {name: two, who: [x], may: [restart], sagas: [a]}\n"
        )
    )
    assert len(found) == 2
    with pytest.raises(DefinitionError):
        parse_policy("version: 1", "p")


def test_unknown_action_names_the_rule_and_lists_the_valid_ones() -> None:
    (found,) = problems(with_rule("  - {name: ops, who: [alice], may: [restart], sagas: ['*']}"))
    assert found == (
        "rule 1 ('ops'): unknown action 'restart' "
        "(valid: start, cancel, retry, resolve, signal, approve)"
    )


def test_unknown_group() -> None:
    (found,) = problems(
        "version: 1\ncoordinators: [c]\ngroups: {ops: [a]}\nrules:\n"
        "  - {who: [shop], may: [start], sagas: [x]}\n"
        "  - {name: second, who: [group:operators], may: [start], sagas: [x]}\n"
    )
    assert found == "rule 2 ('second'): unknown group 'operators' (groups: ops)"


def test_empty_who_may_sagas_and_steps() -> None:
    found = problems(with_rule("  - {who: [], may: [], sagas: []}"))
    assert found[0].startswith("rule 1: `who` is empty")
    assert found[1].startswith("rule 1: `may` is empty")
    assert found[2].startswith("rule 1: `sagas` is empty")
    (found_steps,) = problems(with_rule("  - {who: [a], may: [approve], sagas: [x], steps: []}"))
    assert found_steps.startswith("rule 1: `steps` is empty")


def test_steps_on_an_action_without_a_step() -> None:
    (found,) = problems(
        with_rule(
            "  - {name: mixed, who: [a], may: [start, approve, retry], sagas: [x], steps: [cook]}"
        )
    )
    assert found.startswith("rule 1 ('mixed'): `steps` is given, but start, retry have no step")


def test_unknown_and_missing_keys_of_a_rule() -> None:
    found = problems(with_rule("  - {name: typo, whom: [a], may: [start], sagas: [x]}"))
    assert set(found) == {
        "rule 1 ('typo'): unknown key 'whom' (expected: name, who, may, sagas, steps)",
        "rule 1 ('typo'): missing 'who'",
    }


def test_unknown_top_level_key_and_missing_coordinators() -> None:
    found = problems("version: 1\nrule: []\n")
    assert set(found) == {
        "policy: unknown key 'rule' (expected: version, coordinators, services, groups, rules)",
        "policy: missing 'coordinators'",
    }


def test_a_principal_that_is_coordinator_and_service_is_refused() -> None:
    (found,) = problems(
        "version: 1\ncoordinators: [coordinator, payment]\nservices: {payment: [payment]}\n"
    )
    assert found.startswith("services.payment: principal 'payment' is also a coordinator")
    assert "never be able to command other participants" in found


def test_bad_version_yaml_names_and_shape() -> None:
    assert problems("version: 2\ncoordinators: [c]\n") == (
        "version: 2 is not supported (this release reads version 1)",
    )
    assert problems("version: [1\n")[0].startswith("not valid YAML")
    assert problems("- a list\n") == ("expected a mapping with version, coordinators and rules",)
    (bad_name,) = problems(with_rule("  - {who: ['a b'], may: [start], sagas: [x]}"))
    assert bad_name == "rule 1: 'a b' is not a valid principal name (letters, digits and . _ - @)"
    assert problems(with_rule("  - 3")) == ("rule 1: expected a mapping with who, may and sagas",)
    assert problems("version: 1\ncoordinators: []\n") == (
        "coordinators: empty; name the coordinator's principal",
    )


def test_valid_names() -> None:
    assert valid_name("payment-2026-12-01-ab12")
    assert valid_name("alice@example.com")
    for bad in ("", ".hidden", "-x", "a/b", "../x", "group:x", "a b", "é", "x" * 129):
        assert not valid_name(bad), bad


# -- authorize -------------------------------------------------------------------------------------


def test_a_rule_allows_its_principals_actions_on_its_sagas() -> None:
    p = policy()
    assert authorize(p, "shop", "start", "order_pasta") is None
    assert authorize(p, "shop", "cancel", "order_pasta") is None


def test_default_deny_with_a_readable_reason() -> None:
    p = policy()
    assert authorize(p, "shop", "retry", "order_pasta") == (
        "principal 'shop' may not retry saga 'order_pasta' (no rule allows it)"
    )
    assert authorize(p, "shop", "start", "refund_order") == (
        "principal 'shop' may not start saga 'refund_order' (no rule allows it)"
    )
    assert authorize(p, "mallory", "start", "order_pasta") == (
        "principal 'mallory' may not start saga 'order_pasta' (no rule allows it; the policy "
        "policy.yaml names no principal 'mallory')"
    )


def test_coordinators_and_services_are_not_allowed_requests_by_themselves() -> None:
    p = policy()
    for principal in ("coordinator", "payment"):
        for action in ACTIONS:
            assert authorize(p, principal, action, "order_pasta", "cook") is not None


def test_groups_and_the_saga_wildcard() -> None:
    p = policy()
    for who in ("alice", "bob"):
        assert authorize(p, who, "retry", "anything_at_all") is None
        assert authorize(p, who, "resolve", "order_pasta") is None
        assert authorize(p, who, "start", "order_pasta") is not None


def test_steps_limit_the_step_actions() -> None:
    p = policy()
    assert authorize(p, "carol", "approve", "order_pasta", "cook") is None
    assert authorize(p, "carol", "approve", "order_pasta", "deliver") == (
        "principal 'carol' may not approve step 'deliver' of saga 'order_pasta' (no rule allows it)"
    )
    assert authorize(p, "carol", "approve", "order_pasta") is not None  # no step: only "*"
    assert authorize(p, "carol", "signal", "order_pasta", "cook") is not None
    # steps default to "*": any step, and a step action without one
    assert authorize(p, "dave", "signal", "order_pasta", "deliver") is None
    assert authorize(p, "alice", "signal", "order_pasta") is None


@given(
    principal=st.sampled_from(["shop", "alice", "carol", "dave", "coordinator", "zed"]),
    action=st.sampled_from(ACTIONS),
    saga=st.sampled_from(["order_pasta", "other"]),
    step=st.sampled_from([None, "cook", "deliver"]),
)
def test_allowed_exactly_when_some_rule_allows(
    principal: str, action: Action, saga: str, step: str | None
) -> None:
    p = policy()
    expected = any(r.allows(principal, action, saga, step) for r in p.rules)
    assert (authorize(p, principal, action, saga, step) is None) == expected
    empty = parse_policy("version: 1\ncoordinators: [c]\n")
    assert authorize(empty, principal, action, saga, step) is not None


# -- check_policy ----------------------------------------------------------------------------------


def test_check_policy_passes_when_everything_is_known() -> None:
    p = policy()
    check_policy(
        p,
        known_principals=p.principals() | {"spare"},
        saga_names={"order_pasta", "refund"},
        services={"payment", "restaurant"},
    )


def test_check_policy_names_principals_without_keys_where_they_are() -> None:
    p = policy()
    with pytest.raises(PolicyError) as info:
        check_policy(p, known_principals=p.principals() - {"bob", "dave", "restaurant-eu"})
    assert info.value.problems == (
        "services.restaurant: principal 'restaurant-eu' has no key in the keyring (create one "
        "with `saga keys new restaurant-eu --keyring FILE`, or remove it from the policy)",
        "group 'operators': principal 'bob' has no key in the keyring (create one with "
        "`saga keys new bob --keyring FILE`, or remove it from the policy)",
        "rule 4 ('anyone signals'): principal 'dave' has no key in the keyring (create one "
        "with `saga keys new dave --keyring FILE`, or remove it from the policy)",
    )


def test_check_policy_names_unknown_sagas_and_services_without_principals() -> None:
    p = policy()
    with pytest.raises(PolicyError) as info:
        check_policy(
            p,
            known_principals=p.principals(),
            saga_names={"order"},
            services={"payment", "rider"},
        )
    assert info.value.problems == (
        "rule 1 ('shop starts orders'): no saga definition named 'order_pasta' (known: order)",
        "rule 3 ('chef approves'): no saga definition named 'order_pasta' (known: order)",
        "rule 4 ('anyone signals'): no saga definition named 'order_pasta' (known: order)",
        "services: service 'rider' of the definitions has no principal, so every reply of its "
        "steps would be refused; add `rider: [PRINCIPAL]`",
    )
