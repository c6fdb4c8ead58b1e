"""`jaxsft data clean` and `data.clean`: exact and near duplicates, evaluation data, empty and
degenerate answers; the kept records in the input's own format; the same decisions with any
number of worker processes and on the fly in a run's pipeline."""

import json
import random
import re

import numpy as np
import pytest
from user_path import REPO, run

from jaxsft.config import default_config
from jaxsft.data import clean, clean_io, contamination, minhash, normalize
from jaxsft.data.clean import CleanSettings
from jaxsft.data.spec import dataset_spec
from jaxsft.errors import UserError

from conftest import SHARED_DATA, llama2_tokenizer

CONFIG = str(REPO / 'configs' / 'alpaca_llama2_data.py')
_WORD = re.compile(r'\w+')


def settings(**changes):
  config = default_config().data.clean
  for key, value in changes.items():
    config[key] = value
  return CleanSettings.from_config(config)


def _base_records(count):
  """Distinct Alpaca records: the shared demo file's (real text, for precision), else made up."""
  path = SHARED_DATA / 'instructions' / 'alpaca_en_demo.json'
  rng = random.Random(0)
  if path.exists():
    pool = json.loads(path.read_text())
  else:
    vocab = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 9)))
             for _ in range(3000)]
    sentence = lambda n: ' '.join(rng.choice(vocab) for _ in range(n)).capitalize() + '.'  # noqa: E731
    pool = [{'instruction': sentence(rng.randint(5, 15)), 'input': '',
             'output': ' '.join(sentence(rng.randint(6, 20)) for _ in range(rng.randint(1, 6)))}
            for _ in range(2 * count)]
  out, seen = [], set()
  for record in pool:
    key = ' '.join(_WORD.findall(' '.join(record.values()).lower()))
    if key not in seen:
      seen.add(key)
      out.append({k: record[k] for k in ('instruction', 'input', 'output')})
  return out[:count]


