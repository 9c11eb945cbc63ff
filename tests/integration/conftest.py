"""The pasta order services as real processes, on the real broker of the session.

``fleet`` (one per test module, to save the start-up) runs the coordinator and the five
services as separate processes under a fresh topic prefix and data directory, restarts any of
them that exits (a participant crashed on purpose comes back), and stops them all at teardown
whatever happened. ``services`` gives each test a `SagaClient` on that prefix (`Fleet.client`:
signing as ``client`` when the fleet is secured) and readers for the services' own SQLite
tables. Tests share the processes, so each uses its own order ids
(`services.orders.make_order` makes a fresh one every time). A module may override ``fleet``
(tests/integration/test_secure_fleet.py runs it on the secured broker); ``fleet_env`` is the
processes' environment either way.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from services.fleet import Fleet
from tests.integration.support import STEP_TIMEOUT, Services


@pytest.fixture(scope="module")
def fleet_env() -> dict[str, str]:
    """The extra environment of the fleet's processes."""
    return {
        "SAGA_STEP_TIMEOUT": str(STEP_TIMEOUT),
        "OTEL_TRACES_EXPORTER": "none",  # no collector here; the tracing tests have their own
        "SAGA_FAULTS": "",  # faults come from each test's orders only
    }


@pytest.fixture(scope="module")
def fleet(
    bootstrap: str, fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """The coordinator and the five services, as supervised processes (unsigned)."""
    data_dir = tmp_path_factory.mktemp("services")
    prefix = f"it-{uuid.uuid4().hex[:10]}"
    with Fleet(bootstrap=bootstrap, prefix=prefix, data_dir=data_dir, env=fleet_env) as running:
        yield running


@pytest.fixture
async def services(fleet: Fleet) -> AsyncIterator[Services]:
    """A client on the fleet's prefix, once a canary order has gone through every service."""
    async with fleet.client(deadline=20) as c:
        if fleet.ready_after is None:
            await fleet.wait_ready(c, timeout=60)
        yield Services(fleet, c)
