"""The data path: records -> messages -> ids + loss mask -> packed rows."""

from jaxsft.data.formats import BadRecord, detect_format, to_messages
from jaxsft.data.packing import apply_length_policy, fit_length, pack, packing_efficiency
from jaxsft.data.templates import encode_batch, encode_messages, load_template

__all__ = ['BadRecord', 'apply_length_policy', 'detect_format', 'encode_batch',
           'encode_messages', 'fit_length', 'load_template', 'pack', 'packing_efficiency',
           'to_messages']
