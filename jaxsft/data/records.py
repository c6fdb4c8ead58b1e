"""Records of one source -> conversations, with the bad-record policy applied.

The error for a bad record names its source (file or dataset), its index and the problem, so it
can be found and fixed; `on_bad_record='skip'` drops it instead and counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from jaxsft.data.formats import BadRecord, Message, to_messages

_LOG = logging.getLogger(__name__)
BAD_RECORD_POLICIES = ('error', 'skip')


def convert_records(records: Iterable[Any], *, source: str, format: str = 'auto',  # pylint: disable=redefined-builtin
                    columns: Mapping[str, str] | None = None, on_bad_record: str = 'error',
                    first_index: int = 0) -> tuple[list[list[Message] | None], int]:
  """Returns `(conversations, skipped)`; a skipped record leaves None at its place so indices
  stay aligned with the source."""
  if on_bad_record not in BAD_RECORD_POLICIES:
    raise ValueError(f'on_bad_record={on_bad_record!r}; choose one of {BAD_RECORD_POLICIES}.')
  conversations, skipped = [], 0
  for index, record in enumerate(records, start=first_index):
    try:
      conversations.append(to_messages(record, format, columns))
    except BadRecord as error:
      if on_bad_record == 'error':
        raise BadRecord(f'{source}, record {index}: {error} (set on_bad_record="skip" to skip '
                        'such records and count them)') from None
      skipped += 1
      conversations.append(None)
  if skipped:
    _LOG.warning('%s: skipped %d bad records (on_bad_record="skip").', source, skipped)
  return conversations, skipped
