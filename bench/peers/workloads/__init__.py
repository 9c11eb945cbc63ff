"""Each peer's side of the workload, run in the peers' venv with that peer's SDK.

One module per peer: `temporal_app`, `restate_app`, `dbos_app`. Each defines the 3-step workflow
with no-op steps in its SDK's terms, its server-side process where it has one, and a `load`
sub-command that hands a `connect` function to `bench.peers.loadgen`.
"""
