"""The API on a signed deployment: every request the server sends is signed as the caller
(with the caller's key), so the coordinator verifies it, authorizes it under the policy and
records the verified principal; what the policy denies is refused by the server (403) before
anything is written; a caller without a key cannot act at all."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deploy.jaeger import JaegerServer
from saga.core.policy import parse_policy
from saga.runtime.trust import Keyring, Trust, new_key
from tests.server.conftest import TOKENS, Stack, open_stack
from tests.server.test_api import assert_problem

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(120)]

POLICY = """
version: 1
coordinators: [coordinator]
services: {stock: [stock], bank: [bank], post: [post]}
rules:
  - name: bob runs orders
    who: [bob]
    may: [start, cancel, retry, resolve, signal]
    sagas: [shop_order]
  - name: ann approves
    who: [ann]
    may: [approve]
    sagas: [shop_order]
    steps: [manager]
"""


@pytest.fixture(scope="module")
async def signed(
    bootstrap: str, jaeger: JaegerServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A stack whose processes sign and verify, the server holding ann's and bob's keys."""
    keys = {p: new_key(p) for p in ("coordinator", "stock", "bank", "post", "ann", "bob")}
    ring = Keyring(k.public_entry() for k in keys.values())
    policy = parse_policy(POLICY, "test policy")
    trusts = {
        name: Trust.signed(keys[name], ring, policy)
        for name in ("coordinator", "stock", "bank", "post")
    }
    directory: Path = tmp_path_factory.mktemp("signed")
    async with open_stack(
        bootstrap,
        jaeger,
        directory,
        trusts=trusts,
        signers={p: keys[p] for p in ("ann", "bob")},
        policy=policy,
        tokens={**TOKENS, "carol": "carol-token"},
    ) as stack:
        yield stack


async def test_requests_are_signed_as_the_caller_and_authorized(signed: Stack) -> None:
    saga_id = f"signed-{uuid.uuid4().hex[:6]}"
    async with signed.http("bob") as bob, signed.http("ann") as ann:
        r = await bob.post(
            "/api/v1/sagas",
            json={
                "name": "shop_order",
                "saga_id": saga_id,
                "input": {"customer": "s", "total": 500},
            },
        )
        assert r.status_code == 202, r.text
        await signed.wait_for(saga_id, "running", manager="running")

        before = await signed.requests_written()
        r = await bob.post(f"/api/v1/sagas/{saga_id}/approve", json={"step": "manager"})
        problem = assert_problem(r, 403, "forbidden")
        assert "bob" in problem["detail"]
        assert await signed.requests_written() == before

        r = await ann.post(f"/api/v1/sagas/{saga_id}/approve", json={"step": "manager"})
        assert r.status_code == 202
        state = await signed.wait_for(saga_id, "completed")
        history = (await bob.get(f"/api/v1/sagas/{saga_id}/history")).json()
    # Verified principals: no "(unverified)" claim, the signer's name itself.
    assert history["events"][0]["by"] == "bob"
    assert state.steps["manager"].output is not None
    assert state.steps["manager"].output["by"] == "ann"


async def test_a_caller_without_a_key_cannot_act(signed: Stack) -> None:
    before = await signed.requests_written()
    async with signed.http("carol") as carol:
        r = await carol.post(
            "/api/v1/sagas", json={"name": "shop_order", "input": {"customer": "c", "total": 1}}
        )
        # The policy has no rule for carol: refused before her missing key matters.
        assert_problem(r, 403, "forbidden")
        listing = await carol.get("/api/v1/sagas")
        assert listing.status_code == 200  # reading needs only a valid token
    assert await signed.requests_written() == before
