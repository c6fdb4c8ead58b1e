"""HF checkpoint weights <-> jaxsft parameters, and the tokenizer files that travel with them.

`load_checkpoint` reads a local HF folder (or fetches a hub id into the HF cache): `config.json`
of transformers 4 or 5, one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read lazily from the memory-mapped files, one
device shard at a time, straight into sharded arrays when a mesh is given.

`save_checkpoint` writes what `transformers.AutoModelForCausalLM.from_pretrained` loads.

Layout conventions: HF `Linear.weight` is `[out, in]`; jaxsft kernels are `[in, out]`. With
`scan_layers` the per-layer tensors are stacked on a leading layer axis.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxsft.errors import UserError
from jaxsft.interop.hf_config import (
  config_from_hf,
  config_to_hf,
  read_hf_config,
  resolve_checkpoint_dir,
)
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama
from jaxsft.parallel.mesh import DEFAULT_RULES, logical_shardings

_LOG = logging.getLogger(__name__)

SAFETENSORS_SINGLE = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'vocab.json', 'merges.txt', 'added_tokens.json',
                   'chat_template.jinja', 'chat_template.json', 'generation_config.json')
_HF_DTYPES = {'float32': jnp.float32, 'float16': jnp.float16, 'bfloat16': jnp.bfloat16}


# ---------------------------------------------------------------------------------------------
# Parameter names


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One leaf of the jaxsft parameter tree and the HF tensor(s) behind it."""

  path: tuple[str, ...]  # path in the params tree, e.g. ('layers', 'mlp', 'up_proj', 'kernel')
  hf_names: tuple[str, ...]  # one name, or one per layer when stacked by `scan_layers`
  transpose: bool  # HF [out, in] <-> kernel [in, out]
  stacked: bool


def _layer_tensors(config: LlamaConfig) -> list[tuple[tuple[str, ...], str, bool]]:
  """(path inside a layer, HF suffix, transpose) for every per-layer tensor."""
  c = config
  entries = [(('input_layernorm', 'scale'), 'input_layernorm.weight', False),
             (('post_attention_layernorm', 'scale'), 'post_attention_layernorm.weight', False)]
  for name, bias in (('q_proj', c.qkv_bias), ('k_proj', c.qkv_bias), ('v_proj', c.qkv_bias),
                     ('o_proj', c.o_bias)):
    entries.append((('self_attn', name, 'kernel'), f'self_attn.{name}.weight', True))
    if bias:
      entries.append((('self_attn', name, 'bias'), f'self_attn.{name}.bias', False))
  if c.qk_norm:
    entries += [(('self_attn', f'{name}_norm', 'scale'), f'self_attn.{name}_norm.weight', False)
                for name in ('q', 'k')]
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    entries.append((('mlp', name, 'kernel'), f'mlp.{name}.weight', True))
    if c.mlp_bias:
      entries.append((('mlp', name, 'bias'), f'mlp.{name}.bias', False))
  return entries


def parameter_entries(config: LlamaConfig, prefix: str = 'model.') -> list[_Entry]:
  """Every parameter of `Llama(config)` with its HF tensor name(s), in HF's order."""
  entries = [_Entry(('embed_tokens', 'embedding'), (f'{prefix}embed_tokens.weight',), False,
                    False)]
  for sub_path, suffix, transpose in _layer_tensors(config):
    names = tuple(f'{prefix}layers.{i}.{suffix}' for i in range(config.num_layers))
    if config.scan_layers:
      entries.append(_Entry(('layers',) + sub_path, names, transpose, True))
    else:
      entries.extend(_Entry((f'layers_{i}',) + sub_path, (name,), transpose, False)
                     for i, name in enumerate(names))
  entries.append(_Entry(('norm', 'scale'), (f'{prefix}norm.weight',), False, False))
  if not config.tie_word_embeddings:
    entries.append(_Entry(('lm_head', 'kernel'), ('lm_head.weight',), True, False))
  return entries


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

