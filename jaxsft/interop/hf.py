"""HF checkpoint weights <-> jaxsft parameters, and the tokenizer files that travel with them.

`load_checkpoint` reads a local HF folder (or fetches a hub id into the HF cache): `config.json`
of transformers 4 or 5, one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read lazily from the memory-mapped files, one
device shard at a time, straight into sharded arrays when a mesh is given.

`save_checkpoint` writes what `transformers.AutoModelForCausalLM.from_pretrained` loads.

The folder's safetensors headers, the HF name of each parameter and the checks of config.json
against the headers before a tensor is read are `interop.hf_headers`'s; its public names are
importable from here too (`SafetensorsReader`, `check_checkpoint`, `read_safetensors_header`).

Layout conventions: HF `Linear.weight` is `[out, in]`; jaxsft kernels are `[in, out]`. With
`scan_layers` the per-layer tensors are stacked on a leading layer axis.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxsft.adapters.quant import QuantizedKernel, dequantize
from jaxsft.errors import UserError
from jaxsft.interop.hf_config import (
  config_from_hf,
  config_to_hf,
  read_hf_config,
  resolve_checkpoint_dir,
)
from jaxsft.interop.hf_headers import (
  SAFETENSORS_INDEX,
  SAFETENSORS_SINGLE,
  SafetensorsReader,
  check_tensors,
)
from jaxsft.interop.hf_headers import TensorInfo as TensorInfo
from jaxsft.interop.hf_headers import check_checkpoint as check_checkpoint
from jaxsft.interop.hf_headers import read_safetensors_header as read_safetensors_header
from jaxsft.interop.hf_names import ParamEntry, parameter_entries
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama
from jaxsft.parallel.mesh import DEFAULT_RULES, logical_shardings, unboxed

_LOG = logging.getLogger(__name__)

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'vocab.json', 'merges.txt', 'added_tokens.json',
                   'chat_template.jinja', 'chat_template.json', 'generation_config.json')
_HF_DTYPES = {'float32': jnp.float32, 'float16': jnp.float16, 'bfloat16': jnp.bfloat16}
# `TensorInfo`, `check_checkpoint` and `read_safetensors_header` live in `hf_headers`; the
# `x as x` imports above re-export them to the callers that reach them as `hf.X`.


# ---------------------------------------------------------------------------------------------
# Parameter trees


def _set_path(tree: dict, path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: Mapping, path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


# ---------------------------------------------------------------------------------------------
# Loading


def _read_shard(reader: SafetensorsReader, entry: ParamEntry, index: tuple[slice, ...],
                dtype: Any) -> np.ndarray:
  """Reads the part `index` (in jaxsft layout) of one parameter from the HF tensors: the
  leading layer and expert axes pick tensors, the rest is read from each (only that slice,
  where one tensor is not concatenated from several parts)."""
  lead, inner = index[:entry.lead_axes], tuple(index[entry.lead_axes:])
  names = np.array(entry.hf_names, dtype=object).reshape(entry.name_grid)[lead]

  def one(parts):
    if len(parts) == 1:
      hf_inner = tuple(reversed(inner)) if entry.transpose else inner
      part = reader.read(parts[0], hf_inner)
      return (part.T if entry.transpose else part).astype(dtype)
    whole = np.concatenate([reader.read(name).T if entry.transpose else reader.read(name)
                            for name in parts], axis=-1)
    return whole[inner].astype(dtype)

  tensors = [one(list(parts)) for parts in names.reshape(-1, entry.parts)]
  if not entry.lead_axes:
    return tensors[0]
  return np.stack(tensors).reshape(names.shape[:-1] + tensors[0].shape)


def abstract_params(config: LlamaConfig) -> Any:
  """Shapes, dtypes and logical axes of `Llama(config)`'s params, without allocating them."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), tokens))['params']


