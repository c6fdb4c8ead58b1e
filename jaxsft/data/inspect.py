"""`jaxsft data inspect`: what the model will be trained on, before any compute is spent.

Prints a few rendered examples with the supervised characters highlighted (exactly the tokens
whose loss mask is 1, located through the tokenizer's character offsets), the token-length
distribution of each source, what the length and bad-record policies did, and the packing of
one training epoch.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Any

import numpy as np

from jaxsft.data.formats import BadRecord, to_messages
from jaxsft.data.pipeline import Pipeline
from jaxsft.data.sources import load_source, source_format
from jaxsft.data.templates import render_example, template_kwargs

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
    if len(out) == count:
      break
    try:
      text, spans = render_example(to_messages(record, fmt, spec['columns']), pipeline.template,
                                   tokenizer, config.train_on)
    except BadRecord as error:
      out.append(f'--- record {index}: bad record: {escape_controls(str(error))}')
      continue
    if spans is None:  # plain text: every token
      spans = [(0, len(text))]
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), bool)
    for start, end in spans:
      mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    out.append(f'--- record {index} of {spec["path"]}: {len(encoding.ids)} tokens, '
               f'{int(mask.sum())} supervised\n{highlight(text, offsets, mask, color)}')
  return out


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
                 color: bool = False) -> str:
  """The report `jaxsft data inspect` prints (in-memory mode: every source is tokenized)."""
  if data_config.streaming:
    data_config = data_config.copy_and_resolve_references()
    data_config.streaming = False  # statistics need every example's length
  pipeline = Pipeline(data_config, tokenizer, batch_size=batch_size, process_index=0,
                      process_count=1)
  lines = [f'template {pipeline.template.name!r}, train_on {data_config.train_on!r}, max_seq_len '
           f'{data_config.max_seq_len}, special tokens {template_kwargs(tokenizer)}', '']
  lines += _rendered_examples(pipeline, num_examples, color)
  lines += ['', 'records:']
  lines += [f'  {label}: {stats.summary()}' for label, stats in pipeline.stats.items()]
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
  return '\n'.join(lines)
