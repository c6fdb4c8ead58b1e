"""One process of the 2-process test (run by tests/test_multiprocess.py, not by pytest).

  python multiprocess_worker.py PORT PROCESS_ID WORKDIR OUT
"""

import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_checkpoint import run_config  # noqa: E402  (imports conftest, which asks for 8 devices)

from jaxsft.train.run import train

# After those imports and before any backend starts: 4 CPU devices per process, gloo for the
# cross-process collectives.
jax.config.update('jax_num_cpu_devices', 4)
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, process_id, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                           process_id=process_id)

config = run_config(pathlib.Path(workdir) / f'cache_{process_id}', mesh=(2, 2, 2), steps=3)
config.checkpoint.save_every = 0
result = train(config, str(pathlib.Path(workdir) / 'run'))
with open(pathlib.Path(workdir) / 'run' / 'metrics.jsonl') as f:
  losses = [r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r] \
      if process_id == 0 else []
params = jax.tree_util.tree_leaves(result['state'].params)
# Every process can read the whole (replicated or gathered) parameter values for comparison.
from jax.experimental import multihost_utils  # noqa: E402

gathered = [multihost_utils.process_allgather(p, tiled=True) for p in params]
if process_id == 0:
  import numpy as np
  np.savez(out, *[np.asarray(p) for p in gathered])
  (pathlib.Path(out).with_suffix('.json')).write_text(json.dumps(
      {'losses': losses, 'processes': jax.process_count(), 'devices': jax.device_count()}))
