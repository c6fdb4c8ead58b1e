"""A model to evaluate or talk to: a run's newest checkpoint (LoRA and 4-bit variables applied
as trained, not merged) or a plain HF checkpoint, with its tokenizer and chat template, and
`answer`, its next assistant turn for conversations (KV-cache decoding, `eval.generate`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxsft.data.templates import load_template, render
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.eval.generate import SamplingConfig, generate
from jaxsft.interop import hf
from jaxsft.train.loss import DEFAULT_CHUNK_SIZE
from jaxsft.train.run import load_run

STOP_TOKENS = ('<|im_end|>', '<|eot_id|>', '<|end|>', '</s>')


@dataclasses.dataclass
class Model:
  """What evaluation and generation need: the architecture (applying any adapters in
  `variables`), the variables, the tokenizer and the chat template's name (`data.template`);
  `data` is the run's data section (how `eval.metrics.likelihood` renders and packs records;
  None where only answers are generated), `loss_chunk_size` the fused loss's chunk."""

  model_config: Any
  variables: Any
  tokenizer: Any
  template: str
  data: Any = None
  loss_chunk_size: int = DEFAULT_CHUNK_SIZE
  # Prompt + answer tokens at most (`--max-seq-len`); None: the model's positions. Either way
  # `generate` refuses a prompt with no room left and shortens answers to what fits.
  max_context: int | None = None


def from_workdir(workdir: str) -> Model:
  """The newest good checkpoint of a `jaxsft train` work directory."""
  settings, model_config, folder, state, _ = load_run(workdir)
  data = settings.data
  tokenizer = load_tokenizer(data.tokenizer or folder or '')
  return Model(model_config, state.variables(), tokenizer, data.template, data,
               settings.step.loss_chunk_size)


def from_hf(path: str, data: Any, dtype: str = 'float32') -> Model:
  """The plain HF checkpoint at `path` (no work directory), read in `dtype`; `data` is a data
  section (template, max_seq_len) that applies."""
  model_config, params = hf.load_checkpoint(path, dtype=dtype, config_overrides={
      'dtype': dtype, 'attention_implementation': 'xla'})
  return Model(model_config, {'params': params}, load_tokenizer(path), data.template, data)


def prompt_ids(model: Model, messages: list[dict[str, str]]) -> list[int]:
  """The rendered prompt (with the assistant header) as token ids."""
  template = load_template(model.template, model.tokenizer)
  text, _ = render(messages, template, model.tokenizer, add_generation_prompt=True, spans=False)
  return model.tokenizer(text, add_special_tokens=False)['input_ids']


def stop_ids(model: Model) -> list[int]:
  """EOS and the end-of-turn tokens of the common chat formats that the tokenizer knows."""
  tokenizer = model.tokenizer
  ids = {tokenizer.eos_token_id}
  for token in STOP_TOKENS:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is not None and token_id != tokenizer.unk_token_id:
      ids.add(token_id)
  return sorted(i for i in ids if i is not None)


def answer(model: Model, conversations: list[list[dict[str, str]]],
           sampling: SamplingConfig | None = None, seed: int = 0) -> list[str]:
  """The model's next assistant turn for each conversation (greedy by default). A rendered
  conversation with no room for an answer in the model's context raises
  `eval.generate.PromptTooLong` (its `index` is the conversation's)."""
  sampling = sampling or SamplingConfig()
  prompts = [prompt_ids(model, messages) for messages in conversations]
  outputs = generate(model.model_config, model.variables, prompts, sampling,
                     stop_ids=stop_ids(model), seed=seed, max_length=model.max_context)
  return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
