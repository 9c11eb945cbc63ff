"""Transactions that keep failing: split the batch until the input at fault is found.

Any transaction may fail once (a broker election, a timeout): the coordinator drops the
partition, rewinds and takes it over again. A transaction that fails again with the same inputs
is the inputs' fault, or at least one of them: `Trouble` halves the batch for the next attempts
down to a single input, and a single input whose transaction still fails is set aside
(`saga.runtime.partition.OwnedPartition.set_aside`), so that nothing is retried forever and no
input holds up the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from saga.runtime.ports import Record, TopicPartition

__all__ = ["Trouble", "partitions_of"]


class Trouble:
    """A partition whose transactions keep failing, and how many inputs the next one may take.

    A transaction that fails twice with the same inputs is retried with half of them, then a
    quarter, down to one; one input whose transaction still fails is set aside (dead-lettered,
    reason ``transaction_failed``), so that nothing is retried forever and no input holds up
    the others. Batches stay small until every input of the first failed batch is behind:
    then the trouble is over.
    """

    RETRIES_PER_SIZE = 2

    def __init__(self, records: Sequence[Record]) -> None:
        self.limit = max(1, len(records))
        self.failures = 0
        self.error = ""
        self._until: dict[TopicPartition, int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            self._until[tp] = max(self._until.get(tp, 0), r.offset + 1)

    @property
    def exhausted(self) -> bool:
        """Whether the next transaction should set its one input aside."""
        return self.limit == 1 and self.failures >= self.RETRIES_PER_SIZE

    def failed(self, size: int, exc: Exception) -> None:
        """A transaction of ``size`` inputs failed with ``exc``."""
        self.failures += 1
        self.error = str(exc)[:500]
        if self.failures >= self.RETRIES_PER_SIZE and self.limit > 1 and size > 0:
            self.limit = max(1, min(self.limit, size) // 2)
            self.failures = 0

    def passed(self, committed: Mapping[TopicPartition, int]) -> bool:
        """A transaction committed these next offsets; whether the trouble is over.

        Only a commit that moves on through the inputs of the failed batch resets the count of
        failures at the current size: a partition's transactions may hold only other inputs
        (replies that arrived after the requests in trouble), and their success says nothing
        about the input at fault.
        """
        for tp, offset in committed.items():
            if tp in self._until:
                self.failures = 0
                if offset >= self._until[tp]:
                    del self._until[tp]
        return not self._until


def partitions_of(records: Sequence[Record]) -> frozenset[TopicPartition]:
    """The topic-partitions the records come from."""
    return frozenset((r.topic, r.partition) for r in records)
