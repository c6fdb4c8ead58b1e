"""Parallelism: device meshes, the logical-axis rules that place arrays on them, batch
sharding across processes, and multi-host start-up.

Owns `mesh` (meshes and rules), `batch` (host rows -> global arrays) and `distributed`
(`jax.distributed.initialize` from a config section or the environment). It is the bottom of
the stack: it imports only `jaxsft.errors`, so every other part may use it.
"""
