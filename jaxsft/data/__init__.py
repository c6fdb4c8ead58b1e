"""The data path: records -> messages -> ids + loss mask -> packed rows -> sharded batches.

Owns record formats (`formats`), chat templates and loss masks (`templates`), sources and
tokenization (`sources`, `tokenizer`), dataset entries (`spec`), packing (`packing`), the
resumable pipeline of a run (`pipeline`) and `jaxsft data inspect` (`inspect`). It knows no
model: it imports only `jaxsft.errors`, never models, adapters, interop, train, eval, the CLI or
the config defaults (a pipeline takes the run's `data` config section).

The names below are the public API the README shows; jaxsft's own modules import each name
from its home module.
"""

from jaxsft.data.formats import BadRecord, detect_format, to_messages
from jaxsft.data.packing import apply_length_policy, fit_length, pack, packing_efficiency
from jaxsft.data.pipeline import Pipeline
from jaxsft.data.templates import encode_batch, encode_messages, load_template
from jaxsft.data.tokenizer import load_tokenizer

__all__ = ['BadRecord', 'Pipeline', 'apply_length_policy', 'detect_format', 'encode_batch',
           'encode_messages', 'fit_length', 'load_template', 'load_tokenizer', 'pack',
           'packing_efficiency', 'to_messages']
