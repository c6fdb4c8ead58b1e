"""What an HF checkpoint folder holds, read from its safetensors headers before any tensor is.

Owns the reading and checking of safetensors headers and of a shard index (`read_safetensors_header`, `TensorInfo`,
`SafetensorsReader`, which also reads tensors lazily once opened), and the checks of a folder's
`config.json` against those headers (`check_tensors`, `check_checkpoint`): the number of layers,
every name, shape and a float dtype. A damaged, incomplete or mismatched folder fails here,
naming the file, the tensor and the setting, before a weight is read.

The HF tensor names of every jaxsft parameter are `interop.hf_names`'s; turning the tensors
into jaxsft parameters and back is `interop.hf`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxsft.errors import UserError
from jaxsft.interop.hf_config import config_from_hf, read_hf_config, resolve_checkpoint_dir
from jaxsft.interop.hf_names import ParamEntry, expected_shapes, parameter_entries
from jaxsft.models.config import LlamaConfig

SAFETENSORS_SINGLE = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'


# ---------------------------------------------------------------------------------------------
# Safetensors headers

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

# ---------------------------------------------------------------------------------------------
# config.json against the headers


class _MissingTensorsError(UserError, KeyError):
  """Tensors config.json requires are not in the files (a `KeyError` too, as it once was)."""

  __str__ = BaseException.__str__  # the message as is, not KeyError's quoted repr


def _layer_numbers(names: Mapping[str, Any], prefix: str) -> set[int]:
  """The `N` of every `{prefix}layers.N.*` tensor name."""
  start = f'{prefix}layers.'
  numbers = (name[len(start):].split('.', 1)[0] for name in names if name.startswith(start))
  return {int(n) for n in numbers if n.isdigit()}


def check_tensors(folder: str, reader: SafetensorsReader, config: LlamaConfig
                   ) -> tuple[str, list[ParamEntry]]:
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
  shapes = expected_shapes(config, entries, prefix)
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
  check_tensors(folder, reader, config)
  return config, reader
