"""`jaxsft data inspect`: what the model will be trained on, before any compute is spent.

Prints a few rendered examples with the supervised characters highlighted (exactly the tokens
whose loss mask is 1, located through the tokenizer's character offsets), the token-length
distribution of each source, what the length and bad-record policies and per-turn loss control
did, and the packing of one training epoch. `--dump FILE.jsonl` writes every example's token ids
and loss mask, as the trainer reads them before packing.
"""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Any

import numpy as np

from jaxsft.data.clean_io import clean_report
from jaxsft.data.formats import to_messages, to_tools
from jaxsft.data.messages import BadRecord
from jaxsft.data.pipeline import Pipeline
from jaxsft.data.samples import render_samples
from jaxsft.data.sources import load_source, source_format
from jaxsft.data.templates import template_kwargs

_GREEN, _DIM, _RESET = '\x1b[32m', '\x1b[2m', '\x1b[0m'
_OPEN, _CLOSE = '⟦', '⟧'  # supervised text markers without color


def escape_controls(text: str) -> str:
  """Control characters other than newline and tab as visible escapes (`\\x1b`, `\\r`):
  data must not drive the terminal (colors, cursor moves, overwritten lines) or hide text."""
  return ''.join(c if c in '\n\t' or unicodedata.category(c) not in ('Cc', 'Cf')
                 else repr(c)[1:-1] for c in text)


def highlight(text: str, offsets: np.ndarray, mask: np.ndarray, color: bool) -> str:
  """`text` with the characters of supervised tokens (mask 1) marked, colored or bracketed;
  control characters of the text escaped."""
  supervised = np.zeros(len(text) + 1, bool)
  for (start, end), on in zip(offsets, mask):
    if on:
      supervised[start:end] = True
  pieces, start = [], 0
  for position in range(1, len(text) + 1):
    if position == len(text) or supervised[position] != supervised[start]:
      chunk = escape_controls(text[start:position])
      if supervised[start]:
        pieces.append(f'{_GREEN}{chunk}{_RESET}' if color else f'{_OPEN}{chunk}{_CLOSE}')
      else:
        pieces.append(f'{_DIM}{chunk}{_RESET}' if color else chunk)
      start = position
  return ''.join(pieces)


def _rendered_examples(pipeline: Pipeline, count: int, color: bool) -> list[str]:
  config, tokenizer = pipeline.config, pipeline.tokenizer
  spec = pipeline.specs[0]
  raw = load_source(spec, streaming=True, cache_dir=config.cache_dir)
  fmt = source_format(raw, spec, spec['path'])
  out = []
  for index, record in enumerate(raw):
    if len(out) >= count:
      break
    try:
      samples = render_samples(
          [to_messages(record, fmt, spec['columns'])], pipeline.template, tokenizer,
          config.train_on, tools=[to_tools(record, fmt, spec['columns'])],
          train_on_reasoning=config.train_on_reasoning)[0]
      if isinstance(samples, BadRecord):
        raise samples
    except BadRecord as error:
      out.append(f'--- record {index}: bad record: {escape_controls(str(error))}')
      continue
    for k, sample in enumerate(samples):
      text = sample.text
      spans = [(0, len(text))] if sample.spans is None else sample.spans  # plain text: all
      encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
      offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
      mask = np.zeros(len(offsets), bool)
      for start, end in spans:
        mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
      part = (f', sample {k + 1} of {len(samples)} (one per assistant turn)'
              if len(samples) > 1 else '')
      out.append(f'--- record {index}{part} of {spec["path"]}: {len(encoding.ids)} tokens, '
                 f'{int(mask.sum())} supervised\n{highlight(text, offsets, mask, color)}')
  return out


# A row's status by its code (`sources.KEPT` ...).
_STATUS = ('kept', 'truncated', 'dropped_overlong', 'dropped_unsupervised', 'bad_record')


def dump_examples(pipeline: Pipeline, path: str) -> int:
  """Writes every example of every source as a JSON line, in record order and before packing:
  `source` (the dataset's path), `index` (the record's index in it), `sample` (0, or k for the
  k-th extra sample of a record trained once per assistant turn), `split` (train or eval),
  `status` (kept, truncated, dropped_overlong, dropped_unsupervised, bad_record), `input_ids`
  and `loss_mask` (empty for a dropped record; truncated as trained). Returns the line count."""
  written, done = 0, set()
  with open(path, 'w', encoding='utf-8') as f:
    for source in [*pipeline.sources, *pipeline.eval_sources]:
      if id(source.table) in done:  # a training source's held-out rows: the same table
        continue
      done.add(id(source.table))
      held_out = set(source.eval_rows.tolist())
      eval_source = all(source is not s for s in pipeline.sources)
      position = 0  # the row's index in the tokenized table
      for batch in source.table.data.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
          split = 'eval' if eval_source or position in held_out else 'train'
          position += 1
          f.write(json.dumps({
              'source': source.spec['path'], 'index': row['index'], 'sample': row['sample'],
              'split': split, 'status': _STATUS[row['status']], 'input_ids': row['input_ids'],
              'loss_mask': row['loss_mask']}) + '\n')
          written += 1
  return written


