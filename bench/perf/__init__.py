"""The performance suite of issue 12: B1-B7 against references measured in the same run.

`bench.perf.app` is the workload (a 3-step sequential saga with no-op handlers, a participant
per service, and a saga that parks on a ``wait`` step); `bench.perf.roles` runs the engine's
coordinator and participants as processes of their own through the public API only;
`bench.perf.raw` is the raw aiokafka reference (3 transactional request→reply round trips per
saga); `bench.perf.procs` spawns all of them and the throwaway broker and Jaeger;
`bench.perf.load` is the load generator; one module per benchmark (`throughput` for B1-B3,
`recovery` B4, `rebuild` B5, `memory` B6, `tracing_cost` B7, `peers` for ``make bench-peers``);
`bench.perf.suite` runs them and keeps `bench/results/perf.json`; `bench.perf.report` writes
the figures into `bench/REPORT.md` between ``<!-- perf:begin -->`` and ``<!-- perf:end -->``.
Run ``python -m bench.perf --help``.
"""
