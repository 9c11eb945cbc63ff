"""The authorization policy: who may ask the coordinator for what, decided by a pure function.

A policy is a small YAML file, read once at start-up::

    version: 1
    coordinators: [coordinator]          # principals whose commands participants run
    services:                            # which principals answer for which service
      payment: [payment]
    groups:
      operators: [alice, bob]
    rules:
      - name: shop starts orders         # optional, used in messages
        who: [shop]                      # principals, or group:<name>
        may: [start, cancel]             # start cancel retry resolve signal approve
        sagas: [order_pasta]             # saga names, or "*" for every saga
        steps: ["*"]                     # only with signal/approve; default "*"

Principals are the names the signing keys are issued to (`saga.runtime.trust`); the policy only
names them, it never sees a key. Three decisions come out of it:

- `authorize`: may this principal start, cancel, retry, resolve, signal or approve this saga
  (and step)? Default deny: a request is honoured only when some rule allows it.
- `Policy.is_coordinator`: a participant runs a command only if a coordinator signed it.
- `Policy.speaks_for`: the coordinator accepts a reply for a step only from a principal of the
  step's service.

A principal may not be both a coordinator and a service's principal: a participant's key must
never be able to command other participants. Everything else wrong with a file (an unknown
action, group or key, an empty ``who``, ``steps`` on an action that has none) is a
`PolicyError` listing every problem with the rule it is in (numbered from 1, as a reader counts
the list, and named when it has a name). `check_policy` then checks the file against what the
process knows: the keyring's principals, the definitions' saga names and services.

The module is pure: `parse_policy` takes the file's text; reading the file is the runtime's
(`saga.runtime.trust.load_policy`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from saga.errors import DefinitionError, SagaError

__all__ = [
    "ACTIONS",
    "STEP_ACTIONS",
    "Action",
    "Policy",
    "PolicyError",
    "Rule",
    "authorize",
    "check_policy",
    "parse_policy",
    "valid_name",
]

Action = Literal["start", "cancel", "retry", "resolve", "signal", "approve"]
"""What a request asks of the coordinator."""

ACTIONS: tuple[Action, ...] = get_args(Action)
"""Every action, in the order messages list them."""

STEP_ACTIONS: frozenset[Action] = frozenset({"signal", "approve"})
"""The actions that concern one step of a saga (and so may be limited by ``steps``)."""

WILDCARD = "*"
GROUP_PREFIX = "group:"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


def valid_name(name: str) -> bool:
    """Whether ``name`` may be a principal or a key id: 1 to 128 ASCII letters, digits and
    ``. _ - @``, not starting with ``.`` or ``-``.

    The names go into record headers, log lines and key file names (``<principal>.key``), so
    they carry no separators, spaces or colons (``group:`` marks a group in a rule).
    """
    return 0 < len(name) <= 128 and name[0] not in ".-" and all(c in _NAME_CHARS for c in name)


class PolicyError(DefinitionError):
    """A policy file breaks one or more rules, or does not fit what the process knows.

    A `saga.errors.DefinitionError` because it is one of the same kind: a declarative file
    that the engine refuses at start-up, every problem listed.

    Attributes:
        source: Where the policy came from (its path).
        problems: One line per problem, each naming the rule (or section) and what is wrong.
    """

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.saga = ""  # not about one saga; kept so that DefinitionError's readers still work
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        SagaError.__init__(self, f"policy {source} is invalid:\n{lines}")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: these principals may do these actions on these sagas (and steps)."""

    index: int
    """Its position in the file's ``rules``, counted from 1."""
    name: str | None
    principals: frozenset[str]
    """The principals named directly in ``who``."""
    groups: frozenset[str]
    """The groups named in ``who`` (without ``group:``)."""
    who: frozenset[str]
    """Every principal the rule covers: ``principals`` and the groups' members."""
    may: frozenset[Action]
    sagas: frozenset[str]
    """Saga names; ``*`` among them means every saga."""
    steps: frozenset[str]
    """Step names for the step actions; ``*`` among them means every step."""

    @property
    def label(self) -> str:
        """How messages name the rule: ``rule 2 ('operators retry')``."""
        return f"rule {self.index}" + (f" ({self.name!r})" if self.name else "")

    def allows(self, principal: str, action: Action, saga_name: str, step: str | None) -> bool:
        """Whether this rule lets ``principal`` do ``action`` on the saga (and step)."""
        if principal not in self.who or action not in self.may:
            return False
        if WILDCARD not in self.sagas and saga_name not in self.sagas:
            return False
        if action in STEP_ACTIONS and WILDCARD not in self.steps:
            return step is not None and step in self.steps
        return True


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, valid policy. Build it with `parse_policy`."""

    coordinators: frozenset[str]
    """Principals whose commands participants run."""
    services: Mapping[str, frozenset[str]]
    """Service name -> the principals that answer for it."""
    groups: Mapping[str, frozenset[str]]
    rules: tuple[Rule, ...]
    source: str = "<policy>"
    named: frozenset[str] = frozenset()
    """Every principal the policy names (see `principals`)."""

    def is_coordinator(self, principal: str) -> bool:
        """Whether ``principal`` is a coordinator's (whose commands participants run)."""
        return principal in self.coordinators

    def speaks_for(self, principal: str, service: str) -> bool:
        """Whether ``principal`` may reply for ``service``'s steps."""
        return principal in self.services.get(service, ())

    def principals(self) -> frozenset[str]:
        """Every principal the policy names: coordinators, services', groups' and rules'."""
        return self.named