def _length_table(pipeline: Pipeline) -> list[str]:
  lines = [f'{"source":40s} {"examples":>8s} {"min":>6s} {"mean":>7s} {"p50":>6s} {"p90":>6s} '
           f'{"p99":>6s} {"max":>6s}']
  name = lambda source: os.path.basename(source.spec['path'].rstrip('/'))  # noqa: E731
  rows = [(f'train {name(source)}', source.train_rows, source) for source in pipeline.sources]
  rows += [(f'eval {name(source)}', source.eval_rows, source) for source in pipeline.eval_sources]
  for label, table_rows, source in rows:
    lengths = source.num_tokens[table_rows]
    if not len(lengths):
      continue
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    lines.append(f'{label[:40]:40s} {len(lengths):8d} {lengths.min():6d} '
                 f'{lengths.mean():7.1f} {p50:6.0f} {p90:6.0f} {p99:6.0f} {lengths.max():6d}')
  all_lengths = np.concatenate([s.num_tokens[s.train_rows] for s in pipeline.sources])
  # Lengths are 2 .. max_seq_len + 1 tokens; numpy's last bin is closed on the right.
  edges = [0] + [2 ** k for k in range(4, 32) if 2 ** k <= pipeline.seq_len] + [
      pipeline.seq_len + 1]
  counts, _ = np.histogram(all_lengths, bins=edges)
  widest = max(int(counts.max()), 1)
  lines.append('training example lengths (tokens):')
  for i, count in enumerate(counts):
    high = edges[i + 1] if i + 1 == len(counts) else edges[i + 1] - 1
    bar = '#' * int(round(40 * count / widest))
    lines.append(f'  {edges[i]:>6d}-{high:<6d} {count:8d} {bar}')
  return lines


def inspect_data(data_config: Any, tokenizer: Any, *, batch_size: int, num_examples: int = 3,
                 color: bool = False, dump: str = '') -> str:
  """The report `jaxsft data inspect` prints (in-memory mode: every source is tokenized);
  `dump`: a .jsonl file for `dump_examples`."""
  streaming = data_config.streaming
  if streaming:
    data_config = data_config.copy_and_resolve_references()
    data_config.streaming = False  # statistics need every example's length
  pipeline = Pipeline(data_config, tokenizer, batch_size=batch_size, process_index=0,
                      process_count=1)
  lines = [f'template {pipeline.template.name!r}, train_on {data_config.train_on!r}'
           f'{"" if data_config.train_on_reasoning else " (think blocks unsupervised)"}, '
           f'max_seq_len {data_config.max_seq_len}, special tokens {template_kwargs(tokenizer)}',
           '']
  lines += _rendered_examples(pipeline, num_examples, color)
  # A streaming run cannot count ahead (it logs counts as read); here every record was read.
  lines += ['', 'records (data.streaming=True: counted here by reading every source once; a '
            'training run reads its streams as it trains):' if streaming else 'records:']
  lines += [f'  {label}: {stats.summary()}' for label, stats in pipeline.stats.items()]
  lines += clean_report(pipeline)  # data.clean, or the summary of `jaxsft data clean`
  lines += [''] + _length_table(pipeline)
  refs, rows = pipeline._plan_window(0)  # pylint: disable=protected-access
  real = sum(int(pipeline.sources[s].num_tokens[r]) - 1 for s, r in refs)
  weights = ', '.join(f'{s.label}: {count}' for s, count in
                      zip(pipeline.sources, pipeline.window_counts))
  lines += ['', f'packing ({data_config.packing}) of one epoch: {len(refs)} examples '
            f'({weights}) -> {len(rows)} rows of {pipeline.seq_len}, '
            f'{len(refs) / max(len(rows), 1):.2f} examples/row, efficiency '
            f'{real / max(len(rows) * pipeline.seq_len, 1):.4f}, '
            f'{-(-len(rows) // batch_size)} batches of {batch_size} rows']
  eval_examples = sum(len(s.eval_rows) for s in pipeline.eval_sources)
  if eval_examples:
    lines.append(f'eval: {eval_examples} examples')
  if dump:
    lines.append(f'wrote {dump_examples(pipeline, dump)} examples (input_ids and loss_mask of '
                 f'each record, before packing) to {dump}')
  return '\n'.join(lines)
