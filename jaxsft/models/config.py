"""`LlamaConfig`: the architecture of a LLaMA-family model and how to run it.

One dataclass covers LLaMA 1/2/3, Mistral, Qwen2 and Qwen3; they differ only in the fields below
(GQA head counts, rotary scaling, q/k/v biases, per-head q/k norms, tied embeddings, sliding
window). Mixture-of-experts models (Qwen3-MoE, Mixtral) are the same decoder with the MLP of
some layers replaced by a router and `num_experts` expert MLPs (`jaxsft.models.moe`). The HF
`config.json` mapping lives in `jaxsft.interop.hf_config`; this module knows nothing about files.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxsft.adapters.lora import LoraSettings

ROPE_TYPES = ('default', 'linear', 'llama3', 'yarn', 'dynamic')  # see jaxsft.models.rope
REMAT_POLICIES = ('none', 'full', 'save_dots', 'save_dots_with_batch', 'save_attention_out')
ATTENTION_IMPLEMENTATIONS = ('xla', 'blocked', 'cudnn', 'splash', 'auto')
MOE_EXCHANGES = ('weights', 'tokens')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture plus execution options of a LLaMA-family decoder.

  Architecture fields follow HF names where one exists (`hidden_size`, `num_kv_heads` is HF's
  `num_key_value_heads`). `rope_scaling` is HF's rope-parameter dict without `rope_theta`,
  e.g. `{'rope_type': 'llama3', 'factor': 8.0, ...}`, or None for plain RoPE.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2; LLaMA's `attention_bias` sets this and `o_bias`
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each head's queries and keys
  sliding_window: int | None = None  # Mistral: a query sees at most this many keys
  # Mixture of experts (0 experts: every layer has the dense MLP). A layer i is sparse, as in
  # transformers, when `(i + 1) % decoder_sparse_step == 0` and i is not in `mlp_only_layers`.
  num_experts: int = 0
  num_experts_per_tok: int = 2  # top-k
  moe_intermediate_size: int = 0  # each expert's F; 0: intermediate_size
  norm_topk_prob: bool = True  # renormalize the top-k probabilities (Mixtral always does)
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  # The load-balancing loss's weight in the training loss (transformers' `router_aux_loss_coef`,
  # added when the router logits are output); 0 logs it without training on it.
  router_aux_loss_coef: float = 0.0
  model_type: str = 'llama'  # 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'qwen3_moe' | 'mixtral'

  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  pad_token_id: int | None = None

  # Execution options: they change speed and memory, never the function computed.
  dtype: Any = jnp.float32  # compute dtype of activations and matmuls
  param_dtype: Any = jnp.float32  # dtype parameters are created in by `init`
  logits_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_implementation: str = 'xla'
  # Tokens per chunk of a row's MLP (per device): the [T, F] intermediates of a long row exist
  # one chunk at a time (`jaxsft.models.llama.MLP`); 0 runs the row's MLP whole.
  mlp_chunk_size: int = 0
  # What crosses the devices an MoE layer's experts are split over (`expert -> fsdp`): the
  # experts' weights, gathered per layer as FSDP weights are ('weights'), or the tokens, sent
  # to the experts' devices and their outputs summed back, the weights staying put ('tokens',
  # `jaxsft.models.moe.exchanged_experts_forward`; docs/design.md says when each moves less).
  moe_exchange: str = 'weights'
  # LoRA execution (the adapters themselves live in the `lora` variable collection), set from
  # the adapter's settings by `with_lora`. No default scale: a model given adapters without one
  # raises instead of computing a silently wrong update.
  lora_scale: float | None = None  # alpha / r, or alpha / sqrt(r) with rsLoRA
  lora_dropout: float = 0.0  # on the adapter's input, training only
  # Segment ids as bit sets (scoring several continuations of one context in one row): a token
  # attends to earlier tokens whose set shares a bit with its own (`attention.segment_set_mask`),
  # not only to its own segment. The `xla` attention serves it.
  segment_sets: bool = False

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)
    for field in ('dtype', 'param_dtype', 'logits_dtype'):
      object.__setattr__(self, field, jnp.dtype(getattr(self, field)))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'LlamaConfig: num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}; GQA needs whole groups.')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'LlamaConfig.remat_policy={self.remat_policy!r}; '
                       f'choose one of {REMAT_POLICIES}.')
    object.__setattr__(self, 'mlp_only_layers', tuple(int(i) for i in self.mlp_only_layers))
    if self.num_experts:
      if not 1 <= self.num_experts_per_tok <= self.num_experts:
        raise ValueError(f'LlamaConfig: num_experts_per_tok={self.num_experts_per_tok} must be '
                         f'between 1 and num_experts={self.num_experts}.')
      if self.decoder_sparse_step < 1:
        raise ValueError(f'LlamaConfig: decoder_sparse_step={self.decoder_sparse_step} must be '
                         '>= 1.')
      if not self.moe_intermediate_size:
        object.__setattr__(self, 'moe_intermediate_size', self.intermediate_size)
    if self.moe_exchange not in MOE_EXCHANGES:
      raise ValueError(f'LlamaConfig.moe_exchange={self.moe_exchange!r}; choose one of '
                       f'{MOE_EXCHANGES}.')
    if self.mlp_chunk_size < 0:
      raise ValueError(f'LlamaConfig.mlp_chunk_size={self.mlp_chunk_size}; must be >= 0.')
    if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'LlamaConfig.attention_implementation={self.attention_implementation!r};'
                       f' choose one of {ATTENTION_IMPLEMENTATIONS}.')
    # `type`: transformers 4's older spelling of `rope_type`, which jaxsft.models.rope reads too.
    rope = self.rope_scaling or {}
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f'LlamaConfig.rope_scaling has rope_type={rope_type!r}, which jaxsft does '
                       f'not implement; supported: {ROPE_TYPES}.')

  def __hash__(self):
    # rope_scaling is a dict; Linen hashes module attributes, so hash a frozen view of it.
    fields = dataclasses.astuple(self)
    return hash(tuple(tuple(sorted(f.items())) if isinstance(f, dict) else
                      tuple(f) if isinstance(f, list) else f for f in fields))

  @property
  def heads_per_group(self) -> int:
    return self.num_heads // self.num_kv_heads

  def is_sparse_layer(self, layer: int) -> bool:
    """Whether layer `layer` (0-based) has experts instead of the dense MLP."""
    return (self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0
            and layer not in self.mlp_only_layers)

  @property
  def sparse_layers(self) -> tuple[bool, ...]:
    return tuple(self.is_sparse_layer(i) for i in range(self.num_layers))

  @property
  def scanned(self) -> bool:
    """Whether the layers run as one `nn.scan` (parameters stacked under `layers`): with
    `scan_layers`, and only where every layer has the same parameters (no mix of dense and
    sparse layers); else they are `layers_0 ... layers_{L-1}`."""
    return self.scan_layers and len(set(self.sparse_layers)) == 1

  def replace(self, **changes: Any) -> 'LlamaConfig':
    """A copy with `changes` (field names and values) applied."""
    return dataclasses.replace(self, **changes)

  def with_lora(self, lora: LoraSettings | None) -> 'LlamaConfig':
    """This config applying adapters of `lora` (its scale and dropout); None: no adapters."""
    if lora is None:
      return self.replace(lora_scale=None, lora_dropout=0.0)
    return self.replace(lora_scale=lora.scale, lora_dropout=lora.dropout)

  def num_params(self) -> int:
    """Parameter count from the shapes alone (embeddings and LM head included)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_heads * h, self.num_kv_heads * h
    attn = d * q + 2 * d * kv + q * d
    attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
    dense_mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    sparse_mlp = self.num_experts * (3 * d * self.moe_intermediate_size + d)  # experts, router
    layer = attn + 2 * d + 2 * h * self.qk_norm
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    mlps = sum(sparse_mlp if sparse else dense_mlp for sparse in self.sparse_layers)
    return self.vocab_size * d + self.num_layers * layer + mlps + d + head

  def num_active_params(self) -> int:
    """Parameters one token's forward pass uses: `num_params` with only `num_experts_per_tok`
    of each sparse layer's experts (what FLOP counts of an MoE model are of)."""
    unused = (self.num_experts - self.num_experts_per_tok) * 3 * self.hidden_size * (
        self.moe_intermediate_size)
    return self.num_params() - unused * sum(self.sparse_layers)
