"""The trust boundary, where the engine's processes take in what others wrote.

Broker ACLs say who may write to a topic, but not who wrote a record: a consumer does not learn
the producer's principal, and every service writes its replies to one topic. So the engine signs
what crosses between its processes (`saga.runtime.trust`) and checks each record here, before
`saga.core.decide` or a handler sees it:

- the coordinator takes a reply for step S only from a principal of S's service
  (`CoordinatorGate.reply`), and a request only from an authenticated principal that the
  authorization policy allows (`CoordinatorGate.request`); a request signed longer ago than
  ``max_request_age`` is refused as a possible replay;
- a participant runs a command only if a coordinator signed it (`ParticipantGate.command`).

What fails is refused with a `Refusal`: ``unauthenticated`` (no signature, an unknown key, a
bad signature, too old), ``forbidden`` (a valid signature of a principal that may not send
it) or ``unsealable`` (its sealed payload could not be opened: a payload key is missing, or
the ciphertext was changed). The caller dead-letters the record with that reason; nothing
else changes. A refused request also goes into the saga's log as a denial
(`saga.core.decide.deny`), so the audit trail shows refused attempts next to accepted ones.

A replay of a validly signed old message changes nothing either: a reply or command of a
superseded attempt is stale to `decide` and to the participant's reply store, a command older
than its budget is answered ``Expired`` without running, and an operator request is answered
once per message id (`saga.core.state.SagaState.requests`).

Without a `Trust` (or with `Trust.unsigned`) nothing is checked, nothing is signed, and a
request's ``by`` is recorded as the unverified claim it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from saga.core.definition import SagaDefinition
from saga.core.messages import CompensateSaga, Reply, Request, StartSaga
from saga.core.policy import Action, authorize, check_policy
from saga.core.wire import UNVERIFIED
from saga.runtime.ports import UNSEALED_HEADER, Outgoing, Record
from saga.runtime.trust import UNSIGNED_WARNING, Trust, Unauthenticated

__all__ = ["CoordinatorGate", "ParticipantGate", "Refusal"]

log = logging.getLogger("saga.trust")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a record was not let in; ``reason`` is the dead letter's."""

    reason: Literal["unauthenticated", "forbidden", "unsealable"]
    detail: str


@runtime_checkable
class SealsRecords(Protocol):
    """A transport that seals payloads on the way out (`saga.adapters.sealing`)."""

    def seal_record(self, record: Outgoing) -> Outgoing:
        """``record`` with its payloads sealed."""
        ...


class _Gate:
    def __init__(self, trust: Trust | None, transport: object = None) -> None:
        self.trust = trust if trust is not None and trust.is_signed else None
        # Sealed, then signed: a signature over the plaintext would let anyone with the
        # (public) keyring test guesses of a sealed field. Sealing here first leaves the
        # transport nothing to seal, so the bytes signed are the bytes written.
        self._seal = transport.seal_record if isinstance(transport, SealsRecords) else None

    @property
    def signed(self) -> bool:
        """Whether records are signed and checked."""
        return self.trust is not None

    def sender(self, record: Record) -> str | Refusal | None:
        """The verified principal that signed ``record`` (``None`` when nothing is checked),
        or why it is refused: its signature, or its sealed payload that could not be opened."""
        if (why := record.header(UNSEALED_HEADER)) is not None:
            return Refusal("unsealable", why)
        if self.trust is None:
            return None
        assert self.trust.keyring is not None  # a signed Trust has one
        try:
            return self.trust.keyring.verify(record.as_written)
        except Unauthenticated as exc:
            return Refusal("unauthenticated", str(exc))

    def sign(self, record: Outgoing) -> Outgoing:
        """``record`` sealed (when the transport seals) and signed by this process's key; as
        it is, when nothing is signed."""
        if self.trust is None or self.trust.signer is None:
            return record
        if self._seal is not None:
            record = self._seal(record)
        return self.trust.signer.sign_outgoing(record)


