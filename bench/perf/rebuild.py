"""B5: how fast the coordinator's recovery rebuilds state from a log of a million events.

Method. What recovery reads must be what the engine writes, so the log is made from the
engine's own records: a coordinator and participants run a few 3-step sagas on a template
prefix, and the log records of one completed saga (values and headers as written, whatever the
codec is today) are the template. A raw aiokafka producer then writes clones of it to a fresh
prefix's log in big batches, each clone under a new saga id of the same length (the id's bytes
replaced in the key and the value, so nothing else of the encoding changes), to the partition
the engine's partitioner gives that key (`KafkaTransport.partition_for`). One saga in ten is
cut after its first two events (started, first step started), so recovery also re-arms sagas in
flight. No snapshots or checkpoints are written: recovery folds the whole log, the worst case
for a coordinator whose snapshots are behind.

Then a coordinator process starts on that prefix (no participants) and the figure is read from
its log lines ``partition N: recovered K sagas in S s`` (`saga.runtime.coordinator`): the
rebuild time is from the earliest partition's start (its line's time minus S) to the latest
line, events/s the events written over it. Process start to the last line (imports, group join)
is reported beside it.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.perf.common import Context, engine, engine_generator, engine_topics, new_prefix
from bench.perf.load import wait_until
from bench.perf.procs import Engine

__all__ = ["run"]

_RECOVERED = re.compile(r"partition (\d+): recovered (\d+) sagas in ([0-9.]+)s")
IN_FLIGHT_EVERY = 10
"""One saga in this many is left in flight (its first two events only)."""


async def _template(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    """The log records of one completed saga, in order, read with the engine's own reader
    (`KafkaTransport.read`: committed records up to the end)."""
    from saga.adapters.kafka import KafkaTransport

    transport = KafkaTransport(bootstrap)
    by_key: dict[bytes, list[Any]] = defaultdict(list)
    for p in range(partitions):
        async for record in transport.read(topic, p):
            if record.key is not None:
                by_key[record.key].append(record)
    for records in by_key.values():
        if any(b"saga_completed" in (r.value or b"") for r in records):
            return records
    raise RuntimeError(f"no completed saga in {topic} ({sum(map(len, by_key.values()))} records)")


async def _write(
    bootstrap: str, topic: str, partitions: int, template: list[Any], events: int
) -> dict[str, Any]:
    from saga.adapters.kafka import KafkaTransport

    partition_for = KafkaTransport(bootstrap).partition_for
    old = template[0].key
    width = len(old)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=50,
        max_batch_size=1 << 20,
        max_request_size=8 << 20,
    )
    await producer.start()
    written = sagas = in_flight = 0
    t0 = time.monotonic()
    try:
        pending = []
        while written < events:
            new = f"b5-{sagas:0{width - 3}x}".encode()  # the template id's width, unique
            cut = sagas % IN_FLIGHT_EVERY == IN_FLIGHT_EVERY - 1
            records = template[:2] if cut else template
            in_flight += cut
            partition = partition_for(new, partitions)
            for r in records:
                value = (r.value or b"").replace(old, new)
                headers = list(r.headers or ())
                pending.append(
                    await producer.send(topic, value, key=new, partition=partition, headers=headers)
                )
            written += len(records)
            sagas += 1
            if len(pending) >= 20_000:
                for f in pending:
                    await f
                pending.clear()
        for f in pending:
            await f
    finally:
        await producer.stop()
    return {
        "events": written,
        "sagas": sagas,
        "sagas_in_flight": in_flight,
        "template_events": len(template),
        "template_bytes": sum(len(r.value or b"") for r in template),
        "write_s": round(time.monotonic() - t0, 2),
    }


async def _raw_read(bootstrap: str, topic: str, partitions: int) -> dict[str, Any]:
    """Reads the whole log with a plain consumer, decoding nothing: the reading floor."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    count = 0
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        t0 = time.monotonic()
        remaining = {tp for tp in tps if ends[tp] > 0}
        with anyio.fail_after(300):
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=10_000)
                for tp, msgs in batch.items():
                    count += len(msgs)
                    if msgs and msgs[-1].offset + 1 >= ends[tp]:
                        remaining.discard(tp)
        seconds = time.monotonic() - t0
    finally:
        await consumer.stop()
    return {
        "raw_read_events": count,
        "raw_read_s": round(seconds, 3),
        "raw_read_events_per_s": round(count / seconds),
    }


def _recovered(procs: Engine, since: float) -> list[tuple[int, int, float, float]]:
    """(partition, sagas, seconds, wall time) of each recovery line of the coordinator's log."""
    found = []
    try:
        text = procs.coordinator.log_path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if not line.startswith("{") or "recovered" not in line:
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        match = _RECOVERED.search(str(entry.get("msg", "")))
        if match is None:
            continue
        at = datetime.fromisoformat(str(entry["ts"])).timestamp()
        if at >= since:
            found.append((int(match[1]), int(match[2]), float(match[3]), at))
    return found


def run(ctx: Context, *, events: int | None = None) -> dict[str, Any]:
    """Runs B5; returns its figures."""
    events = events or (200_000 if ctx.quick else 1_000_000)
    template_prefix = new_prefix("b5t")
    with engine(ctx, template_prefix) as procs:

        async def few() -> list[Any]:
            async with engine_generator(ctx, procs):
                pass
            return await _template(ctx.bootstrap, f"{template_prefix}.log", ctx.partitions)

        template = anyio.run(few)
    prefix = new_prefix("b5")
    anyio.run(engine_topics, ctx.bootstrap, prefix, ctx.partitions)
    written = anyio.run(_write, ctx.bootstrap, f"{prefix}.log", ctx.partitions, template, events)
    reference = anyio.run(_raw_read, ctx.bootstrap, f"{prefix}.log", ctx.partitions)
    started = time.time()
    with Engine(
        ctx.bootstrap,
        prefix,
        ctx.workdir,
        partitions=ctx.partitions,
        participants=False,
        signing=ctx.signing,
    ) as coordinator:

        async def recovered() -> list[tuple[int, int, float, float]]:
            found: list[tuple[int, int, float, float]] = []

            def all_in() -> bool:
                found[:] = _recovered(coordinator, started)
                return len({p for p, *_ in found}) >= ctx.partitions

            await wait_until(all_in, 600, "every partition recovered", coordinator.check_alive)
            return found

        lines = anyio.run(recovered)
    first_start = min(at - seconds for _, _, seconds, at in lines)
    last_end = max(at for *_, at in lines)
    wall = max(last_end - first_start, 1e-6)
    return {
        **written,
        **reference,
        "partitions": len(lines),
        "sagas_recovered": sum(n for _, n, _, _ in lines),
        "rebuild_s": round(wall, 3),
        "rebuild_s_sum_of_partitions": round(sum(s for _, _, s, _ in lines), 3),
        "process_start_to_recovered_s": round(last_end - started, 3),
        "events_per_s": round(written["events"] / wall),
    }