def param_shardings(config: LlamaConfig, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """`NamedSharding` of each parameter of `Llama(config)` on `mesh`."""
  return logical_shardings(abstract_params(config), mesh, rules)


def load_checkpoint(path: str | os.PathLike, *, dtype: Any = 'auto', mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    config_overrides: Mapping[str, Any] | None = None,
                    transform: Callable[[tuple[str, ...], jax.Array], Any] | None = None
                    ) -> tuple[LlamaConfig, dict[str, Any]]:
  """Loads an HF LLaMA / Mistral / Qwen2 checkpoint.

  Args:
    path: local HF folder, or a hub id (fetched with `huggingface_hub` into its cache).
    dtype: dtype of the returned parameters; 'auto' keeps the checkpoint's own dtype.
    mesh: place each parameter on this mesh with the sharding its logical axes give; each
      device's shard is read from disk on its own, so no device holds the whole model.
    rules: logical-axis rules (see `jaxsft.parallel.mesh.DEFAULT_RULES`).
    config_overrides: `LlamaConfig` fields to set (`scan_layers`, compute `dtype`, ...).
    transform: applied to each parameter `(path, array)` as soon as it is read, before the next
      one is (e.g. quantization), so the untransformed model never exists whole.
  Returns:
    `(config, params)`; `Llama(config).apply({'params': params}, tokens)` runs the model.
  Raises:
    UserError: before any tensor is read, for a damaged file or a config.json that does not
      describe the weights (`check_checkpoint`'s checks), naming the file and the tensor.
  """
  folder = resolve_checkpoint_dir(path)
  hf_config = read_hf_config(folder)
  if dtype == 'auto':
    stored = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
    dtype = _HF_DTYPES.get(stored, jnp.float32)
  dtype = jnp.dtype(dtype)
  config = config_from_hf(hf_config, **{'param_dtype': dtype, **(config_overrides or {})})
  reader = SafetensorsReader(folder)
  _, entries = check_tensors(folder, reader, config)
  abstract = abstract_params(config)
  if mesh is not None:
    shardings = logical_shardings(abstract, mesh, rules)
  else:
    device = jax.local_devices()[0]
    shardings = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(device), unboxed(abstract))
  abstract = unboxed(abstract)

  params: dict[str, Any] = {}
  for entry in entries:
    shape = _get_path(abstract, entry.path).shape
    array = jax.make_array_from_callback(
        shape, _get_path(shardings, entry.path),
        lambda index, entry=entry: _read_shard(reader, entry, index, dtype))
    if transform is not None:
      array = transform(tuple(entry.path), array)
    _set_path(params, entry.path, array)
  reader.close()
  return config, params


# ---------------------------------------------------------------------------------------------
# Saving


def _to_host(array: Any) -> np.ndarray:
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


def _dense(value: Any) -> Any:
  """A 4-bit `QuantizedKernel` as its dense float32 kernel (`quant.dequantize`, jitted so a
  sharded node stays sharded); any other value as it is."""
  if isinstance(value, QuantizedKernel):
    return jax.jit(dequantize)(value)
  return value