# Bytes per element of each safetensors dtype (to check a header's data offsets); jaxsft reads
# the float ones as weights.
_SAFETENSORS_ITEMSIZE = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E4M3': 1, 'F8_E5M2': 1, 'U16': 2,
                         'I16': 2, 'F16': 2, 'BF16': 2, 'U32': 4, 'I32': 4, 'F32': 4, 'U64': 8,
                         'I64': 8, 'F64': 8}
_WEIGHT_DTYPES = ('F32', 'F16', 'BF16', 'F64')
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_DOWNLOAD_AGAIN = 'download or copy it again (an interrupted download or copy leaves such files)'


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor as a safetensors header describes it."""

  file: str  # file name inside the checkpoint folder
  dtype: str  # safetensors dtype name, e.g. 'BF16'
  shape: tuple[int, ...]


def _header_entry(file_name: str, entry: Any) -> tuple[TensorInfo, int] | None:
  """`(TensorInfo, end of its data)` of one header entry, or None when it is not a valid one."""
  try:
    dtype, shape, (begin, end) = entry['dtype'], tuple(entry['shape']), entry['data_offsets']
  except (TypeError, KeyError, ValueError):
    return None
  sizes = (*shape, begin, end)
  if not isinstance(dtype, str) or begin > end or not all(
      isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
    return None
  itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)  # a dtype newer than this table is not checked
  if itemsize is not None and end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
    return None
  return TensorInfo(file_name, dtype, shape), end


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
  """The tensors of one safetensors file, from its header alone, with the file checked whole.

  Raises `UserError` naming the file for a header that is not one (garbled bytes, another
  format) and for a size other than 8 + header + the end of the last tensor's data: a file cut
  short would otherwise fail (or read garbage) only when the missing tensor is read.
  """
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    length_bytes = f.read(8)
    header_length = int.from_bytes(length_bytes, 'little')
    if len(length_bytes) < 8 or header_length > min(size - 8, _MAX_HEADER_BYTES):
      raise UserError(f'{path} does not start with a safetensors header (its {size:,} bytes '
                      f'cannot hold the {header_length:,}-byte header its first 8 bytes give); '
                      f'it is damaged or not safetensors: {_DOWNLOAD_AGAIN}.')
    raw = f.read(header_length)
  try:
    header = json.loads(raw)
  except ValueError as error:  # not UTF-8, or not JSON
    raise UserError(f'{path} has a garbled safetensors header ({error}); the file is damaged: '
                    f'{_DOWNLOAD_AGAIN}.') from None
  if not isinstance(header, dict):
    raise UserError(f'{path} has a garbled safetensors header (JSON {type(header).__name__}, '
                    f'not an object); the file is damaged: {_DOWNLOAD_AGAIN}.')
  header.pop('__metadata__', None)
  tensors: dict[str, TensorInfo] = {}
  data_end = 0
  for name, entry in header.items():
    parsed = _header_entry(os.path.basename(path), entry)
    if parsed is None:
      raise UserError(f'{path} has a garbled safetensors header: the entry of {name} is '
                      f'{json.dumps(entry)[:120]}, not a dtype, shape and matching '
                      f'data_offsets; the file is damaged: {_DOWNLOAD_AGAIN}.')
    tensors[name], end = parsed
    data_end = max(data_end, end)
  expected = 8 + header_length + data_end
  if size < expected:
    raise UserError(f'{path} is cut short: it is {size:,} bytes but its header describes '
                    f'{expected:,}; {_DOWNLOAD_AGAIN}.')
  if size > expected:
    raise UserError(f'{path} is {size:,} bytes but its header describes {expected:,} (the rest '
                    f'is not safetensors data); the file is damaged: {_DOWNLOAD_AGAIN}.')
  return tensors


def _read_index(index_path: str) -> dict[str, str]:
  """The `weight_map` (tensor name -> shard file) of a `model.safetensors.index.json`."""
  try:
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
  except (ValueError, KeyError, TypeError) as error:
    problem = f'not JSON ({error})' if isinstance(error, ValueError) else 'without a weight_map'
    raise UserError(f'{index_path} is {problem}; it is damaged: {_DOWNLOAD_AGAIN}.') from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise UserError(f'{index_path}: its weight_map is not tensor names mapped to file names; '
                    f'it is damaged: {_DOWNLOAD_AGAIN}.')
  return weight_map


class SafetensorsReader:
  """Lazy reads from the `*.safetensors` files of one folder (memory-mapped by safetensors).

  Opening reads every file's header and checks it (`read_safetensors_header`), and that each
  tensor an index names is in the shard it names, so a damaged or incomplete folder fails here,
  with the file named, before any tensor is read.
  """

  def __init__(self, folder: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._safe_open = safe_open
    self.folder = folder
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    single_path = os.path.join(folder, SAFETENSORS_SINGLE)
    self.tensors: dict[str, TensorInfo] = {}
    if os.path.isfile(index_path):
      self.weight_map = _read_index(index_path)
      for file_name in sorted(set(self.weight_map.values())):
        path = os.path.join(folder, file_name)
        names = sorted(n for n, f in self.weight_map.items() if f == file_name)
        if not os.path.isfile(path):
          raise UserError(f'{index_path} puts {len(names)} tensors (e.g. {names[0]}) in '
                          f'{file_name}, which is not in {folder}; download the missing '
                          'shard again.')
        header = read_safetensors_header(path)
        absent = [n for n in names if n not in header]
        if absent:
          raise UserError(f'{index_path} puts {absent[0]} in {file_name}, but that file does '
                          f'not hold it ({len(absent)} such tensors); the index and the shards '
                          'are from different downloads: download the folder again.')
        self.tensors.update((n, header[n]) for n in names)
    elif os.path.isfile(single_path):
      self.tensors = read_safetensors_header(single_path)
      self.weight_map = {name: SAFETENSORS_SINGLE for name in self.tensors}
    else:
      others = sorted(n for n in os.listdir(folder) if n.endswith(('.bin', '.pt', '.pth')))
      if others:
        raise UserError(
            f'{folder!r} holds only PyTorch pickle weights ({", ".join(others[:3])}); jaxsft '
            'reads safetensors (no torch at run time). Convert once with: python -c "from '
            f'transformers import AutoModelForCausalLM as M; M.from_pretrained({folder!r})'
            f'.save_pretrained({folder!r})"')
      raise UserError(f'{folder!r} has neither {SAFETENSORS_SINGLE} nor '
                      f'{SAFETENSORS_INDEX}; pass the folder holding the model\'s '
                      '*.safetensors files.')
    self._handles: dict[str, Any] = {}

  def _file(self, name: str):
    file_name = self.weight_map[name]
    if file_name not in self._handles:
      self._handles[file_name] = self._safe_open(os.path.join(self.folder, file_name), 'np')
    return self._handles[file_name]

  def path(self, name: str) -> str:
    """The file that holds tensor `name`."""
    return os.path.join(self.folder, self.weight_map[name])

  def shape(self, name: str) -> tuple[int, ...]:
    return self.tensors[name].shape

  def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
    """Reads `tensor[index]` without reading the rest of the tensor."""
    tensor_slice = self._file(name).get_slice(name)
    return np.asarray(tensor_slice[index] if index else tensor_slice[:])

  def close(self) -> None:
    self._handles.clear()


def _read_shard(reader: SafetensorsReader, entry: _Entry, index: tuple[slice, ...],
                dtype: Any) -> np.ndarray:
  """Reads the part `index` (in jaxsft layout) of one parameter from the HF tensors."""
  layer_index, inner = (index[0], index[1:]) if entry.stacked else (slice(None), index)
  hf_inner = tuple(reversed(inner)) if entry.transpose else tuple(inner)

  def one(name):
    part = reader.read(name, hf_inner)
    return (part.T if entry.transpose else part).astype(dtype)

  if not entry.stacked:
    return one(entry.hf_names[0])
  return np.stack([one(name) for name in entry.hf_names[layer_index]])


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
  _, entries = _check_tensors(folder, reader, config)
  abstract = abstract_params(config)
  if mesh is not None:
    shardings = logical_shardings(abstract, mesh, rules)
  else:
    device = jax.local_devices()[0]
    shardings = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(device), nn.unbox(abstract))
  abstract = nn.unbox(abstract)

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


class _MissingTensorsError(UserError, KeyError):
  """Tensors config.json requires are not in the files (a `KeyError` too, as it once was)."""

  __str__ = BaseException.__str__  # the message as is, not KeyError's quoted repr


def _expected_shapes(config: LlamaConfig, entries: list[_Entry], prefix: str
                     ) -> dict[str, tuple[tuple[int, str], ...]]:
  """The HF shape of each tensor of `entries`: each size with the config.json setting behind it
  (what a mismatch error names)."""
  c = config
  hidden = (c.hidden_size, f'hidden_size {c.hidden_size}')
  vocab = (c.vocab_size, f'vocab_size {c.vocab_size}')
  inter = (c.intermediate_size, f'intermediate_size {c.intermediate_size}')
  head = (c.head_dim, f'head_dim {c.head_dim}')
  q = (c.num_heads * c.head_dim,
       f'num_attention_heads x head_dim = {c.num_heads} x {c.head_dim}')
  kv = (c.num_kv_heads * c.head_dim,
        f'num_key_value_heads x head_dim = {c.num_kv_heads} x {c.head_dim}')
  in_layer = {
      'input_layernorm.weight': (hidden,), 'post_attention_layernorm.weight': (hidden,),
      'self_attn.q_proj.weight': (q, hidden), 'self_attn.k_proj.weight': (kv, hidden),
      'self_attn.v_proj.weight': (kv, hidden), 'self_attn.o_proj.weight': (hidden, q),
      'self_attn.q_proj.bias': (q,), 'self_attn.k_proj.bias': (kv,),
      'self_attn.v_proj.bias': (kv,), 'self_attn.o_proj.bias': (hidden,),
      'self_attn.q_norm.weight': (head,), 'self_attn.k_norm.weight': (head,),
      'mlp.gate_proj.weight': (inter, hidden), 'mlp.up_proj.weight': (inter, hidden),
      'mlp.down_proj.weight': (hidden, inter), 'mlp.gate_proj.bias': (inter,),
      'mlp.up_proj.bias': (inter,), 'mlp.down_proj.bias': (hidden,)}
  whole = {f'{prefix}embed_tokens.weight': (vocab, hidden), f'{prefix}norm.weight': (hidden,),
           'lm_head.weight': (vocab, hidden)}
  layers = f'{prefix}layers.'
  return {name: in_layer[name[len(layers):].split('.', 1)[1]] if name.startswith(layers)
          else whole[name] for entry in entries for name in entry.hf_names}


def _layer_numbers(names: Mapping[str, Any], prefix: str) -> set[int]:
  """The `N` of every `{prefix}layers.N.*` tensor name."""
  start = f'{prefix}layers.'
  numbers = (name[len(start):].split('.', 1)[0] for name in names if name.startswith(start))
  return {int(n) for n in numbers if n.isdigit()}


def _check_tensors(folder: str, reader: SafetensorsReader, config: LlamaConfig
                   ) -> tuple[str, list[_Entry]]:
  """Checks the tensors the safetensors headers describe against what `config` (from the
  folder's config.json) needs: the number of layers, every name, shape and a float dtype, and
  no tensor the model would not use. Returns the name prefix ('model.' or '') and the entries.

  A config.json from another model would otherwise fail deep inside the load with a shape
  error (or, for fewer layers, silently drop the rest); this names the file, the tensor and the
  setting instead.
  """
  found = reader.tensors
  prefix = 'model.' if any(name.startswith('model.') for name in found) else ''
  entries = parameter_entries(config, prefix)
  config_path = os.path.join(folder, 'config.json')
  files = sorted(set(reader.weight_map.values()))
  weights = os.path.join(folder, files[0]) if len(files) == 1 else (
      f'the {len(files)} safetensors files of {folder}')
  s = 's' if len(files) == 1 else ''  # weights hold(s)
  not_theirs = (f'{config_path} does not belong to these weights: use the config.json saved '
                'with them')
  layers = _layer_numbers(found, prefix)
  if layers and max(layers) + 1 != config.num_layers:
    raise UserError(f'config.json says num_hidden_layers {config.num_layers} but {weights} '
                    f'hold{s} {max(layers) + 1} layers ({prefix}layers.0 to {max(layers)}); '
                    f'{not_theirs}.')
  shapes = _expected_shapes(config, entries, prefix)
  missing = [name for name in shapes if name not in found]
  if missing:
    raise _MissingTensorsError(
        f'{weights} lack{s} {len(missing)} tensors that {config_path} requires, e.g. '
        f'{missing[0]}; the weights are incomplete (download them again) or {not_theirs}.')
  for name, expected in shapes.items():
    info, path = found[name], reader.path(name)
    sizes = tuple(size for size, _ in expected)
    if info.shape != sizes:
      setting = next((why for (size, why), got in zip(expected, info.shape) if size != got),
                     None) if len(info.shape) == len(sizes) else None
      says = f'says {setting}' if setting else f'implies the shape {list(sizes)}'
      raise UserError(f'config.json {says} but {name} in {path} is {list(info.shape)} '
                      f'(expected {list(sizes)}); {not_theirs}.')
    if info.dtype not in _WEIGHT_DTYPES:
      raise UserError(f'{name} in {path} is {info.dtype}; jaxsft reads float weights '
                      f'({", ".join(_WEIGHT_DTYPES)}), not quantized checkpoints (GPTQ, AWQ, '
                      'bitsandbytes, FP8): use the original float checkpoint (quant.kind '
                      'quantizes it for QLoRA).')
  # Tied checkpoints may still carry lm_head.weight; rotary caches are recomputed.
  ignorable = ('lm_head.weight', '.rotary_emb.inv_freq')
  unused = sorted(n for n in set(found) - set(shapes) if not n.endswith(ignorable))
  if unused:
    raise UserError(f'{unused[0]} in {reader.path(unused[0])} is not a tensor of the '
                    f'{config.model_type} model that {config_path} describes'
                    f'{f" (nor are {len(unused) - 1} more)" if len(unused) > 1 else ""}; '
                    f'{not_theirs}.')
  return prefix, entries


def check_checkpoint(path: str | os.PathLike) -> tuple[LlamaConfig, SafetensorsReader]:
  """The `LlamaConfig` of an HF folder's config.json and a reader of its weights, checked
  against each other as `load_checkpoint` checks them before reading a tensor; raises
  `UserError` naming the file, the tensor and the setting where they disagree."""
  folder = resolve_checkpoint_dir(path)
  config = config_from_hf(read_hf_config(folder))
  reader = SafetensorsReader(folder)
  _check_tensors(folder, reader, config)
  return config, reader


# ---------------------------------------------------------------------------------------------
# Saving


def _to_host(array: Any) -> np.ndarray:
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


def hf_tensors(config: LlamaConfig, params: Mapping[str, Any], dtype: Any
               ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(HF name, [out, in]-layout numpy tensor)` for every parameter, one at a time."""
  for entry in parameter_entries(config):
    value = _to_host(_get_path(params, entry.path))
    for i, name in enumerate(entry.hf_names):
      tensor = value[i] if entry.stacked else value
      tensor = tensor.T if entry.transpose else tensor
      yield name, np.ascontiguousarray(tensor.astype(dtype))


def save_checkpoint(path: str | os.PathLike, config: LlamaConfig, params: Mapping[str, Any], *,
                    dtype: Any = None, tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes an HF folder that `AutoModelForCausalLM.from_pretrained` loads.

  Args:
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
