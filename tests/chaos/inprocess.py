"""The test services' coordinator and participants inside the test process, on any transport.

For the tests that need to reach into the engine (an alert hook, lower decoding `Limits`, a
fault injected into the Kafka client) rather than drive it from outside as processes.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from saga import Coordinator
from saga.core.codec import DEFAULT_LIMITS, Limits
from saga.runtime.coordinator import AlertHook
from saga.runtime.ports import Transport
from tests.chaos.app import SERVICES, Ledger, make_participant, sagas

__all__ = ["open_in_process"]


@asynccontextmanager
async def open_in_process(
    transport: Transport,
    prefix: str,
    partitions: int,
    ledger: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    alert_hooks: Sequence[AlertHook] = (),
) -> AsyncIterator[Coordinator]:
    """Runs a coordinator and the three participants here until the block ends.

    The handlers read the ledger's path from ``CHAOS_LEDGER`` (in worker threads), so it is set
    for the duration of the block.
    """
    previous = os.environ.get("CHAOS_LEDGER")
    os.environ["CHAOS_LEDGER"] = str(ledger)
    Ledger(ledger)
    coordinator = Coordinator(
        sagas,
        transport=transport,
        prefix=prefix,
        partitions=partitions,
        limits=limits,
        alert_hooks=alert_hooks,
    )
    participants = [make_participant(s, limits=limits) for s in SERVICES]
    try:
        async with coordinator, anyio.create_task_group() as tg:
            for participant in participants:
                await tg.start(
                    functools.partial(
                        participant.run, transport, prefix=prefix, partitions=partitions
                    )
                )
            yield coordinator
            tg.cancel_scope.cancel()
    finally:
        # A client the engine failed to close (see the xfail tests) is reclaimed here, so that
        # its ResourceWarning belongs to the test that caused it.
        gc.collect()
        if previous is None:
            os.environ.pop("CHAOS_LEDGER", None)
        else:
            os.environ["CHAOS_LEDGER"] = previous
