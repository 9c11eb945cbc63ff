"""The pure core: definitions, messages, state, `evolve` and `decide`.

Nothing here awaits, reads a clock, makes random ids, or imports an I/O library
(tests/core/test_layers.py holds it to that).
"""