def authorize(
    policy: Policy, principal: str, action: Action, saga_name: str, step: str | None = None
) -> str | None:
    """Decides a request: ``None`` if some rule allows it, else why not, in words.

    Default deny. ``step`` matters only for the step actions (signal, approve); a step action
    without a step is allowed only by a rule whose ``steps`` is ``*``.

    Args:
        policy: The policy.
        principal: The request's authenticated principal.
        action: What it asks.
        saga_name: The saga's name (the definition's).
        step: The step a signal or approval is for.
    """
    for rule in policy.rules:
        if rule.allows(principal, action, saga_name, step):
            return None
    what = (
        f"step {step!r} of saga {saga_name!r}" if action in STEP_ACTIONS else f"saga {saga_name!r}"
    )
    why = "no rule allows it"
    if principal not in policy.named:
        why += f"; the policy {policy.source} names no principal {principal!r}"
    return f"principal {principal!r} may not {action} {what} ({why})"


def check_policy(
    policy: Policy,
    *,
    known_principals: Iterable[str],
    saga_names: Iterable[str] | None = None,
    services: Iterable[str] | None = None,
) -> None:
    """Checks a policy against what the process knows, listing every mismatch.

    Args:
        policy: The policy.
        known_principals: The principals that have a key (the keyring's).
        saga_names: The definitions' names, if known: every saga a rule names must be one.
        services: The definitions' services, if known: each must have a principal.

    Raises:
        PolicyError: A principal without a key, a saga without a definition, or a service
            without a principal.
    """
    known = frozenset(known_principals)
    problems: list[str] = []

    def unknown(where: str, names: Iterable[str]) -> None:
        for p in sorted(set(names) - known):
            problems.append(
                f"{where}: principal {p!r} has no key in the keyring (create one with "
                f"`saga keys new {p} --keyring FILE`, or remove it from the policy)"
            )

    unknown("coordinators", policy.coordinators)
    for service, members in sorted(policy.services.items()):
        unknown(f"services.{service}", members)
    for group, members in sorted(policy.groups.items()):
        unknown(f"group {group!r}", members)
    for rule in policy.rules:
        unknown(rule.label, rule.principals)
    if saga_names is not None:
        names = frozenset(saga_names)
        listed = ", ".join(sorted(names)) or "none"
        for rule in policy.rules:
            for s in sorted(rule.sagas - names - {WILDCARD}):
                problems.append(f"{rule.label}: no saga definition named {s!r} (known: {listed})")
    if services is not None:
        for service in sorted(set(services)):
            if not policy.services.get(service):
                problems.append(
                    f"services: service {service!r} of the definitions has no principal, so "
                    f"every reply of its steps would be refused; add `{service}: [PRINCIPAL]`"
                )
    if problems:
        raise PolicyError(policy.source, problems)


# -- parsing ---------------------------------------------------------------------------------------


def _one_or_many(value: Any) -> Any:
    # `who: shop` reads as `who: [shop]`.
    return [value] if isinstance(value, str) else value


class _RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = None
    who: list[str]
    may: list[str]
    sagas: list[str]
    steps: list[str] | None = None

    _listify = field_validator("who", "may", "sagas", "steps", mode="before")(_one_or_many)


class _PolicyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: int
    coordinators: list[str]
    services: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {}
    rules: list[Any] = []

    _listify = field_validator("coordinators", mode="before")(_one_or_many)


def _schema_problems(where: str, exc: ValidationError, model: type[BaseModel]) -> list[str]:
    expected = ", ".join(model.model_fields)
    found = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            found.append(f"{where}: unknown key {loc!r} (expected: {expected})")
        elif e["type"] == "missing":
            found.append(f"{where}: missing {loc!r}")
        else:
            found.append(f"{where}: {loc}: {e['msg']}")
    return found


