"""The commands that read a config or a checkpoint and train: `info`, `data inspect`, `train`,
`plan` and `export`.

Each imports what it needs when it runs, so `jaxsft --help` loads none of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from jaxsft.errors import UserError


def info(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  """Prints the architecture of an HF checkpoint as JSON once `hf.check_checkpoint` has checked
  its config.json against its safetensors headers, as loading does. A damaged file or a
  config.json that does not describe the weights is the one-line error (exit 2) that `generate`
  or `train` would give, without a summary: it would describe a model that is not there."""
  del overrides
  # pylint: disable=import-outside-toplevel
  from jaxsft.interop import hf, hf_config
  folder = hf_config.resolve_checkpoint_dir(args.path)
  config, reader = hf.check_checkpoint(folder)
  files = sorted(set(reader.weight_map.values()))
  summary = {
      'folder': folder, 'model_type': config.model_type,
      'parameters': config.num_params(), 'safetensors_files': len(files),
      'vocab_size': config.vocab_size, 'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size, 'num_layers': config.num_layers,
      'num_heads': config.num_heads, 'num_kv_heads': config.num_kv_heads,
      'head_dim': config.head_dim, 'rope_theta': config.rope_theta,
      'rope_scaling': config.rope_scaling, 'sliding_window': config.sliding_window,
      'tie_word_embeddings': config.tie_word_embeddings,
  }
  print(json.dumps(summary, indent=2))
  return 0


def data_inspect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # pylint: disable=import-outside-toplevel
  from jaxsft.data.inspect import inspect_data
  from jaxsft.data.tokenizer import load_tokenizer
  config = load_config(args.config, overrides)
  tokenizer = load_tokenizer(config.data.tokenizer or config.model.path)
  color = sys.stdout.isatty() if args.color == 'auto' else args.color == 'always'
  print(inspect_data(config.data, tokenizer, batch_size=config.batch_size,
                     num_examples=args.examples, color=color, dump=args.dump))
  return 0


def load_config(config_path: str, overrides: Sequence[str]):
  """`--config file.py[:arg]` (`jaxsft.config.load_config`, locked) with every
  `--config.a.b=value` applied by `jaxsft.config.apply_override`, then the values checked
  (`jaxsft.train.run.run_settings` makes every part's settings) before anything is built."""
  # pylint: disable=import-outside-toplevel
  from jaxsft.config import load_config
  bad = [o for o in overrides if not o.startswith('--config.') or '=' not in o]
  if bad:
    raise UserError(f'unknown arguments {bad}; config overrides look like --config.a.b=value.')
  config = load_config(config_path, [o[len('--config.'):] for o in overrides])
  # Imported once the file has loaded: a broken config file fails without this import.
  from jaxsft.train.run import run_settings
  run_settings(config)
  return config


def train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # pylint: disable=import-outside-toplevel
  from jaxsft.demo import DemoCallback
  from jaxsft.eval.sampling import SampleCallback
  from jaxsft.parallel import distributed
  from jaxsft.train import loop, preemption, run
  config = load_config(args.config, overrides)
  distributed.initialize(**config.distributed.to_dict())  # before anything touches a JAX backend
  callbacks = []
  if config.train.sample_every and config.train.sample_prompts:
    callbacks.append(SampleCallback(tuple(config.train.sample_prompts), config.train.sample_every,
                                    config.train.sample_max_new_tokens))
  if config.demo.enabled:
    callbacks.append(DemoCallback())
  try:
    result = run.train(config, args.workdir, callbacks)
  except loop.NonFiniteLoss as error:
    logging.getLogger('jaxsft').error('%s', error)
    return loop.EXIT_NON_FINITE
  except loop.Preempted as preempted:
    logging.getLogger('jaxsft').warning('%s', preempted)
    return preemption.EXIT_INTERRUPTED if preempted.interrupted else loop.EXIT_PREEMPTED
  except run.RunFinished as finished:
    print(finished)
    return 0
  run.write_summary(args.workdir, result)
  return 0


def _use_host_devices(count: int) -> None:
  """`jaxsft plan --devices N`: JAX's CPU backend with `count` fake host devices. Before JAX
  loads (the CLI imports none of it before a command runs), through `JAX_PLATFORMS=cpu`,
  `--xla_force_host_platform_device_count` in `XLA_FLAGS` (replacing one there) and
  `JAX_NUM_CPU_DEVICES` (which JAX would prefer to the flag); once JAX is imported but no
  backend has started (`jaxsft.cli.main` called in a Python process), through `jax.config`. A
  process whose backend already runs keeps its devices: a different count is a user error."""
  # pylint: disable=import-outside-toplevel
  import os
  if 'jax' not in sys.modules:
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['JAX_NUM_CPU_DEVICES'] = str(count)
    kept = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
            if not flag.startswith('--xla_force_host_platform_device_count')]
    os.environ['XLA_FLAGS'] = ' '.join(
        kept + [f'--xla_force_host_platform_device_count={count}'])
    return
  import jax
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    if jax.device_count() != count:
      raise UserError(f'jaxsft plan --devices {count}: JAX already runs in this process with '
                      f'{jax.device_count()} {jax.default_backend()} devices; run `jaxsft plan` '
                      'in a new process.')
    return
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', count)


