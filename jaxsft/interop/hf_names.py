"""The HF tensor name(s) behind every jaxsft parameter, and the HF shape each must have.

A jaxsft leaf may gather many HF tensors: with `scan_layers` one per layer (stacked on a leading
layer axis), and for mixture-of-experts layers one per expert (stacked on the next axis) and
per part (transformers saves an expert's gate and up projections as two tensors; jaxsft keeps
them side by side in one `gate_up_proj` kernel, as transformers 5 does in memory). A
`ParamEntry` lists those names in row-major order over its `name_grid`.

Family differences live here: Mixtral's checkpoints name the sparse MLP `block_sparse_moe`
and its experts' projections `w1` (gate), `w3` (up), `w2` (down); Qwen3-MoE's use `mlp` and
the dense names.
"""

from __future__ import annotations

import dataclasses
import re

from jaxsft.models.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class ParamEntry:
  """One leaf of the jaxsft parameter tree and the HF tensor(s) behind it."""

  path: tuple[str, ...]  # path in the params tree, e.g. ('layers', 'mlp', 'up_proj', 'kernel')
  hf_names: tuple[str, ...]  # row-major over `name_grid`
  transpose: bool  # HF [out, in] <-> kernel [in, out]
  stacked: bool  # a leading layer axis (`scan_layers`)
  experts: int = 0  # E > 0: an expert axis after the layer axis, one HF tensor per expert
  parts: int = 1  # HF tensors concatenated along the kernel's last (output) axis

  @property
  def name_grid(self) -> tuple[int, ...]:
    """The shape of `hf_names`: (layers if stacked) + (experts if any) + (parts,)."""
    layers = (len(self.hf_names) // (max(self.experts, 1) * self.parts),) if self.stacked else ()
    return layers + ((self.experts,) if self.experts else ()) + (self.parts,)

  @property
  def lead_axes(self) -> int:
    """How many leading axes of the jaxsft array index HF tensors (layers, experts)."""
    return int(self.stacked) + int(bool(self.experts))


def _moe_names(config: LlamaConfig) -> tuple[str, dict[str, str]]:
  """The sparse MLP's HF module name and its experts' projection names."""
  if config.model_type == 'mixtral':
    return 'block_sparse_moe', {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}
  return 'mlp', {name: name for name in ('gate_proj', 'up_proj', 'down_proj')}


def _layer_tensors(config: LlamaConfig, sparse: bool
                   ) -> list[tuple[tuple[str, ...], tuple[str, ...], bool, int]]:
  """(path inside a layer, HF suffixes per expert and part, transpose, experts) for every
  tensor of a dense or sparse layer; an expert's suffixes hold `{e}` for its index."""
  c = config
  entries = [(('input_layernorm', 'scale'), ('input_layernorm.weight',), False, 0),
             (('post_attention_layernorm', 'scale'), ('post_attention_layernorm.weight',),
              False, 0)]
  for name, bias in (('q_proj', c.qkv_bias), ('k_proj', c.qkv_bias), ('v_proj', c.qkv_bias),
                     ('o_proj', c.o_bias)):
    entries.append((('self_attn', name, 'kernel'), (f'self_attn.{name}.weight',), True, 0))
    if bias:
      entries.append((('self_attn', name, 'bias'), (f'self_attn.{name}.bias',), False, 0))
  if c.qk_norm:
    entries += [(('self_attn', f'{name}_norm', 'scale'), (f'self_attn.{name}_norm.weight',),
                 False, 0) for name in ('q', 'k')]
  if sparse:
    module, names = _moe_names(c)
    experts = f'{module}.experts.{{e}}'
    entries += [
        (('mlp', 'gate', 'kernel'), (f'{module}.gate.weight',), True, 0),
        (('mlp', 'experts', 'gate_up_proj', 'kernel'),
         (f'{experts}.{names["gate_proj"]}.weight', f'{experts}.{names["up_proj"]}.weight'),
         True, c.num_experts),
        (('mlp', 'experts', 'down_proj', 'kernel'), (f'{experts}.{names["down_proj"]}.weight',),
         True, c.num_experts)]
    return entries
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    entries.append((('mlp', name, 'kernel'), (f'mlp.{name}.weight',), True, 0))
    if c.mlp_bias:
      entries.append((('mlp', name, 'bias'), (f'mlp.{name}.bias',), False, 0))
  return entries


def _names(prefix: str, layers: list[int], suffixes: tuple[str, ...], experts: int
           ) -> tuple[str, ...]:
  return tuple(f'{prefix}layers.{i}.{suffix.format(e=e)}' for i in layers
               for e in range(max(experts, 1)) for suffix in suffixes)


def parameter_entries(config: LlamaConfig, prefix: str = 'model.') -> list[ParamEntry]:
  """Every parameter of `Llama(config)` with its HF tensor name(s), in HF's order."""
  entries = [ParamEntry(('embed_tokens', 'embedding'), (f'{prefix}embed_tokens.weight',), False,
                        False)]
  layers = list(range(config.num_layers))
  if config.scanned:
    for sub_path, suffixes, transpose, experts in _layer_tensors(config,
                                                                 config.is_sparse_layer(0)):
      entries.append(ParamEntry(('layers',) + sub_path, _names(prefix, layers, suffixes, experts),
                                transpose, True, experts, len(suffixes)))
  else:
    for i in layers:
      for sub_path, suffixes, transpose, experts in _layer_tensors(config,
                                                                   config.is_sparse_layer(i)):
        entries.append(ParamEntry((f'layers_{i}',) + sub_path,
                                  _names(prefix, [i], suffixes, experts), transpose, False,
                                  experts, len(suffixes)))
  entries.append(ParamEntry(('norm', 'scale'), (f'{prefix}norm.weight',), False, False))
  if not config.tie_word_embeddings:
    entries.append(ParamEntry(('lm_head', 'kernel'), ('lm_head.weight',), True, False))
  return entries


def expected_shapes(config: LlamaConfig, entries: list[ParamEntry], prefix: str
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
  if c.num_experts:
    module, names = _moe_names(c)
    setting = 'intermediate_size' if c.model_type == 'mixtral' else 'moe_intermediate_size'
    expert_inter = (c.moe_intermediate_size, f'{setting} {c.moe_intermediate_size}')
    in_layer.update({
        f'{module}.gate.weight': ((c.num_experts, f'num_experts {c.num_experts}'), hidden),
        f'{module}.experts.*.{names["gate_proj"]}.weight': (expert_inter, hidden),
        f'{module}.experts.*.{names["up_proj"]}.weight': (expert_inter, hidden),
        f'{module}.experts.*.{names["down_proj"]}.weight': (hidden, expert_inter)})
  whole = {f'{prefix}embed_tokens.weight': (vocab, hidden), f'{prefix}norm.weight': (hidden,),
           'lm_head.weight': (vocab, hidden)}
  layers = f'{prefix}layers.'

  def in_layer_shape(name):
    suffix = re.sub(r'\.experts\.\d+\.', '.experts.*.', name[len(layers):].split('.', 1)[1])
    return in_layer[suffix]

  return {name: in_layer_shape(name) if name.startswith(layers) else whole[name]
          for entry in entries for name in entry.hf_names}
