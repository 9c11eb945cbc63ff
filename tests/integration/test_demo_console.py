"""The demo fleet's console on the secured broker, as ``make demo SECURE=1`` starts it.

The coordinator and the five services run as processes on the session's secured broker, each
signing as its own principal under the demo's policy (`services.secure.SecureSetup`);
`Fleet.start_console` adds ``saga serve``, connected and signing as ``operator``, taking only
the bearer token made for it. Checked: without the token (or with another) the API answers 401
and writes nothing; with it, it lists the order the client started, and the operator's cancel
sent through it is signed as the operator, allowed by the policy, and undoes the order.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import orjson
import pytest

from deploy._proc import PortInUseError, free_port, port_accepts
from deploy.kafka_secure import SecureKafka
from saga import SagaStatus, StepStatus
from services.app import sagas
from services.fleet import CONSOLE_PRINCIPAL, PARTICIPANTS, Console, Fleet
from services.orders import make_order, submit
from services.secure import OPERATOR, SecureSetup

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def fleet(kafka_secure: SecureKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The demo's processes on a fresh prefix of the secured broker, serving."""
    setup = SecureSetup.create(
        kafka_secure,
        f"dcs-{uuid.uuid4().hex[:10]}",
        PARTICIPANTS,
        tmp_path_factory.mktemp("trust"),
        sagas=[d.name for d in sagas],
    )
    with Fleet(
        bootstrap=setup.broker.bootstrap_servers,
        prefix=setup.prefix,
        data_dir=tmp_path_factory.mktemp("services"),
        secure=setup,
    ) as running:

        async def ready() -> None:
            async with running.client() as client:
                await running.wait_ready(client, timeout=120)

        anyio.run(ready)
        yield running


def call(console: Console, method: str, path: str, token: str | None, body: Any = None) -> Any:
    """One API request with ``token`` (None: no credential): the parsed answer.

    Raises:
        urllib.error.HTTPError: An error status.
    """
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(console.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return orjson.loads(response.read())


def status(console: Console, method: str, path: str, token: str | None) -> int:
    """The HTTP status of one request."""
    try:
        call(console, method, path, token, {} if method == "POST" else None)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


async def start_waiting_order(fleet: Fleet) -> str:
    """An order that waits at its kitchen for a confirmation nobody sends (so it can be
    cancelled: its pivot has not started)."""
    async with fleet.client() as client:
        (saga_id,) = await submit(client, [make_order(7, kitchen_confirms=True)])
        with anyio.fail_after(60):
            while True:
                state = await client.status(saga_id)
                if state is not None and state.steps["kitchen"].status is StepStatus.RUNNING:
                    return saga_id
                await anyio.sleep(0.2)


async def final_state(fleet: Fleet, saga_id: str) -> SagaStatus:
    async with fleet.client() as client:
        return (await client.wait(saga_id, timeout=60, poll=0.2)).status


def test_the_secured_console_takes_its_token_and_acts_as_the_operator(fleet: Fleet) -> None:
    console = fleet.start_console(free_port())
    console.wait_answering(timeout=90)
    assert console.token is not None
    assert console.principal == CONSOLE_PRINCIPAL == OPERATOR
    assert console.tokens_file is not None
    assert console.token_file is not None
    assert console.token_file.read_text().strip() == console.token
    for path in (console.tokens_file, console.token_file):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    # Its token is not in the hashes file.
    assert console.token not in console.tokens_file.read_text()

    saga_id = anyio.run(start_waiting_order, fleet)
    cancel = f"/api/v1/sagas/{saga_id}/cancel"
    assert status(console, "GET", "/api/v1/counts", None) == 401
    assert status(console, "GET", "/api/v1/counts", "not-the-token") == 401
    assert status(console, "POST", cancel, None) == 401
    assert status(console, "POST", cancel, "not-the-token") == 401

    deadline = time.monotonic() + 30
    while True:
        page = call(console, "GET", f"/api/v1/sagas?saga_id_prefix={saga_id}", console.token)
        if [s["saga_id"] for s in page["sagas"]] == [saga_id]:
            break
        assert time.monotonic() < deadline, f"the console does not list {saga_id}: {page}"
        time.sleep(0.5)
    # Nothing the refused requests asked for happened: it still waits at the kitchen.
    state = call(console, "GET", f"/api/v1/sagas/{saga_id}", console.token)["state"]
    assert state["status"] == "running"
    assert state["steps"]["kitchen"]["status"] == "running"

    accepted = call(console, "POST", cancel, console.token, {"reason": "customer called"})
    assert accepted["by"] == OPERATOR
    assert anyio.run(final_state, fleet, saga_id) is SagaStatus.COMPENSATED

    # The port is the console's now: a second one on it is refused before it starts.
    port = int(console.url.rsplit(":", 1)[1])
    with pytest.raises(PortInUseError):
        fleet.start_console(port)
    fleet.stop()
    assert not port_accepts(port)