def _edit(record, kind, rng):
  record = dict(record)
  if kind == 'case':
    record['instruction'] = record['instruction'].upper()
  elif kind == 'whitespace':
    record['output'] = '  ' + record['output'].replace(' ', '\n ', 3) + '\t'
  elif kind == 'punctuation':
    record = {k: re.sub(r'[.,;:!?]', '', v) for k, v in record.items()}
    record['instruction'] += '?!'
  else:  # one word replaced, inserted or deleted
    words = record['output'].split(' ')
    at = rng.randrange(len(words))
    if kind == 'replace':
      words[at] = 'zebra'
    elif kind == 'insert':
      words.insert(at, 'zebra')
    else:
      del words[at]
    record['output'] = ' '.join(words)
  return record


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
  """A JSON list of 240 distinct records followed by planted copies (60 exact up to case,
  whitespace and punctuation; 60 one-word edits) and 20 records holding benchmark questions,
  shuffled; the benchmark file (JSONL, 40 items). Returns the paths, the truth (planted index ->
  what it matches) and the records."""
  root = tmp_path_factory.mktemp('clean')
  rng = random.Random(1)
  records = _base_records(280)
  base, benchmark = records[:240], records[240:]
  questions = [{'question': f'{r["instruction"]} {r["input"]}'.strip(), 'answer': r['output']}
               for r in benchmark]
  (root / 'bench.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in questions))
  long_enough = [i for i, r in enumerate(base) if len(r['output'].split()) >= 25]
  planted = []
  for n, original in enumerate(rng.sample(range(len(base)), 60)):
    planted.append((_edit(base[original], ('case', 'whitespace', 'punctuation')[n % 3], rng),
                    ('duplicate', original)))
  for n, original in enumerate(rng.sample(long_enough, 60)):
    planted.append((_edit(base[original], ('replace', 'insert', 'delete')[n % 3], rng),
                    ('duplicate', original)))
  # A benchmark question in a prompt (cased differently), with its answer or another. Questions
  # under 8 words are no evidence of contamination (GPT-3's rule); they stay in the file only.
  askable = [k for k, q in enumerate(questions) if len(normalize.words(q['question'])) >= 8]
  for k in askable[:20]:
    q = questions[k]
    question = q['question'].lower() if k % 2 else q['question']
    planted.append(({'instruction': 'Answer the question below.', 'input': question,
                     'output': 'Here is my answer.' if k % 2 else q['answer']},
                    ('eval', k)))
  rng.shuffle(planted)
  path = root / 'train.json'
  path.write_text(json.dumps(base + [r for r, _ in planted], indent=2))
  truth = {len(base) + i: what for i, (_, what) in enumerate(planted)}
  return root, path, root / 'bench.jsonl', truth, base + [r for r, _ in planted]


def _removed(out):
  return {r['index']: r for r in map(json.loads, (out / 'removed.jsonl').read_text().splitlines())}


def test_data_clean_removes_planted_duplicates_and_benchmark_questions(planted):
  """The acceptance check, through the installed executable: recall >= 0.95 and precision
  >= 0.99 over the planted records, each reported with the record or item it matches, and the
  kept records written as a JSON list, unchanged and in order."""
  root, path, bench, truth, records = planted
  out = root / 'out'
  result = run(['data', 'clean', '--config', f'{CONFIG}:{path}', '--out', str(out),
                '--against', str(bench)], REPO)
  removed = _removed(out)
  found = set(removed) & set(truth)
  assert len(found) / len(truth) >= 0.95, sorted(set(truth) - found)
  assert len(found) / len(removed) >= 0.99, sorted(set(removed) - set(truth))
  for index in found:
    kind, target = truth[index]
    row = removed[index]
    if kind == 'duplicate':
      assert row['reason'] in ('exact_duplicate', 'near_duplicate'), row
      assert row['duplicate_of'] == {'source': str(path), 'index': target}, row
    else:
      assert row['reason'] == 'contaminated', row
      assert row['eval']['file'] == str(bench) and row['eval']['index'] == target, row
      assert row['eval']['ngram'] in ' '.join(normalize.words(' '.join(records[index].values())))
  reasons = {removed[i]['reason'] for i in found}
  assert reasons == {'exact_duplicate', 'near_duplicate', 'contaminated'}
  kept = json.loads((out / 'train.json').read_text())
  assert kept == [r for i, r in enumerate(records) if i not in removed]
  summary = json.loads((out / 'clean_summary.json').read_text())
  assert summary['kept'] == len(kept) and sum(summary['removed'].values()) == len(removed)
  assert f'{len(records)} records, {len(kept)} kept' in result.stdout, result.stdout


@pytest.mark.parametrize('args, expected', [
    (['--against', 'no/such/eval.jsonl'], '--against no/such/eval.jsonl: no such file'),
    (['--threshold', '1.5'], '--threshold 1.5: a near-duplicate threshold is a Jaccard'),
])
def test_data_clean_user_errors_are_one_line(planted, args, expected):
  root, path, _, _, _ = planted
  result = run(['data', 'clean', '--config', f'{CONFIG}:{path}', '--out', str(root / 'x'),
                *args], REPO, check_rc=2)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('jaxsft: error: ') and expected in lines[0], \
      result.stderr
  assert not (root / 'x').exists()


def test_benchmark_task_questions_are_removed(tmp_path):
  """`--against-tasks` with a task YAML of one's own (`--include-path`), through the executable:
  the task's documents are the evaluation items, named `benchmark:TASK`."""
  question = ('Which planet in our solar system is known as the red planet because of the iron '
              'oxide on its surface')
  (tmp_path / 'quiz.jsonl').write_text(json.dumps(
      {'question': question, 'choices': ['Mars', 'Venus'], 'answer': 0}) + '\n')
  (tmp_path / 'tasks').mkdir()
  (tmp_path / 'tasks' / 'my_quiz.yaml').write_text(
      f'task: my_quiz\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
      f'    test: {tmp_path / "quiz.jsonl"}\ntest_split: test\noutput_type: multiple_choice\n'
      'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
      'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
  train = tmp_path / 'train.json'
  train.write_text(json.dumps([{'instruction': question, 'input': '', 'output': 'Mars.'},
                               {'instruction': 'Name a fruit.', 'input': '', 'output': 'Apple.'}]))
  run(['data', 'clean', '--config', f'{CONFIG}:{train}', '--out', str(tmp_path / 'out'),
       '--against-tasks', 'my_quiz', '--include-path', str(tmp_path / 'tasks')], REPO)
  removed = list(_removed(tmp_path / 'out').values())
  assert [(r['index'], r['reason'], r['eval']['file'], r['eval']['index']) for r in removed] == [
      (0, 'contaminated', 'benchmark:my_quiz', 0)]


def test_results_do_not_depend_on_worker_processes(planted, tmp_path):
  _, path, bench, _, _ = planted
  items = contamination.read_eval_file(str(bench))
  spec = dataset_spec({'path': str(path)}, 'test')
  for num_proc in (1, 2):
    clean_io.clean_files([spec], settings(), str(tmp_path / str(num_proc)), eval_items=items,
                         num_proc=num_proc)
  for name in ('train.json', 'removed.jsonl'):
    assert (tmp_path / '1' / name).read_bytes() == (tmp_path / '2' / name).read_bytes(), name
  summaries = [json.loads((tmp_path / n / 'clean_summary.json').read_text()) for n in '12']
  assert [{k: v for k, v in s.items() if k != 'datasets'} for s in summaries] == \
      [{k: v for k, v in summaries[0].items() if k != 'datasets'}] * 2


def test_signatures_are_datasketchs_minhash():
  from datasketch import MinHash
  shingles = np.array([5, 17, 2**32 - 1, 123456, 9, 9], np.uint32)
  ours = minhash.signatures(shingles, np.array([0, 4]), minhash.permutations(128, 1))
  for row, group in zip(ours, (shingles[:4], shingles[4:])):
    reference = MinHash(num_perm=128, seed=1, scheme='affine32', hashfunc=lambda x: x)
    reference.update_batch([int(x) for x in group])
    np.testing.assert_array_equal(row, reference.hashvalues)


def test_words_and_degenerate_answers():
  assert normalize.words('Hello,  WORLD!\tIt\'s 3.14') == ['hello', 'world', 'it', 's', '3', '14']
  assert normalize.words('我爱你 ok') == ['我', '爱', '你', 'ok']
  answer = lambda text: [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': text}]  # noqa: E731
  assert clean.degenerate(answer(' \n')) == ('empty_answer', 'message 1 (assistant) is empty')
  assert clean.degenerate(answer('!!!!!!!!!!'))[0] == 'degenerate'
  assert clean.degenerate(answer('ha ha ha ha ha'))[0] == 'degenerate'
  for fine in ('5', '!!!', 'No, no, no.', 'The answer is 42.'):
    assert clean.degenerate(answer(fine)) is None, fine
  calls = {'role': 'assistant', 'content': '', 'tool_calls': [{'function': {'name': 'f'}}]}
  assert clean.degenerate([{'role': 'user', 'content': 'q'}, calls]) is None


def test_contamination_ngrams():
  long = 'Natalia sold clips to 48 of her friends in April and then half as many in May'
  items = [contamination.EvalItem('eval.json', 0, (long, 'yes')),
           contamination.EvalItem('eval.json', 1, ('What is the capital city of France today',))]
  index = contamination.ContaminationIndex(items, 13)
  assert index.comparable == 2

  def match(text):
    tokens = normalize.words(text)
    found = index.matches(np.array(normalize.word_hashes(tokens), np.uint64),
                          np.array([len(tokens)]))
    return found.get(0) and (found[0][0].index, ' '.join(tokens[found[0][1]:][:found[0][2]]))

  assert match(f'Solve: {long.upper()}!') == (0, 'natalia sold clips to 48 of her friends in '
                                               'april and then half')
  assert match('Q: what is the capital city of france today? A: Paris') == (1, 'what is the '
                                                                             'capital city of '
                                                                             'france today')
  assert match('Natalia sold clips to 48 of her friends in April.') is None  # 10 < 13 words
  assert match('yes') is None  # fields under 8 words are no evidence


@pytest.mark.parametrize('kind', ['jsonl', 'parquet', 'json_lines_in_json'])
def test_output_keeps_the_input_format(tmp_path, kind):
  records = [{'instruction': 'Name a color.', 'input': '', 'output': 'Red.'},
             {'instruction': 'name a color', 'input': '', 'output': 'red'},
             {'instruction': 'Count to three.', 'input': '', 'output': '1, 2, 3'}]
  if kind == 'parquet':
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / 'data.parquet'
    pq.write_table(pa.Table.from_pylist(records), path)
  else:
    path = tmp_path / ('data.jsonl' if kind == 'jsonl' else 'data.json')
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  summary = clean_io.clean_files([dataset_spec({'path': str(path)}, 't')], settings(),
                                 str(tmp_path / 'out'))
  out = tmp_path / 'out' / path.name
  if kind == 'parquet':
    import pyarrow.parquet as pq
    assert pq.read_schema(out) == pq.read_schema(path)
    kept = pq.read_table(out).to_pylist()
  else:
    kept = [json.loads(line) for line in out.read_text().splitlines()]
  assert kept == [records[0], records[2]]
  assert summary['removed']['exact_duplicate'] == 1


def test_settings_are_checked():
  with pytest.raises(UserError, match=r'data.clean.near_threshold=0.0: must be a Jaccard'):
    settings(near_threshold=0)
  with pytest.raises(UserError, match=r'data.clean.against=.*list of evaluation files'):
    CleanSettings.from_config({**default_config().data.clean.to_dict(), 'against': 'a.jsonl'})
  with pytest.raises(UserError, match=r'data.clean.shingle_words=0: must be an integer >= 1'):
    settings(shingle_words=0)
  with pytest.raises(UserError, match='no such file'):
    contamination.read_eval_file('absent.jsonl')


@pytest.mark.parametrize('streaming', [False, True])
def test_pipeline_cleans_on_the_fly_as_the_command_does(planted, tmp_path, streaming):
  """`data.clean.enabled`: a run trains on the records `jaxsft data clean` keeps."""
  from jaxsft.data.pipeline import Pipeline
  from jaxsft.data.tokenizer import load_tokenizer
  _, path, bench, truth, records = planted
  tokenizer = load_tokenizer(str(llama2_tokenizer()))
  config = default_config().data
  config.datasets = [{'path': str(path), 'format': 'alpaca'}]
  config.max_seq_len = 1024
  config.cache_dir = str(tmp_path / 'cache')
  config.streaming = streaming
  config.clean.enabled = True
  config.clean.against = [str(bench)]
  data = Pipeline(config, tokenizer, batch_size=4, process_index=0, process_count=1)
  summary = clean_io.clean_files([dataset_spec({'path': str(path)}, 't')], settings(),
                                 str(tmp_path / 'out'),
                                 eval_items=contamination.read_eval_file(str(bench)))
  assert data.clean_summary['removed'] == {k: v for k, v in summary['removed'].items()
                                          if k != 'bad_record'}
  assert data.clean_summary['kept'] == summary['kept']
  if streaming:
    count = sum(1 for _ in data.streams[0])
  else:
    count = data.stats[next(iter(data.stats))].records
  assert count == summary['kept'] < len(records)