def _names(where: str, names: Iterable[str], what: str, problems: list[str]) -> frozenset[str]:
    good = set()
    for n in names:
        if valid_name(n):
            good.add(n)
        else:
            problems.append(
                f"{where}: {n!r} is not a valid {what} name (letters, digits and . _ - @)"
            )
    return frozenset(good)


def _rule(
    index: int, raw: Any, groups: Mapping[str, frozenset[str]], problems: list[str]
) -> Rule | None:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    where = f"rule {index}" + (f" ({name!r})" if isinstance(name, str) and name else "")
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected a mapping with who, may and sagas")
        return None
    try:
        m = _RuleModel.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_schema_problems(where, exc, _RuleModel))
        return None
    before = len(problems)
    if not m.who:
        problems.append(f"{where}: `who` is empty; name principals or group:<name>")
    direct, group_names = set(), set()
    for w in m.who:
        if w.startswith(GROUP_PREFIX):
            g = w[len(GROUP_PREFIX) :]
            if g in groups:
                group_names.add(g)
            else:
                known = ", ".join(sorted(groups)) or "none are defined"
                problems.append(f"{where}: unknown group {g!r} (groups: {known})")
        else:
            direct.add(w)
    principals = _names(where, direct, "principal", problems)
    valid = ", ".join(ACTIONS)
    if not m.may:
        problems.append(f"{where}: `may` is empty; name actions ({valid})")
    may = set()
    for a in m.may:
        if a in ACTIONS:
            may.add(a)
        else:
            problems.append(f"{where}: unknown action {a!r} (valid: {valid})")
    if not m.sagas:
        problems.append(f"{where}: `sagas` is empty; name sagas, or '*' for every saga")
    if m.steps is not None:
        stepless = sorted(may - STEP_ACTIONS, key=ACTIONS.index)
        if stepless:
            problems.append(
                f"{where}: `steps` is given, but {', '.join(stepless)} "
                f"{'has' if len(stepless) == 1 else 'have'} no step (only approve and signal "
                "do): give the step-less actions a rule of their own"
            )
        if not m.steps:
            problems.append(f"{where}: `steps` is empty; name steps, or '*' for every step")
    if len(problems) > before:
        return None
    who = set(principals).union(*(groups[g] for g in group_names))
    return Rule(
        index=index,
        name=name if isinstance(name, str) and name else None,
        principals=principals,
        groups=frozenset(group_names),
        who=frozenset(who),
        may=frozenset(may),
        sagas=frozenset(m.sagas),
        steps=frozenset(m.steps if m.steps is not None else [WILDCARD]),
    )


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parses and validates a policy file's text.

    Args:
        text: The YAML text.
        source: Where it came from (a path), for messages.

    Raises:
        PolicyError: Every problem found, each naming its rule or section.
    """
    import yaml  # only here: a process without a policy file need not load a YAML parser

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(source, [f"not valid YAML: {exc}".replace("\n", " ")]) from None
    if not isinstance(data, Mapping):
        raise PolicyError(source, ["expected a mapping with version, coordinators and rules"])
    try:
        m = _PolicyModel.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(source, _schema_problems("policy", exc, _PolicyModel)) from None
    problems: list[str] = []
    if m.version != 1:
        problems.append(f"version: {m.version} is not supported (this release reads version 1)")
    if not m.coordinators:
        problems.append("coordinators: empty; name the coordinator's principal")
    coordinators = _names("coordinators", m.coordinators, "principal", problems)
    services: dict[str, frozenset[str]] = {}
    for service, members in m.services.items():
        if not members:
            problems.append(f"services.{service}: empty; name the principals of the service")
        services[service] = _names(f"services.{service}", members, "principal", problems)
        for p in sorted(services[service] & coordinators):
            problems.append(
                f"services.{service}: principal {p!r} is also a coordinator; a participant's "
                "key must never be able to command other participants: give them separate keys"
            )
    groups: dict[str, frozenset[str]] = {}
    for group, members in m.groups.items():
        if not members:
            problems.append(f"group {group!r}: empty")
        groups[group] = _names(f"group {group!r}", members, "principal", problems)
    rules = [_rule(i, raw, groups, problems) for i, raw in enumerate(m.rules, start=1)]
    if problems:
        raise PolicyError(source, problems)
    good = tuple(r for r in rules if r is not None)
    named = coordinators.union(*services.values(), *groups.values(), *(r.who for r in good))
    return Policy(
        coordinators=coordinators,
        services=services,
        groups=groups,
        rules=good,
        source=source,
        named=named,
    )
