"""`Trust`: what one process needs to sign what it sends and to check what it receives (its
signing key, the keyring, the authorization policy), loaded from its settings and checked
against each other before it touches a saga; or, for local development only, unsigned.

The signatures themselves, and the keyring that verifies them, are `saga.runtime.signing`
(every name of which this module re-exports); what a principal may do is `saga.core.policy`.

Errors::

    SagaError
    ├── ConfigurationError
    │   └── TrustError      the trust settings cannot be used: a missing or readable key file,
    │                       a keyring or key that does not match (at start-up)
    └── Unauthenticated     a record is unsigned or its signature does not verify
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from saga.errors import UsageError
from saga.runtime.signing import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_HEADERS,
    SIGNER_HEADER,
    KeyEntry,
    Keyring,
    SigningKey,
    TrustError,
    Unauthenticated,
    new_key,
    read_setting_file,
)

# The policy's module (pydantic's models, yaml) is imported where a policy is read or checked:
# `saga --help`, whose options name this module's settings, does not load it.
if TYPE_CHECKING:
    from saga.core.policy import Policy

__all__ = [
    "DEFAULT_MAX_CLOCK_SKEW",
    "DEFAULT_MAX_REQUEST_AGE",
    "ENV_SETTINGS",
    "KEY_ID_HEADER",
    "SIGNATURE_HEADER",
    "SIGNATURE_HEADERS",
    "SIGNER_HEADER",
    "UNSIGNED_WARNING",
    "KeyEntry",
    "Keyring",
    "Role",
    "SigningKey",
    "Trust",
    "TrustError",
    "Unauthenticated",
    "load_policy",
    "new_key",
]

DEFAULT_MAX_REQUEST_AGE = 86_400.0
"""Seconds a signed request is honoured for after its ``at`` (one day).

