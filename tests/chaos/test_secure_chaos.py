"""The seeded chaos run of `tests.chaos.test_chaos`, on a secured broker with everything on.

The same processes (two coordinators, three participants of `tests.chaos.app`), the same
workload (chain sagas with random business and technical failures, handler delays and planned
participant crashes) and the same fault injector (`tests.chaos.test_chaos.Injector`: every
kind once, in a seeded order: coordinator SIGKILL and SIGTERM, participant SIGKILL, broker
SIGKILL and restart, broker SIGSTOP and SIGCONT), at a small size. What differs is the trust
boundary (`services.secure.SecureSetup`): the broker only speaks SASL_SSL, with a SCRAM user
and ACLs per principal; every process signs what it produces with its own Ed25519 key and
verifies what it consumes against the keyring and the policy; payloads are sealed with AES-GCM.

The oracle is the chaos suite's (`tests.chaos.workload.verify`: the services' ledger and the
log read ``read_committed``, as ``admin`` with the payload keys): every saga ends as its plan
dictates, no side effect happened twice, every trace is legal, nothing acknowledged was lost.
On top, the run checks that the security was in force: every process connected over SASL_SSL
and none ran unsigned, the saga inputs in the log are sealed, every request, command and reply
is signed, and no record was dead-lettered as ``unauthenticated`` or ``forbidden`` (a restart
or a broker outage must not make a genuine message look forged).

The broker is this module's own (the session's ``kafka_secure`` is shared, and this test kills
and freezes its broker), formatted with the SCRAM users of the chaos services as well.
``CHAOS_SEED`` picks the seed; ``CHAOS_SECURE_SAGAS`` the size (10 by default).
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from deploy.kafka_secure import ADMIN, PRINCIPALS, SecureKafka, start_secure_kafka
from saga.adapters.kafka import KafkaTransport
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Topics
from saga.runtime.trust import SIGNATURE_HEADER, UNSIGNED_WARNING
from services.secure import SecureSetup
from tests.chaos.app import SERVICES
from tests.chaos.cluster import TOLERATE_LEAKED_KAFKA_CLIENTS, Cluster
from tests.chaos.oracle import read_topic
from tests.chaos.test_chaos import SEED, _chaos_run

SAGAS = int(os.environ.get("CHAOS_SECURE_SAGAS", "10"))
DEADLINE = 120.0
"""Seconds every saga has to end after the last fault."""
REPLAY = (
    f"replay with: CHAOS_SEED={SEED} CHAOS_SECURE_SAGAS={SAGAS} "
    ".venv/bin/pytest tests/chaos/test_secure_chaos.py"
)
pytestmark = [pytest.mark.kafka, *TOLERATE_LEAKED_KAFKA_CLIENTS]


@pytest.fixture(scope="module")
def secure_chaos_kafka() -> Iterator[SecureKafka]:
    """A secured broker that this module kills and freezes, with users for the chaos
    services (``alpha``, ``beta``, ``gamma``) besides the usual principals."""
    with start_secure_kafka(principals=(*PRINCIPALS, *SERVICES)) as server:
        yield server


@pytest.fixture(autouse=True)
def _reclaim_garbage() -> Iterator[None]:
    """As in `tests.chaos.test_chaos`: a client left open warns (and fails) here."""
    yield
    gc.collect()


@pytest.mark.timeout(360)
@pytest.mark.anyio
async def test_secure_chaos(
    secure_chaos_kafka: SecureKafka, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"schaos-{SEED}-{uuid.uuid4().hex[:6]}"
    setup = SecureSetup.create(secure_chaos_kafka, prefix, SERVICES, tmp_path / "trust")
    await _chaos_run(
        secure_chaos_kafka,
        tmp_path / "cluster",
        capsys,
        sagas=SAGAS,
        deadline=DEADLINE,
        label="secure chaos",
        replay=REPLAY,
        secure=setup,
        check=_assert_secured,
    )


async def _assert_secured(cluster: Cluster) -> None:
    """The security was on all along, and nothing genuine was taken for a forgery."""
    for proc in cluster.procs.values():
        said = [str(line.get("msg", "")) for line in proc.lines()]
        assert any("connected to Kafka: SASL_SSL" in m for m in said), proc.name
        assert UNSIGNED_WARNING not in said, f"{proc.name} ran unsigned"
        if proc.role == "coordinator":
            assert any("messages are signed and checked" in m for m in said), proc.name
    assert cluster.secure is not None, "the cluster ran unsecured"
    await _assert_sealed_and_signed(cluster.secure, cluster.prefix)


async def _assert_sealed_and_signed(setup: SecureSetup, prefix: str) -> None:
    """Reads the topics as ``admin`` without the payload keys: what a broker operator sees."""
    raw = KafkaTransport(
        setup.broker.bootstrap_servers, deadline=15, security=setup.security(ADMIN)
    )
    topics = Topics(prefix)
    log = await read_topic(raw, topics.log)
    assert log, "the log is empty"
    events = [orjson.loads(r.value) for r in log if r.value]
    started = [e for e in events if e.get("type") == "saga_started"]
    assert len(started) > SAGAS, "the log misses saga starts"
    assert all("$sealed" in e["input"] for e in started), "a saga input in clear"
    # What crosses between the processes is signed (the log is the coordinator's own).
    for topic in (topics.requests, topics.replies, *(topics.commands(s) for s in SERVICES)):
        records = await read_topic(raw, topic)
        unsigned = [r for r in records if SIGNATURE_HEADER not in dict(r.headers)]
        assert records, f"{topic} is empty"
        assert not unsigned, f"{topic}: {len(unsigned)} of {len(records)} unsigned"
    refused = [
        dict(r.headers).get(REASON_HEADER, b"").decode() for r in await read_topic(raw, topics.dlq)
    ]
    assert not [r for r in refused if r.startswith(("unauthenticated", "forbidden"))], refused
