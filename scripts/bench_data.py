"""Data-path benchmark: jaxsft vs TRL `SFTTrainer` dataset preparation.

Both sides start from the same JSON file (an Alpaca file repeated to `--records` records), the
same tokenizer and the same chat template text (jaxsft's built-in `llama2`, set as the
tokenizer's `chat_template` for TRL), train on assistant tokens only, and pack with best-fit
decreasing into rows of `--max-seq-len` tokens. Each side gets a fresh `datasets` cache, so the
times are cold (tokenization included).

  jaxsft: load -> format conversion -> render + tokenize + loss mask (datasets.map) -> plan one
          epoch -> materialize every packed row as int32 arrays.
  TRL:    `SFTTrainer._prepare_dataset` (tokenize with `return_assistant_tokens_mask`, then its
          `bfd` packing) on the dataset already converted to `messages` (conversion not timed).

Packing efficiency = real tokens / (rows x max_seq_len).

The `clean` row (`--rows clean`): records/s, recall and precision of near-duplicate removal,
`jaxsft data clean` vs text-dedup's MinHash on the same records (`scripts/bench_clean.py`).

  python scripts/bench_data.py --data ../shared/data/instructions/alpaca_en_demo.json \
      --tokenizer ../shared/data/tokenizers/llama2 --records 50000 --max-seq-len 2048
  python scripts/bench_data.py --rows clean --data ../shared/data/instructions/alpaca_en_demo.json \
      --records 50000 --text-dedup-path /tmp/text_dedup_pkgs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import bench_clean  # scripts/ is on sys.path when this file runs


def _repeat_records(path: str, records: int, out_path: str) -> list[dict]:
  with open(path) as f:
    base = json.load(f)
  rows = [base[i % len(base)] for i in range(records)]
  with open(out_path, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return rows


def bench_jaxsft(data_path: str, tokenizer, args, cache_dir: str) -> dict:
  from jaxsft.config import default_config
  from jaxsft.data.pipeline import Pipeline
  config = default_config()
  config.data.datasets = [{'path': data_path}]
  config.data.template = 'llama2'
  config.data.max_seq_len = args.max_seq_len
  config.data.num_proc = args.num_proc
  config.data.cache_dir = cache_dir
  start = time.perf_counter()
  pipeline = Pipeline(config.data, tokenizer, batch_size=args.batch_size, process_index=0,
                      process_count=1)
  tokenized = time.perf_counter()
  refs, rows = pipeline._plan_window(0)  # pylint: disable=protected-access
  batches = pipeline.train_batches()
  real = 0
  for _ in range(-(-len(rows) // args.batch_size)):
    real += int((next(batches)['segment_ids'] > 0).sum())
  end = time.perf_counter()
  efficiency = sum(int(pipeline.sources[s].num_tokens[r]) - 1 for s, r in refs) / (
      len(rows) * args.max_seq_len)
  return {'seconds': end - start, 'tokenize_seconds': tokenized - start,
          'examples_per_s': len(refs) / (end - start), 'rows': len(rows),
          'packing_efficiency': efficiency}


def bench_trl(rows: list[dict], tokenizer, args, cache_dir: str) -> dict:
  import datasets
  import torch
  import transformers
  from trl import SFTConfig, SFTTrainer

  from jaxsft.data.builtin_templates import BUILTIN_TEMPLATES
  from jaxsft.data.formats import to_messages
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
  tokenizer.chat_template = BUILTIN_TEMPLATES['llama2'].strip()
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.unk_token
  datasets.config.HF_DATASETS_CACHE = cache_dir
  dataset = datasets.Dataset.from_list([{'messages': to_messages(r)} for r in rows])
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1))
  config = SFTConfig(output_dir=os.path.join(cache_dir, 'trl'), max_length=args.max_seq_len,
                     packing=True, packing_strategy='bfd', assistant_only_loss=True,
                     dataset_num_proc=args.num_proc if args.num_proc > 1 else None,
                     report_to=[], use_cpu=True)
  trainer = SFTTrainer(model=model, args=config, train_dataset=dataset.select(range(8)),
                       processing_class=tokenizer)
  start = time.perf_counter()
  packed = trainer._prepare_dataset(dataset, tokenizer, config, True, None, 'bench')  # pylint: disable=protected-access
  end = time.perf_counter()
  lengths = sum(sum(x) for x in packed['seq_lengths'])
  return {'seconds': end - start, 'examples_per_s': len(rows) / (end - start),
          'rows': len(packed), 'packing_efficiency': lengths / (len(packed) * args.max_seq_len)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', required=True, help='an Alpaca-format JSON file')
  parser.add_argument('--tokenizer', default='', help='a fast tokenizer folder (prepare row)')
  parser.add_argument('--records', type=int, default=50_000)
  parser.add_argument('--max-seq-len', type=int, default=2048)
  parser.add_argument('--num-proc', type=int, default=1)
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--skip-trl', action='store_true')
  parser.add_argument('--rows', default='prepare', help='prepare, clean or prepare,clean')
  bench_clean.add_arguments(parser)
  args = parser.parse_args()
  rows = set(args.rows.split(','))
  if 'clean' in rows:
    bench_clean.print_rows(bench_clean.run(args, [args.num_proc]), args)
  if 'prepare' not in rows:
    return
  if not args.tokenizer:
    parser.error('the prepare row needs --tokenizer')
  from jaxsft.data.tokenizer import load_tokenizer
  tokenizer = load_tokenizer(args.tokenizer)
  with tempfile.TemporaryDirectory() as scratch:
    data_path = os.path.join(scratch, 'records.jsonl')
    rows = _repeat_records(args.data, args.records, data_path)
    results = {'jaxsft': bench_jaxsft(data_path, tokenizer, args, os.path.join(scratch, 'j'))}
    if not args.skip_trl:
      results['trl'] = bench_trl(rows, tokenizer, args, os.path.join(scratch, 't'))
  print(f'{args.records} records, max_seq_len {args.max_seq_len}, num_proc {args.num_proc}')
  print(f'{"":8s} {"seconds":>8s} {"examples/s":>11s} {"rows":>7s} {"efficiency":>10s}')
  for name, r in results.items():
    print(f'{name:8s} {r["seconds"]:8.1f} {r["examples_per_s"]:11.0f} {r["rows"]:7d} '
          f'{r["packing_efficiency"]:10.4f}')
  if 'trl' in results:
    print(f'speedup {results["trl"]["seconds"] / results["jaxsft"]["seconds"]:.2f}x')
  print(json.dumps(results))


if __name__ == '__main__':
  main()
