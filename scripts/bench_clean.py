"""Near-duplicate removal benchmark: `jaxsft data clean` vs text-dedup's MinHash (the `clean` row
of `scripts/bench_data.py`).

The records: an Alpaca file, exact duplicates removed, grown to `--records` records with
*background* variants (each word replaced, with probability 0.3, by a random word of the file's
vocabulary: the lengths and vocabulary of Alpaca, but no two variants near each other: their
shared word pairs give a Jaccard similarity of about 0.15), then `--planted` near-duplicate
copies of background records inserted at random places after their originals: a sixth each with
the case changed, the whitespace changed, the punctuation removed, one word replaced, one word
inserted, one word deleted (word edits only on records of 20 words or more). Recall: the share
of planted pairs of which a tool removed one record; precision: those removals over all its
removals.

Both tools get the same text per record (the conversation text jaxsft compares: instruction,
input and output joined by newlines; text-dedup reads it from a `text` column, jaxsft reads the
Alpaca records), the same threshold, shingle size and number of permutations. Each is timed
around the call that reads the JSONL file, deduplicates and writes the result, imports excluded:
jaxsft's `clean_files` (exact and near duplicates, degenerate records; no evaluation data) and
text-dedup's `minhash.main` (its fast `xxh3` hash; `--min_length 0` so every record takes part).
text-dedup runs in a subprocess with `--text-dedup-path` on `sys.path` (it is installed apart:
`pip install --no-deps --target DIR text-dedup click-option-group`, since it pins versions of
click, rich and urllib3 older than the venv's).

  python scripts/bench_clean.py --data ../shared/data/instructions/alpaca_en_demo.json \
      --records 50000 --text-dedup-path /tmp/text_dedup_pkgs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

_WORD = re.compile(r'\w+')
_TEXT_DEDUP = r'''
import json, sys, time
from text_dedup import minhash
spec = json.loads(sys.argv[1])
start = time.perf_counter()
minhash.main.main(spec['argv'], standalone_mode=False)
seconds = time.perf_counter() - start
print(json.dumps({'seconds': seconds,
                  'removed': [i for i in range(spec['records']) if minhash.uf.find(i) != i]}))
'''


def _variant(record: dict, vocab: list[str], rng: random.Random, rate: float) -> dict:
  """`record` with `rate` of its words (at least one) replaced by random words."""
  fields = list(record)
  spots = [(k, m.span()) for k in fields for m in _WORD.finditer(record[k])]
  chosen = set(rng.sample(range(len(spots)), max(1, round(rate * len(spots))))) if spots else ()
  out = dict(record)
  for i in sorted(chosen, reverse=True):  # right to left: earlier spans stay valid
    key, (start, end) = spots[i]
    out[key] = out[key][:start] + rng.choice(vocab) + out[key][end:]
  return out


def _near_copy(record: dict, kind: str, vocab: list[str], rng: random.Random) -> dict:
  record = dict(record)
  if kind == 'case':
    record['instruction'] = record['instruction'].upper()
    record['output'] = record['output'].lower()
  elif kind == 'whitespace':
    record['output'] = re.sub(r' ', lambda m: '  ' if rng.random() < 0.3 else ' ',
                              record['output']) + '\n'
  elif kind == 'punctuation':
    record = {k: re.sub(r'[.,;:!?]', '', v) for k, v in record.items()}
  else:
    field = 'output' if len(record['output'].split()) >= 10 else 'instruction'
    tokens = record[field].split(' ')
    at = rng.randrange(len(tokens))
    if kind == 'replace':
      tokens[at] = rng.choice(vocab)
    elif kind == 'insert':
      tokens.insert(at, rng.choice(vocab))
    else:
      del tokens[at]
    record[field] = ' '.join(tokens)
  return record


def make_records(path: str, records: int, planted: int, seed: int = 0
                 ) -> tuple[list[dict], list[tuple[int, int]]]:
  """(records, planted pairs (original, copy) as indices into them)."""
  with open(path) as f:
    base, seen = [], set()
    for r in json.load(f):
      key = ' '.join(_WORD.findall(' '.join(r.values()).lower()))
      if key not in seen:
        seen.add(key)
        base.append({k: r[k] for k in ('instruction', 'input', 'output')})
  rng = random.Random(seed)
  vocab = sorted({w for r in base for v in r.values() for w in _WORD.findall(v)})
  background = base[:records - planted]
  while len(background) < records - planted:
    candidate = _variant(base[len(background) % len(base)], vocab, rng, 0.3)
    key = ' '.join(_WORD.findall(' '.join(candidate.values()).lower()))
    if key not in seen:
      seen.add(key)
      background.append(candidate)
  kinds = ('case', 'whitespace', 'punctuation', 'replace', 'insert', 'delete')
  long_enough = [i for i, r in enumerate(background)
                 if len(_WORD.findall(' '.join(r.values()))) >= 20]
  originals = rng.sample(long_enough, planted)
  keyed = [(float(i), i, r) for i, r in enumerate(background)]
  for n, original in enumerate(originals):
    copy = _near_copy(background[original], kinds[n % len(kinds)], vocab, rng)
    keyed.append((rng.uniform(original + 0.5, len(background)), -1 - n, copy))
  keyed.sort(key=lambda x: x[0])
  position = {tag: i for i, (_, tag, _) in enumerate(keyed)}
  pairs = [(position[o], position[-1 - n]) for n, o in enumerate(originals)]
  return [r for _, _, r in keyed], pairs


def score(removed: set[int], pairs: list[tuple[int, int]]) -> dict:
  found = sum(1 for o, c in pairs if o in removed or c in removed)
  return {'removed': len(removed), 'recall': found / len(pairs),
          'precision': found / max(len(removed), 1)}


def bench_jaxsft(path: str, args, num_proc: int, scratch: str) -> dict:
  import datasketch  # noqa: F401  (imported before timing, as text-dedup's imports are)

  from jaxsft.config import default_config
  from jaxsft.data.clean import CleanSettings
  from jaxsft.data.clean_io import REMOVED_FILE, clean_files
  from jaxsft.data.spec import dataset_spec
  clean = default_config().data.clean
  clean.near_threshold, clean.shingle_words = args.threshold, args.ngram
  clean.num_perm = args.num_perm
  settings = CleanSettings.from_config(clean)
  out = os.path.join(scratch, f'jaxsft-{num_proc}')
  start = time.perf_counter()
  clean_files([dataset_spec({'path': path}, 'bench')], settings, out, num_proc=num_proc)
  seconds = time.perf_counter() - start
  with open(os.path.join(out, REMOVED_FILE)) as f:
    removed = {json.loads(line)['index'] for line in f}
  return {'seconds': seconds, 'removed_set': removed}


def bench_text_dedup(path: str, args, num_proc: int, ngram: int, scratch: str,
                     records: int) -> dict:
  argv = ['--path', 'json', '--data_files', path, '--split', 'train', '--cache_dir',
          os.path.join(scratch, f'td-cache-{ngram}-{num_proc}'), '--output',
          os.path.join(scratch, f'td-out-{ngram}-{num_proc}'), '--column', 'text',
          '--threshold', str(args.threshold), '--ngram', str(ngram), '--num_perm',
          str(args.num_perm), '--min_length', '0', '--hash_func', 'xxh3', '--num_proc',
          str(num_proc)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [args.text_dedup_path, os.environ.get('PYTHONPATH', '')]),
             HF_DATASETS_DISABLE_PROGRESS_BARS='1')
  result = subprocess.run([sys.executable, '-c', _TEXT_DEDUP,
                           json.dumps({'argv': argv, 'records': records})],
                          capture_output=True, text=True, env=env, check=False)
  if result.returncode:
    raise RuntimeError(f'text-dedup failed:\n{result.stderr[-3000:]}')
  out = json.loads(result.stdout.strip().splitlines()[-1])
  return {'seconds': out['seconds'], 'removed_set': set(out['removed'])}


def run(args, num_procs: list[int]) -> list[dict]:
  from jaxsft.data.formats import to_messages
  from jaxsft.data.normalize import record_text
  records, pairs = make_records(args.data, args.records, args.planted)
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    ours = os.path.join(scratch, 'records.jsonl')
    theirs = os.path.join(scratch, 'texts.jsonl')
    with open(ours, 'w') as f, open(theirs, 'w') as g:
      for r in records:
        f.write(json.dumps(r) + '\n')
        g.write(json.dumps({'text': record_text(to_messages(r, 'alpaca'))}) + '\n')
    for num_proc in num_procs:
      rows.append({'side': 'jaxsft', 'num_proc': num_proc, 'ngram': args.ngram,
                   **bench_jaxsft(ours, args, num_proc, scratch)})
      if args.text_dedup_path:
        for ngram in sorted({args.ngram, 5}):
          rows.append({'side': 'text-dedup', 'num_proc': num_proc, 'ngram': ngram,
                       **bench_text_dedup(theirs, args, num_proc, ngram, scratch,
                                          len(records))})
  for row in rows:
    row.update(score(row.pop('removed_set'), pairs))
    row['records_per_s'] = len(records) / row['seconds']
  return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--planted', type=int, default=5000, help='near-duplicate copies')
  parser.add_argument('--threshold', type=float, default=0.7)
  parser.add_argument('--ngram', type=int, default=2, help='words per shingle (both tools)')
  parser.add_argument('--num-perm', type=int, default=128)
  parser.add_argument('--text-dedup-path', default='',
                      help='a folder holding text_dedup (pip install --target); empty: skip it')


def print_rows(rows: list[dict], args) -> None:
  print(f'near-dedup of {args.records} records ({args.planted} planted near duplicates), '
        f'threshold {args.threshold}, {args.num_perm} permutations')
  print(f'{"side":11s} {"procs":>5s} {"ngram":>5s} {"seconds":>8s} {"records/s":>10s} '
        f'{"removed":>8s} {"recall":>7s} {"precision":>9s}')
  for r in rows:
    print(f'{r["side"]:11s} {r["num_proc"]:5d} {r["ngram"]:5d} {r["seconds"]:8.1f} '
          f'{r["records_per_s"]:10.0f} {r["removed"]:8d} {r["recall"]:7.4f} '
          f'{r["precision"]:9.4f}')
  print(json.dumps(rows))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', required=True, help='an Alpaca-format JSON file')
  parser.add_argument('--records', type=int, default=50_000)
  parser.add_argument('--num-proc', type=int, nargs='+', default=[1])
  add_arguments(parser)
  args = parser.parse_args()
  print_rows(run(args, args.num_proc), args)


if __name__ == '__main__':
  main()