class CoordinatorGate(_Gate):
    """What the coordinator checks of each request and reply, and how it signs commands."""

    def start_up(self, definitions: Iterable[SagaDefinition]) -> None:
        """Before the coordinator touches a saga: checks the policy against the keyring and
        the definitions (`saga.core.policy.check_policy`), or warns that nothing is checked.

        Raises:
            saga.runtime.trust.TrustError: The signing key is not a coordinator's, or the
                keyring or the policy is missing.
            saga.core.policy.PolicyError: A rule names a principal without a key or a saga
                without a definition, or a service of the definitions has no principal.
        """
        if self.trust is None:
            log.warning(UNSIGNED_WARNING)
            return
        self.trust.check_role("coordinator")
        assert self.trust.keyring is not None
        assert self.trust.policy is not None
        found = list(definitions)
        check_policy(
            self.trust.policy,
            known_principals=self.trust.keyring.principals(),
            saga_names={d.name for d in found},
            services={s for d in found for s in d.services},
        )
        log.info("messages are signed and checked: %s", self.trust.describe())

    def request(
        self,
        message: Request,
        sender: str | None,
        saga_name: str | None,
        now: float,
        step: str | None = None,
    ) -> tuple[Request, Refusal | None]:
        """The request with its ``by`` set to who sent it, and why it is refused, if it is.

        Args:
            message: The decoded request.
            sender: `sender`'s answer for its record (``None`` when nothing is checked).
            saga_name: The saga's name: the one asked for by a start, else the saga's own
                (``None`` for a request about an id with no saga: only starts are checked
                against the policy without one; the rest name no saga to be allowed on).
            now: The coordinator's clock.
            step: The step a signal or an approval decision is for (a signal's: the step
                that waits for it), as the policy's rules name steps.
        """
        if self.trust is None or sender is None:
            claimed = f"{message.by}{UNVERIFIED}" if message.by else None
            return message.model_copy(update={"by": claimed}), None
        stamped = message.model_copy(update={"by": sender})
        stale = self.trust.stale(message.at, now)
        if stale is not None:
            detail = f"{message.type} request signed by {sender!r}: {stale}"
            return stamped, Refusal("unauthenticated", detail)
        policy = self.trust.policy
        assert policy is not None  # a signed Trust has one
        if policy.is_coordinator(sender):
            return stamped, None  # the engine's own requests (`Coordinator.start`, sub-sagas)
        if isinstance(message, CompensateSaga) or (
            isinstance(message, StartSaga) and message.parent is not None
        ):
            detail = (
                f"{message.type} request for a sub-saga signed by {sender!r}, not a coordinator"
            )
            return stamped, Refusal("forbidden", detail)
        name = message.saga_name if isinstance(message, StartSaga) else saga_name
        if name is None:
            return stamped, None  # no saga: the coordinator dead-letters it as unknown
        action: Action = "approve" if message.type == "approval" else message.type
        why = authorize(policy, sender, action, name, step)
        return stamped, (Refusal("forbidden", why) if why is not None else None)

    def reply(
        self, reply: Reply, sender: str | None, definition: SagaDefinition | None
    ) -> Refusal | None:
        """Why ``reply`` is refused: its signer does not answer for its step's service."""
        if self.trust is None or sender is None or definition is None:
            return None
        if not definition.has_step(reply.step):
            return None  # `decide` rejects a reply for a step the saga has not
        service = definition.step(reply.step).service
        assert self.trust.policy is not None
        if service is None and self.trust.policy.is_coordinator(sender):
            return None  # a sub-saga step: its child's coordinator answers it
        if service is not None and self.trust.policy.speaks_for(sender, service):
            return None
        return Refusal(
            "forbidden",
            f"reply for step {reply.step!r} (service {service!r}) signed by {sender!r}, which "
            f"does not answer for {service!r} in the policy",
        )


class ParticipantGate(_Gate):
    """What a participant checks of each command, and how it signs replies."""

    def start_up(self, service: str) -> None:
        """Warns, once, when commands are not verified (anyone who can write to the command
        topic can make this service act)."""
        if self.trust is None:
            log.warning(
                "service %r runs commands without checking who sent them (unsigned mode): "
                "give it SAGA_SIGNING_KEY, SAGA_KEYRING and SAGA_POLICY outside local "
                "development",
                service,
            )
        else:
            log.info("service %r: commands are checked: %s", service, self.trust.describe())

    def command(self, sender: str | None) -> Refusal | None:
        """Why a command signed by ``sender`` is refused: it is not a coordinator."""
        if self.trust is None or sender is None:
            return None
        assert self.trust.policy is not None
        if self.trust.policy.is_coordinator(sender):
            return None
        return Refusal(
            "forbidden",
            f"command signed by {sender!r}, which is not a coordinator in the policy",
        )
