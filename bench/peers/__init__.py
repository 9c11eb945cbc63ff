"""The engine's peers side by side: Temporal, Restate and DBOS on the same 3-step workload.

`python -m bench.peers` (`make bench-peers`) installs the peers into a venv and an npm prefix of
their own under the user cache (`bench.peers.install`), runs each with the same workload as the
engine's benchmark (`bench.peers.workloads`), measures latency with one in flight and throughput
at several in-flight levels (`bench.peers.loadgen`), merges the engine's own figures, and writes
`bench/results/peers.json`, `bench/results/peers.md` and `bench/peers.png`.

This package's modules that the load generators import in the peers' venv (`stats`,
`loadgen`, `workloads`) use the standard library only; keep this file free of imports.
"""
