"""A seeded network fuzzer for the sidecar, with a well-behaved client alongside.

- `wire`: binary-protocol messages of the interop IDL, with their length offsets.
- `inputs` / `mutations`: what an input is, the mutation kinds, `generate(seed, index)`.
- `good_client`: the well-behaved client that checks every reply.
- `runner`: starts a thriftpy2 upstream and a sidecar process, sends inputs, measures.
- `report`: the run's figures. The command line is ``bench/fuzz.py``.
"""
