"""The data path: records -> messages -> ids + loss mask -> packed rows -> sharded batches."""

from jaxsft.data.formats import BadRecord, detect_format, to_messages
from jaxsft.data.packing import apply_length_policy, fit_length, pack, packing_efficiency
from jaxsft.data.pipeline import Pipeline, load_tokenizer
from jaxsft.data.templates import encode_batch, encode_messages, load_template

__all__ = ['BadRecord', 'Pipeline', 'apply_length_policy', 'detect_format', 'encode_batch',
           'encode_messages', 'fit_length', 'load_template', 'load_tokenizer', 'pack',
           'packing_efficiency', 'to_messages']