def hf_tensors(config: LlamaConfig, params: Mapping[str, Any], dtype: Any
               ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(HF name, [out, in]-layout numpy tensor)` for every parameter, one at a time; a
  4-bit kernel is dequantized to float32 first, then cast to `dtype` like every tensor."""
  for entry in parameter_entries(config):
    value = _to_host(_dense(_get_path(params, entry.path)))
    tensors = value.reshape((-1,) + value.shape[entry.lead_axes:])
    names = np.array(entry.hf_names, dtype=object).reshape(-1, entry.parts)
    for tensor, parts in zip(tensors, names):
      for name, part in zip(parts, np.split(tensor, entry.parts, axis=-1)):
        part = part.T if entry.transpose else part
        yield name, np.ascontiguousarray(part.astype(dtype))


def save_checkpoint(path: str | os.PathLike, config: LlamaConfig, params: Mapping[str, Any], *,
                    dtype: Any = None, tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes an HF folder that `AutoModelForCausalLM.from_pretrained` loads.

  Args:
    params: the model's parameters; 4-bit `QuantizedKernel`s (QLoRA's frozen base) are saved
      dequantized, as `quant.dequantize_params(params)` cast to `dtype` (a LoRA tree must be
      merged first: `jaxsft.adapters.lora.dense_params`).
    dtype: dtype of the saved tensors; None keeps `config.param_dtype`.
    tokenizer_dir: folder whose tokenizer files are copied alongside.
    max_shard_bytes: above this total size the weights go to several files plus an index.

  Writes `config.json`, the weights (`model.safetensors`, or HF's
  `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`) and the
  tokenizer files. Into a folder that already holds an HF checkpoint it replaces that
  checkpoint's weights: its `model.safetensors`, its index, the shards the index lists and
  files named like HF shards are removed (a stale index or single file would make
  transformers load the old weights), once the new weights are written. Every other file
  (`adapter_model.safetensors`, `reward_model.safetensors`, notes) is left alone; `jaxsft
  export` goes further and never writes into a folder it does not own.
  Only process 0 writes; every process must call this (arrays may need gathering).
  """
  dtype = jnp.dtype(dtype or config.param_dtype)
  path = os.fspath(path)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  # Tensors stream to numbered files as each fills up; they are named once their count is known.
  files: list[tuple[str, list[str], int]] = []
  pending: dict[str, np.ndarray] = {}
  # Process 0 keeps gathering after a failed write when other processes gather with it (they
  # would wait for it forever); the error is raised once every tensor went by.
  failed: list[OSError] = []

  def flush():
    if writer and pending and not failed:
      temp_name = f'part-{len(files):05d}.safetensors.tmp'
      files.append((temp_name, list(pending), sum(t.nbytes for t in pending.values())))
      try:
        _save_safetensors(pending, os.path.join(path, temp_name))
      except OSError as error:
        if jax.process_count() == 1:
          raise
        failed.append(error)
    pending.clear()

  def stale_weights() -> list[str]:
    """The weight files of the checkpoint `path` held: `model.safetensors`, the index and the
    files it lists, and files named like HF shards; no other `*.safetensors` file."""
    names = {n for n in os.listdir(path)
             if n == SAFETENSORS_SINGLE or re.fullmatch(r'model-\d{5}-of-\d{5}\.safetensors', n)}
    index_path = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
      names.add(SAFETENSORS_INDEX)
      try:
        with open(index_path) as f:
          listed = list(json.load(f)['weight_map'].values())
      except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = []  # unreadable: the files named like shards still go
      # Plain names in this folder only: an index cannot send a removal elsewhere.
      names.update(n for n in listed if isinstance(n, str) and n == os.path.basename(n)
                   and n.endswith('.safetensors') and os.path.isfile(os.path.join(path, n)))
    return sorted(names)

  try:
    for name, tensor in hf_tensors(config, params, dtype):
      if pending and sum(t.nbytes for t in pending.values()) + tensor.nbytes > max_shard_bytes:
        flush()
      pending[name] = tensor
    flush()
    if failed:
      raise failed[0]
  except BaseException:
    for temp_name, *_ in files:  # no half-written parts left behind
      if writer and os.path.exists(os.path.join(path, temp_name)):
        os.remove(os.path.join(path, temp_name))
    raise
  if not writer:
    return
  for stale in stale_weights():  # after the new weights are written: a failure keeps the old
    os.remove(os.path.join(path, stale))
  _name_shards(path, files)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config_to_hf(config, dtype), f, indent=2, sort_keys=True)
  if tokenizer_dir is not None and not copy_tokenizer_files(tokenizer_dir, path):
    raise UserError(f'tokenizer_dir={tokenizer_dir!r} holds none of {TOKENIZER_FILES}.')


def copy_tokenizer_files(tokenizer_dir: str | os.PathLike, out: str | os.PathLike) -> list[str]:
  """Copies the `TOKENIZER_FILES` that `tokenizer_dir` holds into `out`; returns their names."""
  copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
  for name in copied:
    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out, name))
  return copied


def _save_safetensors(tensors: dict[str, np.ndarray], file_path: str) -> None:
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  safetensors.numpy.save_file(tensors, file_path, metadata={'format': 'pt'})  # HF checks format


def _name_shards(path: str, files: list[tuple[str, list[str], int]]) -> None:
  """Gives the written parts their HF names; several parts also get an index."""
  if len(files) == 1:
    os.replace(os.path.join(path, files[0][0]), os.path.join(path, SAFETENSORS_SINGLE))
    return
  weight_map = {}
  for i, (temp_name, names, _) in enumerate(files):
    file_name = f'model-{i + 1:05d}-of-{len(files):05d}.safetensors'
    os.replace(os.path.join(path, temp_name), os.path.join(path, file_name))
    weight_map.update({name: file_name for name in names})
  index = {'metadata': {'total_size': sum(size for *_, size in files)}, 'weight_map': weight_map}
  with open(os.path.join(path, SAFETENSORS_INDEX), 'w') as f:
    json.dump(index, f, indent=2, sort_keys=True)


def write_chat_template(out: str | os.PathLike, chat_template: str) -> None:
  """Makes `chat_template` the template of the tokenizer in `out`: `chat_template.jinja`,
  which transformers reads first, and no competing copy in `tokenizer_config.json`. The
  `{% generation %}` markers of jaxsft's templates render as nothing in `apply_chat_template`.
  Process 0 writes."""
  if jax.process_index() != 0:
    return
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'chat_template.jinja'), 'w') as f:
    f.write(chat_template)
  config_path = os.path.join(out, 'tokenizer_config.json')
  if os.path.isfile(config_path):
    with open(config_path) as f:
      tokenizer_config = json.load(f)
    if tokenizer_config.pop('chat_template', None) is not None:
      with open(config_path, 'w') as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
