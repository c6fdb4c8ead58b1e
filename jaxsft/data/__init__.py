"""The data path: records -> messages -> ids + loss mask -> packed rows -> sharded batches.

Owns record formats (`formats` reads records, `messages` one message with its tool calls and
reasoning), chat templates and loss masks (`chat_template` renders, `prefixes` locates turns
without markers, `templates` masks, `samples` splits a conversation into one sample per assistant
turn where needed), sources and tokenization (`sources`, `tokenizer`), dataset entries (`spec`,
LLaMA-Factory's `dataset_info`), packing (`packing`), the resumable pipeline of a run
(`pipeline`), `jaxsft data inspect` (`inspect`) and `jaxsft data clean` (`clean`, `clean_io`,
`normalize`, `minhash`, `contamination`). It knows no
model: it imports only `jaxsft.errors`, never models, adapters, interop, train, eval, the CLI or
the config defaults (a pipeline takes the run's `data` config section).

The names below are the public API the README shows; jaxsft's own modules import each name
from its home module. All but `Pipeline` are light (numpy, jinja): `pack` or `encode_messages`
must not pay for `datasets`, which brings pyarrow and pandas (about 1 s), so `Pipeline` is
imported on first access (PEP 562 `__getattr__`), as is transformers in the one function that
renders a template and in `load_tokenizer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxsft.data.formats import detect_format, to_messages, to_tools
from jaxsft.data.messages import BadRecord
from jaxsft.data.packing import apply_length_policy, fit_length, pack, packing_efficiency, pad_rows
from jaxsft.data.samples import encode_samples
from jaxsft.data.templates import encode_batch, encode_messages, load_template
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and the import graph; at run time see `__getattr__`
  from jaxsft.data.pipeline import Pipeline

__all__ = ['BadRecord', 'Pipeline', 'apply_length_policy', 'detect_format', 'encode_batch',
           'encode_messages', 'encode_samples', 'fit_length', 'load_template', 'load_tokenizer',
           'pack', 'packing_efficiency', 'pad_rows', 'to_messages', 'to_tools']

# Public name -> home module of the names imported on first access.
__getattr__, __dir__ = lazy_exports(__name__, {'Pipeline': 'jaxsft.data.pipeline'})
