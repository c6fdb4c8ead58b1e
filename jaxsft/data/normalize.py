"""Record text for comparisons: what a conversation says, its words, and hashes of word windows.

Duplicates and contamination are judged on *words*: the text lower-cased, with punctuation and
whitespace dropped (a run of letters and digits is a word; each CJK character is one, since CJK
text has no spaces). So "Hello,  World!" and "hello world" are the same two words.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

_CJK = '\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af'
_WORD = re.compile(rf'[{_CJK}]|[^\W{_CJK}]+')
_U64 = np.uint64


def words(text: str) -> list[str]:
  """Lower-cased words of `text`: runs of letters and digits, each CJK character on its own."""
  return _WORD.findall(text.lower())


def word_hashes(tokens: list[str]) -> list[int]:
  """A 32-bit hash per word (CRC-32: stable across processes and runs, unlike `hash`)."""
  return [zlib.crc32(w.encode()) for w in tokens]


def record_text(messages: list[Mapping[str, Any]]) -> str:
  """What a conversation says: the reasoning, content and tool calls of every message but the
  system prompt, which many datasets repeat in every record (it would make all their short
  records near duplicates of each other)."""
  parts = []
  for message in messages:
    if message.get('role') == 'system':
      continue
    for key in ('reasoning_content', 'content'):
      if isinstance(message.get(key), str) and message[key]:
        parts.append(message[key])
    if message.get('tool_calls'):
      parts.append(json.dumps(message['tool_calls'], sort_keys=True, ensure_ascii=False))
  return '\n'.join(parts)


def _mix64(values: np.ndarray) -> np.ndarray:
  """MurmurHash3's 64-bit finalizer: an avalanching bijection on uint64."""
  values = values ^ (values >> _U64(33))
  values = values * _U64(0xFF51AFD7ED558CCD)
  values = values ^ (values >> _U64(33))
  values = values * _U64(0xC4CEB9FE1A85EC53)
  return values ^ (values >> _U64(33))


def _multipliers(n: int) -> np.ndarray:
  """Odd 64-bit weights of the words of a window, fixed for all time (caches depend on them)."""
  return _mix64(np.arange(1, n + 1, dtype=_U64) * _U64(0x9E3779B97F4A7C15)) | _U64(1)


def hash_windows(hashes: np.ndarray, n: int) -> np.ndarray:
  """64-bit hashes of every window of `n` consecutive words (uint64 [len - n + 1], or empty):
  the word hashes weighted by position, summed and mixed. Equal word windows hash equally
  wherever they occur, in training records and in evaluation items alike."""
  hashes = np.asarray(hashes, _U64)
  count = len(hashes) - n + 1
  if count <= 0 or n <= 0:
    return np.zeros(0, _U64)
  total = np.zeros(count, _U64)
  for k, weight in enumerate(_multipliers(n)):
    total += hashes[k:k + count] * weight
  return _mix64(total)
