"""A GGUF export run by llama.cpp (`llama-cpp-python`) against transformers on the run's merged
export: the prompt's tokens, the logits at every prompt position and the greedy answer.

  jaxsft export --workdir RUN --format gguf --gguf-type f32 --out model.gguf
  python scripts/check_gguf.py --workdir RUN --gguf model.gguf [--prompt TEXT]

The merged export is written (float32) into a temporary folder next to nothing the run owns.
Prints one JSON line: the tokens' agreement, the largest |logit difference| and both greedy
answers; exits 1 when the tokens or the greedy answers differ or the logits differ by more
than `--tolerance` (1e-3: an f32 file; f16 / q8_0 files need a looser one). `llama-cpp-python`
is not a jaxsft dependency (`pip install llama-cpp-python` builds llama.cpp, a few minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='the jaxsft run the GGUF came from')
  parser.add_argument('--gguf', required=True)
  parser.add_argument('--prompt', default='Give three tips for staying healthy.')
  parser.add_argument('--max-new-tokens', type=int, default=16)
  parser.add_argument('--tolerance', type=float, default=1e-3)
  args = parser.parse_args()
  # pylint: disable=import-outside-toplevel
  import llama_cpp
  import torch
  import transformers

  with tempfile.TemporaryDirectory() as folder:
    merged = f'{folder}/merged'
    subprocess.run(['jaxsft', 'export', '--workdir', args.workdir, '--format', 'merged',
                    '--dtype', 'float32', '--out', merged], check=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    hf_tokens = tokenizer(args.prompt)['input_ids']
    with torch.no_grad():
      hf_logits = model(torch.tensor([hf_tokens])).logits[0].numpy()
      hf_answer = model.generate(torch.tensor([hf_tokens]), do_sample=False,
                                 max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id or 0)[0, len(hf_tokens):]
  llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=max(512, 2 * len(hf_tokens)),
                        logits_all=True, verbose=False, n_threads=2)
  add_bos = tokenizer.bos_token_id is not None and hf_tokens[:1] == [tokenizer.bos_token_id]
  cpp_tokens = llm.tokenize(args.prompt.encode('utf-8'), add_bos=add_bos, special=True)
  llm.eval(hf_tokens)
  cpp_logits = np.asarray(llm.scores[:len(hf_tokens)], np.float32)
  llm.reset()
  cpp_answer = []
  for token in llm.generate(hf_tokens, temp=0.0, top_k=1):
    if token == llm.token_eos() or len(cpp_answer) == args.max_new_tokens:
      break
    cpp_answer.append(int(token))
  hf_answer = [int(t) for t in hf_answer if t != tokenizer.eos_token_id][:len(cpp_answer) or None]
  difference = float(np.max(np.abs(cpp_logits - hf_logits)))
  report = {'gguf': args.gguf, 'prompt_tokens': len(hf_tokens),
            'tokens_equal': list(cpp_tokens) == list(hf_tokens),
            'max_abs_logit_difference': difference,
            'greedy_equal': cpp_answer == hf_answer,
            'llama_cpp_answer': llm.detokenize(cpp_answer).decode('utf-8', 'replace'),
            'transformers_answer': tokenizer.decode(hf_answer),
            'llama_cpp_python': llama_cpp.__version__}
  print(json.dumps(report))
  ok = report['tokens_equal'] and report['greedy_equal'] and difference <= args.tolerance
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
