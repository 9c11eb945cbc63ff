"""The pasta order fleet on the secured broker, with the whole trust boundary on.

The coordinator and the five services run as processes (`services.fleet.Fleet`) on the
session's secured broker (``kafka_secure``: SASL_SSL only, a SCRAM user and ACLs per
principal), each connecting and signing as its own principal, verifying what it consumes
against the keyring and the policy, with payloads sealed (`services.secure.SecureSetup`). The
client signs as ``client``, whom the policy lets start orders.

The tests are those of `tests.integration.test_order_saga`, called with this module's fleet:
the happy order (every effect once, in the services' own databases) and an order that the
restaurant refuses (compensated in reverse order, every effect undone). On top: what a broker
operator sees without the payload keys is sealed, and nothing genuine was dead-lettered as
``unauthenticated`` or ``forbidden``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import orjson
import pytest

from deploy.kafka_secure import ADMIN, SecureKafka
from saga.adapters.kafka import KafkaTransport
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Topics
from saga.runtime.trust import SIGNATURE_HEADER
from services.app import sagas
from services.fleet import PARTICIPANTS, Fleet
from services.orders import make_order
from services.secure import SecureSetup
from tests.chaos.oracle import read_topic
from tests.integration import test_order_saga as order_saga
from tests.integration.support import Services

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def setup(kafka_secure: SecureKafka, tmp_path_factory: pytest.TempPathFactory) -> SecureSetup:
    """Keys, keyring, policy, payload keys and ACLs for a fresh prefix."""
    return SecureSetup.create(
        kafka_secure,
        f"sit-{uuid.uuid4().hex[:10]}",
        PARTICIPANTS,
        tmp_path_factory.mktemp("trust"),
        sagas=[d.name for d in sagas],
    )


@pytest.fixture(scope="module")
def fleet(
    setup: SecureSetup, fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """The fleet of tests/integration/conftest.py, secured (used by its ``services``)."""
    with Fleet(
        bootstrap=setup.broker.bootstrap_servers,
        prefix=setup.prefix,
        data_dir=tmp_path_factory.mktemp("services"),
        env=fleet_env,
        secure=setup,
    ) as running:
        yield running


async def test_a_happy_order_completes_with_every_effect_once(services: Services) -> None:
    await order_saga.test_happy_path_completes_with_every_effect_applied_once(services)


async def test_a_refused_order_is_compensated_in_reverse_order(services: Services) -> None:
    await order_saga.test_business_failure_compensates_what_was_done_in_reverse_order(
        services, "restaurant"
    )


async def test_what_the_broker_holds_is_sealed_and_signed(
    services: Services, setup: SecureSetup
) -> None:
    order = make_order(60)
    state = await services.run(order)
    assert state.status.value == "completed"
    assert state.steps["payment"].output is not None  # the client opens what it reads

    # Read as the broker's super user, without the payload keys.
    raw = KafkaTransport(
        setup.broker.bootstrap_servers, deadline=15, security=setup.security(ADMIN)
    )
    topics = Topics(setup.prefix)
    mine = [r for r in await read_topic(raw, topics.log) if r.key == order["order_id"].encode()]
    values = [orjson.loads(r.value) for r in mine if r.value]
    started = [v for v in values if v.get("type") == "saga_started"]
    outputs = [v["output"] for v in values if v.get("type") == "step_succeeded" and v["output"]]
    assert started
    assert all("$sealed" in v["input"] for v in started)
    assert outputs
    assert all("$sealed" in o for o in outputs)
    assert order["customer"].encode() not in b"".join(r.value or b"" for r in mine)
    for topic in (topics.requests, topics.replies, topics.commands("payment")):
        records = [r for r in await read_topic(raw, topic) if r.key == order["order_id"].encode()]
        assert records, topic
        assert all(SIGNATURE_HEADER in dict(r.headers) for r in records), topic
    refused = [dict(r.headers).get(REASON_HEADER, b"") for r in await read_topic(raw, topics.dlq)]
    assert not [r for r in refused if r in (b"unauthenticated", b"forbidden")], refused
