"""Multi-process runs: one JAX process per host (TPU pod slice) or per GPU node.

`initialize` calls `jax.distributed.initialize` when the run spans processes: with an explicit
coordinator from the config, or with JAX's own detection (TPU pods, SLURM, Open MPI, and the
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` environment). A plain
single-process run is left alone. It must run before anything touches a JAX backend.
"""

from __future__ import annotations

import logging
import os

import jax

from jaxsft.errors import UserError

_LOG = logging.getLogger('jaxsft')
_ENVIRONMENT_HINTS = ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                      'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1
               ) -> None:
  """Joins the processes of a multi-process run (no-op for a single process): at
  `coordinator_address` (`host:port` of process 0) with the given count and id, or, without an
  address, as the environment says (TPU pods, SLURM, Open MPI, `JAX_COORDINATOR_ADDRESS`)."""
  address = coordinator_address
  if address:
    if num_processes < 1 or process_id < 0:
      raise UserError('distributed.coordinator_address is set, so distributed.num_processes '
                      'and distributed.process_id must be too.')
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=num_processes, process_id=process_id)
  elif any(os.environ.get(name) for name in _ENVIRONMENT_HINTS) and _multi_host_tpu_or_cluster():
    _cpu_collectives()
    jax.distributed.initialize()
  else:
    return
  _LOG.info('process %d of %d, %d local / %d global devices', jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())


def _cpu_collectives() -> None:
  """CPU processes (tests, CPU clusters) need a cross-process collectives library; GPUs and
  TPUs bring their own, and the setting touches only the CPU backend."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def _multi_host_tpu_or_cluster() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if hosts:
    return len(hosts.split(',')) > 1
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'JAX_NUM_PROCESSES'):
    if os.environ.get(name, '1').isdigit() and int(os.environ.get(name, '1')) > 1:
      return True
  return bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))