def plan(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  """`jaxsft plan`: the per-device memory of a run from shapes alone (`jaxsft.train.plan`), the
  longest row that fits (`--find-max-seq-len`), or the step exported for a platform
  (`--platform`); with `--devices N`, for N devices (fake CPU host devices, set up before JAX
  starts)."""
  if args.devices:
    _use_host_devices(args.devices)  # before the config loads: it imports JAX
  # pylint: disable=import-outside-toplevel
  from jaxsft.train import plan
  plan.use_memory_schedule()  # before the config loads: it may start JAX's backend
  from jaxsft.train.run import run_settings
  config = load_config(args.config, overrides)
  settings = run_settings(config)
  if args.platform and args.find_max_seq_len:
    raise UserError('jaxsft plan: --find-max-seq-len compiles on this host; it does not '
                    'combine with --platform.')
  if args.find_max_seq_len and not args.device_memory_gib:
    raise UserError('jaxsft plan --find-max-seq-len needs --device-memory-gib, e.g. 80.')
  if args.devices:
    print(plan.devices_note())
  if args.platform:
    lowering = plan.lower_for_platform(settings, args.platform)
    print(plan.platform_report(lowering, config.model.attention_implementation))
    return 0
  schedule = plan.schedule_note()
  if schedule:
    print(schedule)
  if args.find_max_seq_len:
    length, memory = plan.max_seq_len(settings, args.device_memory_gib)
    if memory is None:
      print(f'not even 256 tokens per row fit in {args.device_memory_gib:g} GiB per device '
            f'with batch_size={config.batch_size}.')
      return 1
    resolution = plan.search_resolution(length)
    if length >= plan.SEARCH_LIMIT:
      precision = ' (the search limit: longer rows may fit too)'
    elif resolution > 256:
      precision = f' (searched to within {resolution} tokens, 1 % of the length)'
    else:
      precision = ''
    print(f'longest data.max_seq_len that fits in {args.device_memory_gib:g} GiB per device '
          f'(batch_size={config.batch_size}): {length}{precision}')
    print(plan.report(memory, args.device_memory_gib))
    return 0
  print(plan.report(plan.plan(settings), args.device_memory_gib))
  return 0


def export(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  # pylint: disable=import-outside-toplevel
  from jaxsft.errors import UserError
  from jaxsft.train import export_target
  gguf = args.format == 'gguf'
  if (args.dtype and gguf) or (args.gguf_type and not gguf):
    raise UserError(f'--{"dtype" if gguf else "gguf-type"} does not apply to --format '
                    f'{args.format}; {"--gguf-type" if gguf else "--dtype"} sets its precision.')
  if gguf:
    try:
      import gguf as _  # noqa: F401  # the extra, checked before anything loads
    except ImportError:
      raise UserError("--format gguf needs the gguf package; install it with pip install "
                      "'jaxsft[gguf]'.") from None
  # Before JAX loads, so a refusal is immediate (argparse has checked --format).
  folders = export_target.recorded_folders(args.workdir)
  if gguf:
    export_target.check_file_target(args.out, args.workdir, folders)
  else:
    export_target.check_target(args.out, args.format, args.workdir, folders)
  from jaxsft.train import export
  export.export_run(args.workdir, args.format, args.out, args.dtype or 'bfloat16',
                    gguf_type=args.gguf_type or 'f16')
  print(f'wrote {args.format} export of {args.workdir} to {args.out}')
  return 0