A signature proves who made a request, not that it is being made now: a request recorded off
the topic could be written again later. Within the window, the coordinator can recognise a
replay by its message id (it needs to remember ids only that long); past it, the request is
refused whatever it is. One day is longer than a coordinator outage or a client's retries are
expected to last, so no legitimate request is lost to it, and short enough that a replayed
``retry`` or ``cancel`` from last week is refused. Set ``SAGA_MAX_REQUEST_AGE`` to change it.
"""

DEFAULT_MAX_CLOCK_SKEW = 300.0
"""Seconds a request may be dated in the future (clocks disagree); a request dated later would
stretch its own replay window, so it is refused."""

UNSIGNED_WARNING = (
    "UNSIGNED MODE: messages are neither signed nor verified, and no authorization policy is "
    "enforced. Anything that can write to the topics can start, cancel, retry and resolve any "
    "saga, forge any step's reply, and make participants run any command. Use this only for "
    "local development; in any other setting give SAGA_SIGNING_KEY, SAGA_KEYRING and "
    "SAGA_POLICY (see `saga keys new` and `saga policy check`)."
)
"""What the coordinator logs, at WARNING, when it starts in unsigned mode."""

Role = Literal["coordinator", "participant", "client"]
"""What a process is, for `Trust.check_role`."""

ENV_SETTINGS: Mapping[str, str] = {
    "signing_key": "SAGA_SIGNING_KEY",
    "keyring": "SAGA_KEYRING",
    "policy": "SAGA_POLICY",
    "unsigned": "SAGA_UNSIGNED",
    "max_request_age": "SAGA_MAX_REQUEST_AGE",
}
"""The environment variables `Trust.from_env` reads, by `Trust.load` argument."""


def load_policy(path: str | Path, *, setting: str | None = None) -> Policy:
    """Reads and parses a policy file (`saga.core.policy.parse_policy`).

    Args:
        path: The file.
        setting: The setting that named it (``SAGA_POLICY``), for messages.

    Raises:
        TrustError: No such file.
        PolicyError: It is not a valid policy.
    """
    from saga.core.policy import parse_policy

    source = f"{path} ({setting})" if setting else str(path)
    text = read_setting_file(Path(path), "policy", "an editor: its format is in saga.core.policy")
    return parse_policy(text, source)


# -- one process's trust ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trust:
    """What one process needs to sign what it sends and to check what it receives.

    The coordinator signs commands and verifies requests and replies (signer, keyring,
    policy); a participant signs replies and verifies commands (signer, keyring, and the
    policy's coordinators); a client signs requests (signer). Build one with `from_env`,
    `load`, `signed` or, for local development only, `unsigned`.
    """

    mode: Literal["signed", "unsigned"]
    signer: SigningKey | None = None
    keyring: Keyring | None = None
    policy: Policy | None = None
    max_request_age: float = DEFAULT_MAX_REQUEST_AGE
    """Seconds a signed request is honoured for (see `DEFAULT_MAX_REQUEST_AGE`)."""
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW
    """Seconds a request may be dated ahead of the coordinator's clock."""

    def __post_init__(self) -> None:
        pieces = (self.signer, self.keyring, self.policy)
        if self.mode == "unsigned" and any(p is not None for p in pieces):
            raise UsageError("an unsigned Trust has no signer, keyring or policy")
        if self.mode == "signed" and all(p is None for p in pieces):
            raise UsageError("a signed Trust needs a signer, a keyring or a policy")
        if not self.max_request_age > 0 or not self.max_clock_skew >= 0:
            raise UsageError("max_request_age must be positive and max_clock_skew not negative")

    @property
    def is_signed(self) -> bool:
        """Whether messages are signed and verified (false only in development mode)."""
        return self.mode == "signed"

    @classmethod
    def unsigned(cls) -> Trust:
        """Development mode: nothing signed, nothing verified, no policy (`UNSIGNED_WARNING`)."""
        return cls("unsigned")

    @classmethod
    def signed(
        cls,
        signer: SigningKey | None = None,
        keyring: Keyring | None = None,
        policy: Policy | None = None,
        *,
        max_request_age: float = DEFAULT_MAX_REQUEST_AGE,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    ) -> Trust:
        """Signed mode, with the pieces checked against each other: the signer's key must be
        in the keyring (same principal, same public key), and every principal the policy names
        must have a key in it.

        Raises:
            TrustError: The signer's key is not in the keyring, or does not match it.
            PolicyError: The policy names a principal without a key.
        """
        _check(signer, keyring, policy, ENV_SETTINGS)
        return cls("signed", signer, keyring, policy, max_request_age, max_clock_skew)

    @classmethod
    def load(
        cls,
        *,
        signing_key: str | Path | None = None,
        keyring: str | Path | None = None,
        policy: str | Path | None = None,
        unsigned: bool = False,
        max_request_age: float = DEFAULT_MAX_REQUEST_AGE,
        settings: Mapping[str, str] = ENV_SETTINGS,
    ) -> Trust:
        """Loads the files the settings name and checks them (as `signed` does).

        Args:
            signing_key: The private key file.
            keyring: The keyring file.
            policy: The policy file.
            unsigned: Development mode; excludes the three files.
            max_request_age: See `DEFAULT_MAX_REQUEST_AGE`.
            settings: How messages name each argument (environment variables by default; a
                command line passes its flags).

        Raises:
            TrustError: Nothing configured, unsigned with keys, a file missing or unusable, or
                the files do not match; the message names the setting and what to do.
            PolicyError: The policy is invalid or names a principal without a key.
        """
        given = {
            name: value
            for name, value in (
                ("signing_key", signing_key),
                ("keyring", keyring),
                ("policy", policy),
            )
            if value not in (None, "")
        }
        if unsigned:
            if given:
                both = ", ".join(settings[n] for n in given)
                raise TrustError(
                    f"{settings['unsigned']} is set together with {both}: unset "
                    f"{settings['unsigned']} to sign and verify messages, or unset {both} to run "
                    "unsigned (local development only)"
                )
            return cls.unsigned()
        if not given:
            raise TrustError(
                f"message signing is not configured: set {settings['signing_key']}, "
                f"{settings['keyring']} and {settings['policy']} (create keys with `saga keys "
                f"new`), or set {settings['unsigned']}=1 to run unsigned for local development"
            )
        try:
            signer = SigningKey.load(signing_key) if signing_key else None
        except TrustError as exc:
            raise TrustError(f"{settings['signing_key']}: {exc}") from None
        try:
            ring = Keyring.load(keyring) if keyring else None
        except TrustError as exc:
            raise TrustError(f"{settings['keyring']}: {exc}") from None
        try:
            rules = load_policy(policy, setting=settings["policy"]) if policy else None
        except TrustError as exc:
            raise TrustError(f"{settings['policy']}: {exc}") from None
        _check(signer, ring, rules, settings)
        return cls("signed", signer, ring, rules, max_request_age)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, settings: Mapping[str, str] = ENV_SETTINGS
    ) -> Trust:
        """`load` with the settings of `ENV_SETTINGS`: ``SAGA_SIGNING_KEY``, ``SAGA_KEYRING``,
        ``SAGA_POLICY`` (file paths), ``SAGA_UNSIGNED=1`` (development mode) and
        ``SAGA_MAX_REQUEST_AGE`` (seconds).

        Args:
            environ: The environment (default: the process's).
            settings: How messages name each setting (see `load`).

        Raises:
            TrustError: See `load`; also a value of SAGA_UNSIGNED or SAGA_MAX_REQUEST_AGE that
                is not one.
            PolicyError: See `load`.
        """
        env = os.environ if environ is None else environ
        s = ENV_SETTINGS
        flag = env.get(s["unsigned"], "").strip().lower()
        if flag not in ("", "0", "1", "true", "false", "yes", "no"):
            raise TrustError(f"{s['unsigned']}={flag!r}: expected 1 (unsigned) or 0")
        age_text = env.get(s["max_request_age"], "").strip()
        try:
            age = float(age_text) if age_text else DEFAULT_MAX_REQUEST_AGE
            if not 0 < age < float("inf"):
                raise ValueError
        except ValueError:
            raise TrustError(
                f"{s['max_request_age']}={age_text!r}: expected a positive number of seconds"
            ) from None
        return cls.load(
            signing_key=env.get(s["signing_key"]),
            keyring=env.get(s["keyring"]),
            policy=env.get(s["policy"]),
            unsigned=flag in ("1", "true", "yes"),
            max_request_age=age,
            settings=settings,
        )

    def check_role(self, role: Role, service: str | None = None) -> None:
        """Checks that this trust has what ``role`` needs (nothing, when unsigned).

        A coordinator needs a signer that the policy lists as a coordinator, a keyring and a
        policy; a participant the same, its signer a principal of ``service``; a client a
        signer.

        Raises:
            TrustError: Something is missing or the signer is not what the role must be.
        """
        if not self.is_signed:
            return
        s = ENV_SETTINGS
        needs = {"signer": "signing_key", "keyring": "keyring", "policy": "policy"}
        wanted = ("signer",) if role == "client" else ("signer", "keyring", "policy")
        missing = [s[needs[w]] for w in wanted if getattr(self, w) is None]
        if missing:
            raise TrustError(f"a {role} needs {', '.join(missing)} to be set")
        assert self.signer is not None
        who = self.signer.principal
        if role == "coordinator" and self.policy and not self.policy.is_coordinator(who):
            raise TrustError(
                f"{s['signing_key']}: the coordinator signs as {who!r}, which the policy "
                f"{self.policy.source} does not list in `coordinators`; participants would "
                "refuse its commands"
            )
        speaks = service is None or self.policy is None or self.policy.speaks_for(who, service)
        if role == "participant" and not speaks:
            assert self.policy is not None
            raise TrustError(
                f"{s['signing_key']}: service {service!r} signs as {who!r}, which the "
                f"policy {self.policy.source} does not list under services.{service}; the "
                "coordinator would refuse its replies"
            )

    def stale(self, at: float, now: float) -> str | None:
        """Why a signed request made at ``at`` is too old (or too new) to honour at ``now``,
        or ``None`` if it is fresh (always, when unsigned)."""
        if not self.is_signed:
            return None
        if at < now - self.max_request_age:
            return (
                f"the request was made {now - at:.0f} s ago, and a signed request is honoured "
                f"for {self.max_request_age:.0f} s ({ENV_SETTINGS['max_request_age']}); "
                "send it again"
            )
        if at > now + self.max_clock_skew:
            return (
                f"the request is dated {at - now:.0f} s ahead of the coordinator's clock "
                f"(at most {self.max_clock_skew:.0f} s allowed); check the sender's clock"
            )
        return None

    def describe(self) -> str:
        """One line for the start-up log (names and paths; never a key)."""
        if not self.is_signed:
            return "unsigned: messages are neither signed nor verified (development mode)"
        parts = []
        if self.signer is not None:
            parts.append(f"signing as {self.signer.principal!r} (key {self.signer.key_id!r})")
        if self.keyring is not None:
            parts.append(
                f"verifying with {len(self.keyring)} keys of {len(self.keyring.principals())} "
                f"principals ({self.keyring.source})"
            )
        if self.policy is not None:
            parts.append(f"policy {self.policy.source} with {len(self.policy.rules)} rules")
        parts.append(f"requests honoured for {self.max_request_age:.0f} s")
        return "signed: " + "; ".join(parts)


def _check(
    signer: SigningKey | None,
    keyring: Keyring | None,
    policy: Policy | None,
    settings: Mapping[str, str],
) -> None:
    from saga.core.policy import check_policy

    if signer is not None and keyring is not None:
        entry = keyring.get(signer.key_id)
        where = f"{settings['signing_key']}: key {signer.key_id!r} of {signer.principal!r}"
        if entry is None:
            raise TrustError(
                f"{where} is not in the keyring {keyring.source} ({settings['keyring']}), so "
                "every message signed with it would be refused; add its public key (`saga keys "
                "new` does) or use a key the keyring has"
            )
        if entry.principal != signer.principal:
            raise TrustError(
                f"{where}: the keyring {keyring.source} ({settings['keyring']}) gives that key "
                f"id to {entry.principal!r}"
            )
        if entry.public_key_b64 != signer.public_entry().public_key_b64:
            raise TrustError(
                f"{where}: the public key in the keyring {keyring.source} "
                f"({settings['keyring']}) does not match the private key; one of the two files "
                "is from another key: generate a new key, or restore the keyring entry"
            )
    if policy is not None and keyring is not None:
        check_policy(policy, known_principals=keyring.principals())
