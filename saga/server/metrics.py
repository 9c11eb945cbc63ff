"""``/metrics``: the engine's metrics in Prometheus's text format, through OpenTelemetry's
Prometheus exporter.

What the server can see for itself, so that one scrape of the console's process covers the
deployment whatever runs the coordinators:

- ``saga_index_sagas{status}``: sagas by status, from the index's counts;
- ``saga_index_lag_records`` and ``saga_index_age_seconds``: how far behind the log the index
  is, in records and in seconds since it last applied one;
- ``saga_step_duration_seconds{saga,step,outcome}``: a histogram of step latency (first start
  to finish), for each step the index sees finish;
- ``saga_step_retries_total{saga,step}``: attempts beyond the first, as steps finish (or
  get stuck);
- ``saga_dead_letters_total{reason}``: records set aside in ``<prefix>.dlq`` (its headers'
  reason), tailed from the topic.

The step and dead-letter figures are counted from when the server started (a Prometheus
counter's ``rate`` does not care where it starts); `ServerMetrics.run` keeps them current.
The exporter writes to a registry of its own, so that several apps in one process (tests) do
not mix their figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import anyio
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from saga.core.state import SagaStatus, StepStatus
from saga.index.port import SagaIndex, SagaQuery
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Record, Topics, Transport

__all__ = ["LATENCY_BUCKETS", "ServerMetrics"]

log = logging.getLogger("saga.server.metrics")

LOOKBACK = 120.0
"""Seconds before the newest update seen that each look at the index goes back: sagas on
different partitions reach the index in any order, so one updated a little earlier than the
newest seen may be indexed after it."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
"""Seconds: the step latency histogram's bucket bounds."""

_FINISHED = {
    StepStatus.SUCCEEDED: "succeeded",
    StepStatus.FAILED: "failed",
    StepStatus.COMPENSATED: "compensated",
    StepStatus.STUCK: "stuck",
}


class ServerMetrics:
    """The server's meters and their Prometheus exporter.

    Args:
        index: The saga index (counts and lag are read from it at each scrape).
    """

    def __init__(self, index: SagaIndex) -> None:
        self.index = index
        self.registry = CollectorRegistry()
        self._reader = PrometheusMetricReader(registry=self.registry)
        self.provider = MeterProvider(
            resource=Resource.create({"service.name": "saga-server"}),
            metric_readers=[self._reader],
            views=[
                View(
                    instrument_name="saga.step.duration",
                    aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS),
                )
            ],
        )
        meter = self.provider.get_meter("saga.server")
        meter.create_observable_gauge(
            "saga.index.sagas", callbacks=[self._counts], description="Sagas by status"
        )
        meter.create_observable_gauge(
            "saga.index.lag",
            callbacks=[self._lag],
            unit="records",
            description="Log records not yet indexed",
        )
        meter.create_observable_gauge(
            "saga.index.age",
            callbacks=[self._age],
            unit="s",
            description="Seconds since the index last applied a record",
        )
        self._steps = meter.create_histogram(
            "saga.step.duration", unit="s", description="Step latency, first start to finish"
        )
        self._retries = meter.create_counter(
            "saga.step.retries", description="Attempts beyond the first, of finished steps"
        )
        self._dead = meter.create_counter(
            "saga.dead_letters", description="Records set aside in the dead-letter topic"
        )
        self._seen: dict[tuple[str, str, str], float] = {}
        """Finished steps recorded, with their saga's ``updated_at`` (forgotten after
        `LOOKBACK`)."""
        self._since: float | None = None

    # -- scrape ------------------------------------------------------------------------------

    def _counts(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        counts = dict(self.index.counts())
        for status in SagaStatus:
            counts.setdefault(status.value, 0)
        return [Observation(n, {"status": s}) for s, n in sorted(counts.items())]

    def _lag(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        return [Observation(self.index.lag().total)]

    def _age(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        updated = self.index.lag().updated_at
        return [] if updated is None else [Observation(max(0.0, time.time() - updated))]

    def render(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        """The ``/metrics`` route."""
        del request
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)

    # -- keeping the counters current --------------------------------------------------------

    def observe_index(self) -> int:
        """Records the steps that finished in sagas updated since the last look; returns how
        many it recorded."""
        recorded = 0
        cursor: str | None = None
        since = None if self._since is None else self._since - LOOKBACK
        newest = self._since
        while True:
            page = self.index.query(SagaQuery(updated_after=since, limit=500, cursor=cursor))
            for row in page.rows:
                state = row.state
                newest = state.updated_at if newest is None else max(newest, state.updated_at)
                for name, step in state.steps.items():
                    outcome = _FINISHED.get(step.status)
                    key = (state.saga_id, name, outcome or "")
                    if outcome is None or key in self._seen:
                        continue
                    self._seen[key] = state.updated_at
                    attrs = {"saga": state.name, "step": name, "outcome": outcome}
                    done = step.finished_at or step.compensated_at
                    if step.started_at is not None and done is not None:
                        self._steps.record(max(0.0, done - step.started_at), attrs)
                    if step.attempt > 1:
                        self._retries.add(step.attempt - 1, {"saga": state.name, "step": name})
                    recorded += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        self._since = newest
        if since is not None:
            self._seen = {k: at for k, at in self._seen.items() if at >= since - LOOKBACK}
        return recorded

    def count_dead_letters(self, reasons: Iterable[str]) -> None:
        """Counts dead letters by their reason."""
        for reason in reasons:
            self._dead.add(1, {"reason": reason})

    async def run(
        self,
        transport: Transport,
        prefix: str,
        *,
        poll: float = 1.0,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keeps the step and dead-letter figures current until cancelled: looks at the index
        when its generation moves, and reads what the dead-letter topic gained."""
        dlq = Topics(prefix).dlq
        positions: dict[int, int] = {}
        generation = -1
        task_status.started()
        while True:
            if self.index.generation != generation:
                generation = self.index.generation
                self.observe_index()
            try:
                # Shielded: a read cancelled while its consumer starts would leak the consumer;
                # a pass is short (the transport's deadline bounds it), so cancellation waits.
                with anyio.CancelScope(shield=True):
                    await self._read_dead_letters(transport, dlq, positions)
            except Exception as exc:  # no DLQ topic yet (nothing dead-lettered) is normal
                log.debug("dead-letter topic %s not read: %s", dlq, exc)
            await anyio.sleep(poll)

    async def _read_dead_letters(
        self, transport: Transport, topic: str, positions: dict[int, int]
    ) -> None:
        count = await transport.partitions(topic)
        for partition in range(count):
            reasons = []
            # Closed on cancellation too: a reader left to the garbage collector leaks its
            # consumer.
            records = transport.read(topic, partition, positions.get(partition, 0))
            async with _closed_after(records):
                async for record in records:
                    positions[partition] = record.offset + 1
                    reason = next((v for k, v in record.headers if k == REASON_HEADER), b"unknown")
                    reasons.append(reason.decode(errors="replace"))
            self.count_dead_letters(reasons)

    def shutdown(self) -> None:
        """Stops the meter provider."""
        self.provider.shutdown()


@asynccontextmanager
async def _closed_after(records: AsyncIterator[Record]) -> AsyncIterator[AsyncIterator[Record]]:
    try:
        yield records
    finally:
        close = getattr(records, "aclose", None)
        if close is not None:
            await close()
