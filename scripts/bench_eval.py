"""Multiple-choice scoring speed: jaxsft's lm-eval backend vs lm-eval's own `hf` backend.

Both run `lm_eval.simple_evaluate` on the same local multiple-choice task (questions and answer
choices from a real instruction file, `--docs` x `--choices` loglikelihood requests) and the same
random HF checkpoint, each side in its own process. Each evaluates twice; the second run is
timed (jaxsft's first run compiles), and requests/s counts loglikelihood requests. The
per-request log-likelihoods of the two sides are compared too.

  python scripts/bench_eval.py --model cpu-512 --tokenizer ../shared/data/tokenizers/llama2 \
      --data ../shared/data/instructions/alpaca_en_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

# The CPU comparison model of scripts/bench_train.py: LLaMA-2 vocabulary, hidden 512, 8 layers.
CPU_512 = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model')


def make_task(folder: str, data: str, docs: int, choices: int, answer_words: int,
              seed: int = 0) -> None:
  """A multiple-choice task over real text, shaped like ARC or HellaSwag: each instruction
  (its first 60 words) with its own output among `choices - 1` outputs of other records (their
  first `answer_words` words)."""
  with open(data) as f:
    records = json.load(f)
  rng = random.Random(seed)
  rng.shuffle(records)
  short = lambda text, words=answer_words: ' '.join(text.split()[:words])  # noqa: E731
  rows = []
  for record in records[:docs + 50]:  # the last 50: few-shot examples
    others = rng.sample(records, choices - 1)
    options = [short(record['output'])] + [short(o['output']) for o in others]
    rng.shuffle(options)
    rows.append({'question': short(record['instruction'] + ' ' + record.get('input', ''), 60),
                 'choices': options, 'answer': options.index(short(record['output']))})
  with open(os.path.join(folder, 'mc.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows[:docs])
  with open(os.path.join(folder, 'shots.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows[docs:])
  with open(os.path.join(folder, 'bench_mc.yaml'), 'w') as f:
    f.write(f'''task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/mc.jsonl
    train: {folder}/shots.jsonl
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
''')


def make_model(folder: str, model: str, tokenizer: str) -> str:
  if model != 'cpu-512':
    return model
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**CPU_512, tie_word_embeddings=False)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(tokenizer, name)):
      shutil.copy(os.path.join(tokenizer, name), folder)
  return folder


def worker(side: str, spec: dict) -> dict:
  import lm_eval
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=spec['tasks'])
  if side == 'hf':
    import torch
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=spec['model'], dtype=spec['dtype'], device='cpu',
              batch_size=spec['batch_size'], max_length=spec['max_length'])
    threads = torch.get_num_threads()
  else:
    from jaxsft.config import default_config
    from jaxsft.eval.harness import JaxsftLM
    from jaxsft.eval.model import from_hf
    lm = JaxsftLM(from_hf(spec['model'], default_config().data, dtype=spec['dtype']),
                  batch_size=spec['batch_size'],
                  max_length=spec['max_length'])
    threads = os.cpu_count()
  times, results = [], None
  for _ in range(2):
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=['bench_mc'], task_manager=manager,
                                      num_fewshot=spec['num_fewshot'], log_samples=True)
    times.append(time.perf_counter() - start)
  samples = sorted(results['samples']['bench_mc'], key=lambda s: s['doc_id'])
  logprobs = [float(r[0][0]) for s in samples for r in s['resps']]
  return {'side': side, 'first_seconds': times[0], 'seconds': times[1],
          'requests': len(logprobs), 'acc': results['results']['bench_mc']['acc,none'],
          'logprobs': logprobs, 'threads': threads}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='cpu-512', help='cpu-512 or an HF checkpoint folder')
  parser.add_argument('--tokenizer', default='../shared/data/tokenizers/llama2')
  parser.add_argument('--data', default='../shared/data/instructions/alpaca_en_demo.json')
  parser.add_argument('--docs', type=int, default=200)
  parser.add_argument('--choices', type=int, default=4)
  parser.add_argument('--answer-words', type=int, default=8)
  parser.add_argument('--num-fewshot', type=int, default=0,
                      help='examples before each question (MMLU: 5, ARC-challenge: 25)')
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--max-length', type=int, default=1024)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--worker', choices=('hf', 'jaxsft'), help=argparse.SUPPRESS)
  parser.add_argument('--spec', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    with open(args.spec) as f:
      print('RESULT ' + json.dumps(worker(args.worker, json.load(f))))
    return
  scratch = tempfile.mkdtemp(prefix='bench-eval-')
  try:
    model = make_model(os.path.join(scratch, 'model'), args.model, args.tokenizer)
    make_task(scratch, args.data, args.docs, args.choices, args.answer_words)
    spec = {'model': model, 'tasks': scratch, 'dtype': args.dtype,
            'batch_size': args.batch_size, 'max_length': args.max_length,
            'num_fewshot': args.num_fewshot}
    with open(os.path.join(scratch, 'spec.json'), 'w') as f:
      json.dump(spec, f)
    results = {}
    for side in ('jaxsft', 'hf'):
      out = subprocess.run([sys.executable, __file__, '--worker', side, '--spec',
                            os.path.join(scratch, 'spec.json')], capture_output=True, text=True,
                           check=False)
      line = next((x for x in out.stdout.splitlines() if x.startswith('RESULT ')), None)
      if line is None:
        raise SystemExit(f'{side} failed:\n{out.stderr[-3000:]}')
      results[side] = json.loads(line[len('RESULT '):])
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  diff = max(abs(a - b) for a, b in zip(results['jaxsft']['logprobs'], results['hf']['logprobs']))
  print('| backend | requests | first run (s) | timed run (s) | requests/s | acc |')
  print('| --- | ---: | ---: | ---: | ---: | ---: |')
  for side in ('jaxsft', 'hf'):
    r = results[side]
    print(f'| {side} | {r["requests"]} | {r["first_seconds"]:.2f} | {r["seconds"]:.2f} | '
          f'{r["requests"] / r["seconds"]:.1f} | {r["acc"]:.4f} |')
  speedup = results['hf']['seconds'] / results['jaxsft']['seconds']
  print(f'speedup {speedup:.2f}x; max |log-likelihood difference| {diff:.2e}')


if __name__ == '__main__':
  main()
