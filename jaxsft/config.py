"""Run configuration: one locked `ml_collections.ConfigDict` that holds every default.

A config file is Python with `get_config(arg: str | None = None)` that starts from
`default_config()` and overrides what it needs (the big_vision style). The command line adds
`--config.key=value` overrides (`--config.data.max_seq_len=1024`, applied by
`apply_override`). The config is locked, so a
misspelled key is an error, never a silently ignored setting; the entries of `data.datasets`
are dicts checked against `jaxsft.data.spec.DATASET_DEFAULTS` the same way.

Only the CLI reads this module: the trainer, the data pipeline and the evaluators take a config
and never know the defaults.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections

from jaxsft.adapters.targets import DEFAULT_TARGETS
from jaxsft.errors import UserError, did_you_mean
from jaxsft.train.loss import DEFAULT_CHUNK_SIZE


def default_config() -> ml_collections.ConfigDict:
  """Every setting with its default, locked; `get_config` functions start here."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      'path': '',            # HF checkpoint folder or hub id; '' = build from `preset`/`architecture`
      'preset': '',          # jaxsft.interop.presets name; the architecture without weights (random init)
      'architecture': {},    # LlamaConfig fields for a random-init model (e.g. the demo's)
      'dtype': 'bfloat16',   # compute dtype of activations and matmuls
      'param_dtype': 'float32',  # master weights: float32 (mixed precision) or bfloat16 (pure);
                                 # under LoRA the frozen base's (adapters train in float32)
      'scan_layers': True,
      'remat_policy': 'none',  # none | full | save_dots | save_dots_with_batch | save_attention_out
      'attention_implementation': 'auto',  # auto | blocked | xla | cudnn | splash
  })
  config.lora = ml_collections.ConfigDict({
      'enabled': False,      # False = full fine-tuning
      'rank': 16,
      'alpha': 32.0,
      'dropout': 0.05,
      'targets': list(DEFAULT_TARGETS),
      'rslora': False,       # scale alpha / sqrt(rank) instead of alpha / rank
      'init_from': '',       # a PEFT adapter folder to start from (same rank and targets)
      # Norms trained whole next to the adapters (PEFT's modules_to_save), e.g. Qwen3's
      # ['q_norm', 'k_norm']; names or regexes over RMSNorm module paths.
      'modules_to_save': [],
  })
  config.quant = ml_collections.ConfigDict({
      'kind': 'none',        # none | nf4 | int4: 4-bit frozen base weights (QLoRA; needs LoRA)
      'block_size': 64,      # inputs per absmax block
      'double_quant': True,  # 8-bit absmax values (blocks of 256), as bitsandbytes
      'double_quant_rounding': 'min_error',  # min_error (never worse than bnb) | nearest
      'targets': list(DEFAULT_TARGETS),
  })
  config.optim = ml_collections.ConfigDict({
      'learning_rate': 2e-5,
      'schedule': 'cosine',  # constant | linear | cosine (after warmup)
      'warmup_steps': -1,    # >= 0 overrides warmup_ratio
      'warmup_ratio': 0.03,
      'min_lr_ratio': 0.0,   # the schedule ends at learning_rate * min_lr_ratio
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'weight_decay': 0.0,   # AdamW; never on norms and biases
      'max_grad_norm': 1.0,  # global-norm clipping; 0 = off
  })
  config.train = ml_collections.ConfigDict({
      'num_steps': 0,        # > 0: train this many steps; else num_epochs over the data
      'num_epochs': 1.0,
      'grad_accum_steps': 1,  # micro-batches per step (batch_size rows split evenly)
      'neftune_alpha': 0.0,  # NEFTune noise on input embeddings; 0 = off (5 is the paper's)
      # Positions per row whose logits exist at once in the fused LM head + loss; only chunks
      # holding supervised tokens are computed. 0 = whole [B, T, V] logits (the reference).
      'loss_chunk_size': DEFAULT_CHUNK_SIZE,
      'seed': 0,             # model init, LoRA init, dropout, NEFTune
      'log_every': 10,       # steps between log lines
      'eval_every': 0,       # steps between eval-loss passes; 0 = only at the end
      'tensorboard': True,   # event files in workdir/tensorboard (metrics.jsonl always)
      'sample_prompts': [],  # user prompts answered greedily every sample_every steps, logged
      'sample_every': 0,     # 0 = never
      'sample_max_new_tokens': 64,
      'progress_bar': True,
  })
  config.checkpoint = ml_collections.ConfigDict({
      'save_every': 0,       # steps between checkpoints; 0 = only at the end (and on SIGTERM)
      'keep': 3,             # the newest checkpoints kept
      'async_save': True,    # write in the background while training continues
      'resume': True,        # continue from the newest checkpoint in the work directory
  })
  config.distributed = ml_collections.ConfigDict({
      'coordinator_address': '',  # host:port of process 0; '' = auto (TPU pods, SLURM, env)
      'num_processes': 0,    # with coordinator_address
      'process_id': -1,      # with coordinator_address
  })
  config.mesh = ml_collections.ConfigDict({
      'shape': (-1, 1, 1),   # ('data', 'fsdp', 'tensor'); -1 = the remaining devices
      'rules': (),           # extra (logical name, mesh axes) pairs that override the defaults
  })
  config.demo = ml_collections.ConfigDict({
      'enabled': False,      # configs/demo.py: synthetic tasks, a tokenizer and a model from scratch
      'num_train': 4000,
      'num_eval': 200,
      'show_examples': 4,
  })
  config.data = ml_collections.ConfigDict({
      'datasets': [],        # list of jaxsft.data.spec.DATASET_DEFAULTS-shaped dicts (the training mixture)
      'eval_datasets': [],   # separate eval sources; else `eval_size` is held out of `datasets`
      'eval_size': 0.0,      # held out of each training source: < 1 a fraction, >= 1 a count
      'tokenizer': '',       # '' = the tokenizer saved with model.path
      'template': 'llama2',  # llama2 | llama3 | chatml | qwen3 | mistral | alpaca | jinja | .jinja path
      'train_on': 'assistant',  # assistant | last | all; a message's loss_weight 0 masks its turn
      'train_on_reasoning': True,  # False: think blocks of trained turns are not supervised
      'max_seq_len': 2048,   # tokens per packed row
      'overlong': 'truncate',   # truncate | drop: examples longer than max_seq_len + 1 tokens
      'packing': 'bfd',      # bfd | greedy | none
      'on_bad_record': 'error',  # error | skip (skips are counted and logged)
      'seed': 0,             # shuffling and mixture sampling
      'streaming': False,    # read sources lazily (corpora larger than memory or disk cache)
      'pack_window': 16384,  # streaming: examples packed together (and shuffled) per window
      'num_proc': 1,         # tokenization worker processes (datasets.map)
      'map_batch_size': 1000,   # records per tokenizer call
      'cache_dir': '',       # datasets cache; '' = the HF default
      # What `jaxsft data clean` removes (jaxsft.data.clean); `enabled` does it on the fly.
      'clean': ml_collections.ConfigDict({
          'enabled': False,       # clean data.datasets before tokenizing, in every run
          'exact_dedup': True,    # equal text, ignoring case, whitespace and punctuation
          'near_dedup': True,     # MinHash LSH over word shingles (datasketch)
          'near_threshold': 0.7,  # estimated Jaccard similarity of the shingle sets
          'shingle_words': 2,     # words per shingle
          'num_perm': 128,        # MinHash permutations
          'seed': 1,              # of the MinHash permutations
          'degenerate': True,     # empty answers, one short unit repeated ('!!!!!!!!')
          'against': [],          # evaluation files (json/jsonl/parquet) to decontaminate against
          'ngram': 13,            # words of an overlap that marks contamination (GPT-3)
      }),
  })
  config.batch_size = 8      # packed rows per global batch
  config.lock()  # get_config functions may change settings, never invent them
  return config


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config` of a config file (`file.py` or `file.py:arg`), locks the result and
  applies `key.sub=value` overrides (`apply_override`)."""
  path, _, arg = path.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file {path!r} does not exist; pass a Python file with '
                    'get_config(), e.g. --config configs/demo.py.')
  spec = importlib.util.spec_from_file_location(f'_jaxsft_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise UserError(f'config file {path} must define get_config(arg=None).')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (AttributeError, KeyError) as error:  # a setting the locked defaults do not have
    line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
                 if os.path.abspath(frame.filename) == os.path.abspath(path)), None)
    where = f'{path}, line {line}' if line else path
    text = str(error).strip('\'"')
    key = re.search(r'Key "([^"]+)" does not exist', text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    problem = (f'unknown setting {key.group(1)!r}' if key else text) + (
        f'. Did you mean {suggestion.group(1)!r}?' if suggestion else '.')
    raise UserError(f'config file {where}: {problem} Every setting is listed in '
                    'jaxsft/config.py; a config may change settings, not invent them.') from None
  config.lock()
  for override in overrides:
    apply_override(config, override)
  return config


def _all_keys(node: Any, prefix: str = '') -> list[str]:
  keys = []
  for name, value in node.items():
    keys.append(prefix + name)
    if isinstance(value, ml_collections.ConfigDict):
      keys += _all_keys(value, f'{prefix}{name}.')
  return keys


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """`key.sub=value`; the value is a Python literal, or a plain string when it is not one.

  Raises `UserError` naming the closest valid key for an unknown one, and the expected type for
  a value of the wrong type.
  """
  key, sep, text = override.partition('=')
  if not sep:
    raise UserError(f'override {override!r} must look like key=value (e.g. data.seed=1).')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      section = '.'.join(parents[:i + 1])
      raise UserError(f'--config.{key}: there is no config section {section!r}.'
                      f'{did_you_mean(key, _all_keys(config))} Every setting is listed in '
                      'jaxsft/config.py.')
    node = node[part]
  if leaf not in node:
    raise UserError(f'--config.{key}: unknown key.{did_you_mean(key, _all_keys(config))} Every '
                    'setting is listed in jaxsft/config.py.')
  current = node[leaf]
  if isinstance(current, bool) and isinstance(value, str) and value.lower() in ('true', 'false'):
    value = value.lower() == 'true'
  elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  elif isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  elif isinstance(current, list) and isinstance(value, tuple):
    value = list(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as error:
    example = {list: "a list, e.g. \"['a', 'b']\"", tuple: 'a tuple, e.g. "(1, -1, 1)"',
               bool: 'True or False'}.get(type(current), type(current).__name__)
    raise UserError(f'--config.{key}={text}: expected {example}, got '
                    f'{type(value).__name__} ({error}).') from None
