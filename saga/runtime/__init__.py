"""The asynchronous shell: the coordinator and participant loops, the client, the ports.

The only layer that awaits. It depends on `saga.core` and on the ports it defines; adapters
(`saga.adapters`) plug into the ports.
"""
