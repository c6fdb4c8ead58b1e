"""Training speed and memory: jaxsft (full / LoRA / QLoRA) and, side by side, transformers + PEFT.

Times steady-state train steps after compilation (jaxsft) or warm-up (torch) on the same packed
rows and, with `--compare-hf`, the same initial weights (one random HF checkpoint both load;
their first-step losses are printed as a check that both compute the same thing). Reports
tokens/s (non-padding positions), step time, peak memory and MFU from `jaxsft.train.flops` (model
FLOPs: 6 P per trained and 4 P per frozen matmul parameter per token, plus causal attention).
Each (side, method) runs in its own process, so peaks and thread pools never mix.

  # CPU, the issue's side by side (hidden 512, 8 layers, LoRA r16), on real Alpaca rows:
  python scripts/bench_train.py --model cpu-512 --methods lora --seq 512 --batch 4 \
      --compare-hf --data ../shared/data/instructions/alpaca_en_demo.json \
      --tokenizer ../shared/data/tokenizers/llama2
  # GPU: LLaMA-3.2-1B shape, bf16, seq 2048, packed; every method, both sides:
  python scripts/bench_train.py --model llama3.2-1b --methods full,lora,qlora --seq 2048 \
      --batch 8 --dtype bfloat16 --compare-hf

`--model` is a `jaxsft.presets` name, `cpu-512`, `cpu-moe` (Qwen3-MoE layout, 8 experts, top-2),
`tiny` (seconds per method on a CPU: the dry run of scripts/device_check.sh), or an HF folder. Without `--data`
the rows are synthetic: Alpaca-like example lengths (log-normal, median ~160 tokens) with the
first 20-60 % of each example unsupervised (the prompt), packed with jaxsft's bfd packing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# The CPU comparison model: LLaMA-2 vocabulary, hidden 512, 8 layers.
CPU_512 = dict(model_type='llama', vocab_size=32000, hidden_size=512, intermediate_size=1376,
               num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# A model that compiles and runs in seconds, for dry runs of the scripts that call this one
# (scripts/device_check.sh --dry-run): LLaMA-3.2-1B's head_dim and GQA, and every kernel input
# a multiple of QLoRA's 64-input blocks.
TINY = dict(model_type='llama', vocab_size=512, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# Issue 27's CPU comparison of a mixture-of-experts model: Qwen3-MoE's layout (q/k norms, top-k
# renormalized as Qwen3-30B-A3B's config), hidden 512, 4 layers of 8 experts of 512, top-2.
CPU_MOE = dict(model_type='qwen3_moe', vocab_size=32000, hidden_size=512, intermediate_size=1536,
               moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2,
               norm_topk_prob=True, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
               max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
_LOCAL_MODELS = {'cpu-512': CPU_512, 'tiny': TINY, 'cpu-moe': CPU_MOE}
_ARCH_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
                'num_kv_heads', 'head_dim', 'rms_norm_eps', 'rope_theta', 'rope_scaling',
                'max_position_embeddings', 'tie_word_embeddings', 'sliding_window',
                'model_type', 'qk_norm', 'num_experts', 'num_experts_per_tok',
                'moe_intermediate_size', 'norm_topk_prob', 'decoder_sparse_step',
                'mlp_only_layers', 'router_aux_loss_coef')
# LoRA on every projection; a mixture-of-experts model's experts are `gate_up_proj` and
# `down_proj` (PEFT reaches them with `target_parameters`).
_LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
_MOE_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_up_proj', 'down_proj']
_PEFT_EXPERTS = ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']


# ----------------------------------------------------------------------------- data


def hf_fields(model: str) -> dict:
  from jaxsft.interop import hf_config, presets
  if model in _LOCAL_MODELS:
    return dict(_LOCAL_MODELS[model])
  if model in presets.HF_CONFIGS:
    return dict(presets.HF_CONFIGS[model])
  return hf_config.read_hf_config(model)


def synthetic_rows(num_rows: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  from jaxsft.data import packing
  rng = np.random.default_rng(seed)
  examples, total = [], 0
  while total < num_rows * seq_len * 1.05:
    n = int(np.clip(rng.lognormal(np.log(160), 0.8), 16, seq_len + 1))
    prompt = int(n * rng.uniform(0.2, 0.6))
    examples.append({'input_ids': rng.integers(3, vocab, n).tolist(),
                     'loss_mask': [0] * prompt + [1] * (n - prompt)})
    total += n
  rows = packing.pack(examples, seq_len)
  return {k: v[:num_rows] for k, v in rows.items()}


def real_rows(args, num_rows: int) -> dict[str, np.ndarray]:
  from jaxsft.config import default_config
  from jaxsft.data.pipeline import Pipeline
  from jaxsft.data.tokenizer import load_tokenizer
  config = default_config()
  config.data.datasets = [{'path': args.data}]
  config.data.template = args.template
  config.data.max_seq_len = args.seq
  pipeline = Pipeline(config.data, load_tokenizer(args.tokenizer), batch_size=args.batch,
                      process_index=0, process_count=1)
  batches = pipeline.train_batches()
  parts = [next(batches) for _ in range(-(-num_rows // args.batch))]
  return {k: np.concatenate([p[k] for p in parts])[:num_rows] for k in parts[0]}


def make_hf_checkpoint(fields: dict, folder: str, dtype: str, seed: int) -> None:
  import torch
  import transformers
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(**fields)
  model = transformers.AutoModelForCausalLM.from_config(config)
  model.to(getattr(torch, dtype)).save_pretrained(folder)


# ----------------------------------------------------------------------------- workers


def _peak_memory_jax() -> tuple[float, str]:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30, 'device'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 'host RSS'


def worker_jax(spec: dict) -> dict:
  import flax.linen as nn
  import jax

  from jaxsft.config import default_config
  from jaxsft.interop import hf_config
  from jaxsft.parallel.batch import batch_sharding, global_batch
  from jaxsft.parallel.mesh import mesh_and_rules
  from jaxsft.train import flops, optim
  from jaxsft.train.model_source import model_config_from
  from jaxsft.train.run import run_settings
  from jaxsft.train.state import init_train_state, state_shardings
  from jaxsft.train.step import jit_train_step
  config = default_config()
  if spec['checkpoint']:
    config.model.path = spec['checkpoint']
  else:
    arch = hf_config.config_from_hf(spec['fields'])
    config.model.architecture = {f: getattr(arch, f) for f in _ARCH_FIELDS}
  config.model.dtype = spec['dtype']
  config.model.param_dtype = spec['param_dtype']
  config.model.attention_implementation = spec['attention']
  config.model.remat_policy = spec['remat']
  config.model.scan_layers = spec['scan']
  config.train.loss_chunk_size = spec['loss_chunk']
  method = spec['method']
  config.lora.enabled = method in ('lora', 'qlora')
  config.lora.rank, config.lora.alpha, config.lora.dropout = spec['lora_rank'], 32.0, 0.0
  targets = _MOE_TARGETS if spec['fields'].get('num_experts') else _LORA_TARGETS
  config.lora.targets = list(targets)
  config.quant.kind = 'nf4' if method == 'qlora' else 'none'
  config.optim.learning_rate = 1e-4
  config.batch_size = spec['batch']
  config.data.max_seq_len = spec['seq']
  settings = run_settings(config)
  model_config, folder = model_config_from(settings.model, settings.lora)
  mesh, rules = mesh_and_rules(settings.mesh, jax.devices()[:1])
  optimizer, schedule = optim.make_optimizer(settings.optim, 1000)
  data = np.load(spec['rows'])
  rows = {k: data[k] for k in data.files}
  parts = {'lora': settings.lora, 'quant': settings.quant}
  state = init_train_state(model_config, optimizer, mesh, rules, base=folder,
                           seed=settings.seed, **parts)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = state_shardings(model_config, optimizer, mesh, rules, **parts)
    row_sharding = batch_sharding(mesh)
    step = jit_train_step(model_config, optimizer, shardings, row_sharding, settings.step,
                          schedule)
    b = spec['batch']
    count = len(rows['inputs']) // b
    batches = [global_batch({k: v[i * b:(i + 1) * b] for k, v in rows.items()}, row_sharding)
               for i in range(count)]
    tokens = [int((rows['segment_ids'][i * b:(i + 1) * b] > 0).sum()) for i in range(count)]
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batches[0])
    first_loss = float(metrics['loss'])
    for i in range(1, spec['warmup']):
      state, metrics = compiled(state, batches[i % count])
    jax.block_until_ready(metrics)
    start, timed_tokens = time.perf_counter(), 0
    for i in range(spec['steps']):
      state, metrics = compiled(state, batches[(spec['warmup'] + i) % count])
      timed_tokens += tokens[(spec['warmup'] + i) % count]
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    if spec['profile']:
      # After the timing, so the trace's overhead never enters the figures.
      with jax.profiler.trace(os.path.join(spec["profile"], method), create_perfetto_trace=True):
        for i in range(2):
          state, metrics = compiled(state, batches[i % count])
        jax.block_until_ready(metrics)
  per_token = flops.train_flops_per_token(
      model_config, spec['seq'], lora_rank=spec['lora_rank'] if settings.lora else 0,
      lora_targets=targets)
  memory, memory_kind = _peak_memory_jax()
  return {'first_loss': first_loss, 'step_s': elapsed / spec['steps'],
          'tokens_per_s': timed_tokens / elapsed, 'compile_s': compile_s,
          'flops_per_token': per_token.total, 'peak_memory_gib': memory,
          'memory_kind': memory_kind, 'device': jax.devices()[0].device_kind,
          'versions': {'jax': jax.__version__}}


def worker_hf(spec: dict) -> dict:
  import peft
  import torch
  import transformers

  from jaxsft.interop import hf_config
  from jaxsft.train import flops
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  dtype = getattr(torch, spec['dtype'])
  # Mixed precision as `Trainer(bf16=True)` runs it: master weights in --param-dtype, the
  # forward under autocast to --dtype. Otherwise the weights themselves are in --dtype.
  mixed = spec['hf_mixed'] and spec['param_dtype'] != spec['dtype']
  kwargs = {'dtype': getattr(torch, spec['param_dtype']) if mixed else dtype,
            'attn_implementation': 'sdpa'}
  method = spec['method']
  if method == 'qlora':
    kwargs['quantization_config'] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype)
  model = transformers.AutoModelForCausalLM.from_pretrained(spec['checkpoint'], **kwargs)
  if method != 'qlora':
    model.to(device)
  if spec['remat'] != 'none':
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
  moe = bool(spec['fields'].get('num_experts'))
  if method in ('lora', 'qlora'):
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=spec['lora_rank'], lora_alpha=32, lora_dropout=0.0, target_modules=_LORA_TARGETS,
        target_parameters=_PEFT_EXPERTS if moe else None))
  model.train()
  trained = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=cuda)
  data = np.load(spec['rows'])
  b = spec['batch']
  count = len(data['inputs']) // b

  def batch(i):
    i %= count
    part = {k: torch.from_numpy(data[k][i * b:(i + 1) * b].astype(np.int64)).to(device)
            for k in ('inputs', 'targets', 'loss_mask', 'positions', 'segment_ids')}
    part['labels'] = torch.where(part['loss_mask'] > 0, part['targets'], -100)
    return part

  def step(part):
    # Packed rows: transformers builds the block-diagonal causal mask from `position_ids`
    # restarting at 0 (no attention_mask, no cache), as TRL's padding-free collator feeds it.
    with torch.autocast(device, dtype=dtype, enabled=mixed):
      logits = model(input_ids=part['inputs'], position_ids=part['positions'],
                     use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                             part['labels'].flatten(), ignore_index=-100,
                                             reduction='sum') / (part['labels'] >= 0).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  first_loss = float(step(batch(0)))
  for i in range(1, spec['warmup']):
    step(batch(i))
  sync()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  start, timed_tokens = time.perf_counter(), 0
  for i in range(spec['steps']):
    part = batch(spec['warmup'] + i)
    timed_tokens += int((part['segment_ids'] > 0).sum())
    step(part)
  sync()
  elapsed = time.perf_counter() - start
  memory = (torch.cuda.max_memory_allocated() / 2**30 if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  model_config = hf_config.config_from_hf(spec['fields'])
  per_token = flops.train_flops_per_token(
      model_config, spec['seq'], lora_rank=spec['lora_rank'] if method != 'full' else 0,
      lora_targets=_MOE_TARGETS if moe else _LORA_TARGETS)
  return {'first_loss': first_loss, 'step_s': elapsed / spec['steps'],
          'tokens_per_s': timed_tokens / elapsed, 'compile_s': 0.0,
          'flops_per_token': per_token.total, 'peak_memory_gib': memory,
          'memory_kind': 'device' if cuda else 'host RSS',
          'device': torch.cuda.get_device_name() if cuda else 'cpu',
          'versions': {'torch': torch.__version__, 'transformers': transformers.__version__,
                       'peft': peft.__version__},
          'threads': torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def _run_worker(side: str, spec: dict, workdir: str) -> dict:
  path = os.path.join(workdir, f'{side}_{spec["method"]}.json')
  with open(path, 'w') as f:
    json.dump(spec, f)
  done = subprocess.run([sys.executable, __file__, '--worker', side, '--spec', path],
                        capture_output=True, text=True)
  if done.returncode:
    return {'error': done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
            f'exit {done.returncode}', 'stderr_tail': done.stderr[-3000:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def _mfu(result: dict) -> float | None:
  """Model FLOPs utilization, None on a device of unknown peak (a CPU)."""
  from jaxsft.train import flops
  peak = flops.peak_flops_of_kind(result['device'])
  if not peak:
    return None
  return flops.mfu(result['flops_per_token'], result['tokens_per_s'], peak_flops=peak)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='cpu-512')
  parser.add_argument('--methods', default='full,lora,qlora')
  parser.add_argument('--seq', type=int, default=512)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps (after compiling)')
  parser.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 on GPUs)')
  parser.add_argument('--param-dtype', default='float32', help='jaxsft master weights')
  parser.add_argument('--attention', default='auto')
  parser.add_argument('--remat', default='none', help='jaxsft remat policy (HF: any but none '
                      'turns on gradient checkpointing)')
  parser.add_argument('--no-scan', action='store_true', help='unrolled layers (jaxsft)')
  parser.add_argument('--loss-chunk', type=int, default=256, help='train.loss_chunk_size')
  parser.add_argument('--lora-rank', type=int, default=16)
  parser.add_argument('--hf-mixed', action='store_true',
                      help='transformers side in mixed precision as Trainer(bf16=True): '
                      'weights in --param-dtype, forward under torch.autocast to --dtype')
  parser.add_argument('--compare-hf', action='store_true',
                      help='also run transformers + PEFT (torch) on the same rows and weights')
  parser.add_argument('--data', default='', help='instruction file (else synthetic rows)')
  parser.add_argument('--tokenizer', default='')
  parser.add_argument('--template', default='llama2')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--profile', default='', help='write a jax.profiler trace of two more '
                      'jaxsft steps under this folder (view in Perfetto or TensorBoard)')
  parser.add_argument('--out', default='', help='append one JSON line per result here')
  parser.add_argument('--worker', choices=('jax', 'hf'), help=argparse.SUPPRESS)
  parser.add_argument('--spec', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    with open(args.spec) as f:
      spec = json.load(f)
    print(json.dumps((worker_jax if args.worker == 'jax' else worker_hf)(spec)))
    return

  fields = hf_fields(args.model)
  num_rows = args.batch * (args.warmup + args.steps)
  with tempfile.TemporaryDirectory() as workdir:
    rows = (real_rows(args, num_rows) if args.data else
            synthetic_rows(num_rows, args.seq, fields['vocab_size'], args.seed))
    rows_path = os.path.join(workdir, 'rows.npz')
    np.savez(rows_path, **rows)
    supervised = float((rows['loss_mask'] > 0).sum() / max((rows['segment_ids'] > 0).sum(), 1))
    filled = float((rows['segment_ids'] > 0).mean())
    checkpoint = ''
    if args.compare_hf:
      checkpoint = os.path.join(workdir, 'hf_model')
      make_hf_checkpoint(fields, checkpoint, args.dtype, args.seed)
    base = dict(fields=fields, checkpoint=checkpoint, rows=rows_path, seq=args.seq,
                batch=args.batch, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                param_dtype=args.param_dtype, attention=args.attention, remat=args.remat,
                hf_mixed=args.hf_mixed, scan=not args.no_scan, loss_chunk=args.loss_chunk,
                lora_rank=args.lora_rank,
                profile=os.path.abspath(args.profile) if args.profile else '')
    print(f'model {args.model}: {args.batch} rows x {args.seq} tokens, {filled:.1%} filled, '
          f'{supervised:.1%} of tokens supervised, {args.dtype}; data '
          f'{args.data or "synthetic"}', flush=True)
    header = ('| method | side | tokens/s | step (s) | MFU | peak memory (GiB) | first loss |'
              '\n| --- | --- | ---: | ---: | ---: | ---: | ---: |')
    lines = [header]
    for method in args.methods.split(','):
      sides = ('jax', 'hf') if args.compare_hf else ('jax',)
      by_side = {}
      for side in sides:
        result = {'method': method, 'side': side, 'model': args.model, 'seq': args.seq,
                  'batch': args.batch, 'dtype': args.dtype, 'supervised_fraction': supervised,
                  **_run_worker(side, dict(base, method=method), workdir)}
        by_side[side] = result
        name = 'jaxsft' if side == 'jax' else 'transformers+PEFT'
        if 'error' in result:
          lines.append(f'| {method} | {name} | failed: {result["error"]} | | | | |')
          print(result.get('stderr_tail', ''), file=sys.stderr)
          continue
        result['mfu'] = _mfu(result)
        mfu = '-' if result['mfu'] is None else f'{100 * result["mfu"]:.1f}%'
        lines.append(f'| {method} | {name} | {result["tokens_per_s"]:,.0f} | '
                     f'{result["step_s"]:.3f} | {mfu} | '
                     f'{result["peak_memory_gib"]:.2f} ({result["memory_kind"]}) | '
                     f'{result["first_loss"]:.4f} |')
        print(lines[-1], flush=True)
      if all('tokens_per_s' in r for r in by_side.values()) and len(by_side) == 2:
        ratio = by_side['jax']['tokens_per_s'] / by_side['hf']['tokens_per_s']
        by_side['jax']['ratio_vs_hf'] = ratio
        print(f'{method}: jaxsft / transformers+PEFT tokens/s = {ratio:.2f}x', flush=True)
      if args.out:
        # Method by method: a run stopped at a time limit keeps the methods it finished.
        with open(args.out, 'a') as f:
          for result in by_side.values():
            f.write(json.dumps(result) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
  main()
