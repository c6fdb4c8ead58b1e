"""Parallelism: device meshes, the logical-axis rules that place arrays on them, batch
sharding across processes, and multi-host start-up.

Owns `mesh` (meshes and rules), `context` (rows split over the `context` axis, zig-zag
order), `batch` (host rows -> global arrays) and `distributed`
(`jax.distributed.initialize` from a config section or the environment). It is the bottom of
the stack: it imports only `jaxsft.errors`, so every other part may use it.
"""

from jaxsft.parallel.batch import batch_sharding, global_batch
from jaxsft.parallel.context import (
    ContextLayout,
    context_layout,
    from_zigzag,
    to_zigzag,
    zigzag_order,
)
from jaxsft.parallel.distributed import initialize
from jaxsft.parallel.mesh import (
    MeshSettings,
    logical_shardings,
    logical_to_mesh_spec,
    make_mesh,
    mesh_and_rules,
)

__all__ = ['ContextLayout', 'MeshSettings', 'batch_sharding', 'context_layout', 'from_zigzag',
           'global_batch', 'initialize', 'logical_shardings', 'logical_to_mesh_spec',
           'make_mesh', 'mesh_and_rules', 'to_zigzag', 'zigzag_order']
