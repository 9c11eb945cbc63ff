"""Signed mode for the suite (``--signed``): a key per principal, a keyring and a policy, made
in the run's work directory, and the ``SAGA_*`` trust settings each process reads
(`saga.runtime.trust.Trust.from_env`).

Principals: ``coordinator``, one per service (``s1``, ``s2``, ``s3``; ``participants`` for one
process serving all three) and ``client``, which may start the benchmark's sagas. Unsigned
(``SAGA_UNSIGNED=1``) is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.perf.app import SERVICES, sagas
from saga.runtime.signing import Keyring, SigningKey, new_key

__all__ = ["CLIENT", "COORDINATOR", "PARTICIPANTS", "Signing"]

COORDINATOR = "coordinator"
CLIENT = "client"
PARTICIPANTS = "participants"
"""The principal of one process serving every service (``--one-participant-process``)."""


@dataclass(frozen=True)
class Signing:
    """The keys, keyring and policy of one run."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> Signing:
        """Makes a key for every principal, the keyring and the policy in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        keys = [new_key(p) for p in (COORDINATOR, CLIENT, PARTICIPANTS, *SERVICES)]
        for key in keys:
            key.save(directory / f"{key.principal}.key", overwrite=True)
        Keyring(k.public_entry() for k in keys).save(directory / "keyring")
        policy = {
            "version": 1,
            "coordinators": [COORDINATOR],
            "services": {s: [s, PARTICIPANTS] for s in SERVICES},
            "rules": [
                {
                    "name": "the load generator starts the benchmark's sagas",
                    "who": [CLIENT],
                    "may": ["start"],
                    "sagas": [d.name for d in sagas],
                }
            ],
        }
        # JSON is YAML: the policy loader reads either.
        (directory / "policy.yaml").write_bytes(orjson.dumps(policy))
        return cls(directory)

    def env(self, principal: str) -> dict[str, str]:
        """The trust settings of the process signing as ``principal``."""
        return {
            "SAGA_SIGNING_KEY": str(self.directory / f"{principal}.key"),
            "SAGA_KEYRING": str(self.directory / "keyring"),
            "SAGA_POLICY": str(self.directory / "policy.yaml"),
        }

    def signer(self, principal: str = CLIENT) -> SigningKey:
        """The key the load generator's client signs with."""
        return SigningKey.load(self.directory / f"{principal}.key")
