"""`jaxsft benchmark` against lm-evaluation-harness's own `hf` backend (torch), on a tiny random
LLaMA in fp32 and three local tasks written here (multiple choice, generation, rolling
log-likelihood): the same metrics, and per-request log-likelihoods within 1e-4. The same for a
LoRA work directory against its PEFT export loaded by the `hf` backend (`peft=`), with the chat
template applied. Plus the results summary in the work directory and MT-Bench-style answers."""

import json
import random

import lm_eval
import pytest
from lm_eval.tasks import TaskManager
from test_user_path import CONFIG
from user_path import ALPACA, REPO, run, tiny_model, tiny_moe_model, write_json

from jaxsft.config import default_config
from jaxsft.eval import model as eval_model

MAX_LENGTH = 64  # both backends: rolling windows really roll, contexts get truncated

TASK_YAML = {
    'tiny_mc': '''task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
''',
    'tiny_gen': '''task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "e"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
''',
    'tiny_ppl': '''task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
''',
}
TASKS = list(TASK_YAML)


@pytest.fixture(scope='module')
def stage(tmp_path_factory):
  root = tmp_path_factory.mktemp('benchmark')
  rng = random.Random(0)
  word = lambda n: ''.join(rng.choice('abcdefgh ') for _ in range(n))  # noqa: E731
  write_json(root / 'mc.jsonl', [{'question': word(rng.randint(5, 40)),
                                  'choices': [word(rng.randint(1, 6)) for _ in range(4)],
                                  'answer': rng.randrange(4)} for _ in range(24)], jsonl=True)
  write_json(root / 'gen.jsonl', [{'question': word(rng.randint(5, 80)), 'answer': 'x'}
                                  for _ in range(6)], jsonl=True)
  write_json(root / 'ppl.jsonl', [{'text': word(rng.randint(20, 150))} for _ in range(4)],
             jsonl=True)
  (root / 'tasks').mkdir()
  for name, text in TASK_YAML.items():
    (root / 'tasks' / f'{name}.yaml').write_text(text.format(root=root))
  model = tiny_model(root / 'model')
  return root, model


def hf_backend(root, model_args, tasks, **kwargs):
  return lm_eval.simple_evaluate(
      model='hf', model_args=f'{model_args},dtype=float32,device=cpu,max_length={MAX_LENGTH}',
      tasks=tasks, task_manager=TaskManager(include_path=str(root / 'tasks')), batch_size=4,
      log_samples=True, **kwargs)


def jaxsft_benchmark(root, source, tasks, out, *extra):
  run(['benchmark', *source, '--tasks', ','.join(tasks), '--include-path', str(root / 'tasks'),
       '--max-length', str(MAX_LENGTH), '--log-samples', '--out', str(out), *extra], REPO)
  return json.loads(out.read_text())


def assert_same(ours, theirs, tasks):
  for task in tasks:
    for key, value in theirs['results'][task].items():
      if ',' not in key or '_stderr' in key:
        continue
      if 'perplexity' in key or 'bits_per_byte' in key:
        assert ours['results'][task][key] == pytest.approx(float(value), rel=1e-5), (task, key)
      else:
        assert ours['results'][task][key] == float(value), (task, key)
    ours_samples = {s['doc_id']: s for s in ours['samples'][task]}
    assert len(ours_samples) == len(theirs['samples'][task])
    for sample in theirs['samples'][task]:
      mine = ours_samples[sample['doc_id']]
      assert mine['arguments'] == json.loads(json.dumps(sample['arguments'])), task
      for a, b in zip(mine['resps'], sample['resps']):
        if isinstance(b[0], str):  # generate_until
          assert a[0] == b[0], task
        elif isinstance(b[0], tuple):  # loglikelihood: (logprob, is_greedy)
          assert abs(a[0][0] - b[0][0]) <= 1e-4 and a[0][1] == b[0][1], (task, a, b)
        else:  # loglikelihood_rolling
          assert abs(a[0] - b[0]) <= 1e-4, (task, a, b)


def test_an_hf_folder_scores_as_lm_eval_hf_backend_scores_it(stage, tmp_path):
  root, model = stage
  ours = jaxsft_benchmark(root, ['--hf', str(model)], TASKS, tmp_path / 'ours.json')
  theirs = hf_backend(root, f'pretrained={model}', TASKS)
  assert_same(ours, theirs, TASKS)
  assert ours['n-samples']['tiny_mc']['effective'] == 24
  assert ours['jaxsft']['commit']


def test_a_mixture_of_experts_folder_scores_as_lm_eval_hf_backend_scores_it(stage, tmp_path):
  """Qwen3-MoE through `jaxsft benchmark`: shared contexts in a KV cache and packed rows,
  the experts routed per token, equal to transformers under lm-eval's `hf` backend."""
  root, _ = stage
  model = tiny_moe_model(tmp_path / 'moe')
  ours = jaxsft_benchmark(root, ['--hf', str(model)], ['tiny_mc'], tmp_path / 'ours.json')
  assert_same(ours, hf_backend(root, f'pretrained={model}', ['tiny_mc']), ['tiny_mc'])


def test_a_lora_run_scores_as_its_peft_export_with_the_chat_template(stage, tmp_path):
  root, model = stage
  config = root / 'lora.py'
  write_json(root / 'alpaca.json', ALPACA)
  config.write_text(CONFIG.format(model=str(model), data=str(root / 'alpaca.json'),
                                  cache=str(root / 'cache')))
  workdir = root / 'run'
  run(['train', '--config', str(config), '--workdir', str(workdir),
       '--config.train.num_steps=4', '--config.optim.learning_rate=3e-2'], REPO)
  run(['export', '--workdir', str(workdir), '--format', 'peft', '--out',
       str(root / 'adapter')], REPO)
  ours = jaxsft_benchmark(root, ['--workdir', str(workdir)], ['tiny_mc', 'tiny_gen'],
                          tmp_path / 'ours.json', '--apply-chat-template')
  theirs = hf_backend(root, f'pretrained={model},peft={root / "adapter"},'
                      f'tokenizer={root / "adapter"}', ['tiny_mc', 'tiny_gen'],
                      apply_chat_template=True)
  assert_same(ours, theirs, ['tiny_mc', 'tiny_gen'])
  assert '<|im_start|>user' in json.dumps(ours['samples']['tiny_mc'][0]['arguments'])
  # The adapters matter: the base model scores the same requests differently.
  base = hf_backend(root, f'pretrained={model},tokenizer={root / "adapter"}', ['tiny_mc'],
                    apply_chat_template=True)
  assert any(abs(a['resps'][0][0][0] - b['resps'][0][0][0]) > 1e-3 for a, b in
             zip(base['samples']['tiny_mc'], theirs['samples']['tiny_mc']))
  # The numbers travel with the run: the JSON, its table and a summary row per metric.
  folder = workdir / 'benchmarks'
  assert len(list(folder.glob('*.json'))) == 1 and len(list(folder.glob('*-tiny_*.md'))) == 1
  summary = (folder / 'summary.md').read_text().splitlines()
  assert summary[0] == '| task | metric | value | stderr | n | few-shot | date | commit |'
  acc = next(line for line in summary if line.startswith('| tiny_mc | acc |'))
  assert f'{ours["results"]["tiny_mc"]["acc,none"]:.4f}' in acc and '| 24 | 0 |' in acc


def test_mt_bench_questions_are_answered_turn_by_turn(stage, tmp_path):
  root, model = stage
  questions = [{'question_id': 81, 'category': 'writing', 'turns': ['hello', 'and again']},
               {'question_id': 82, 'category': 'math', 'turns': ['1 + 1']}]
  write_json(tmp_path / 'question.jsonl', questions, jsonl=True)
  run(['generate', '--hf', str(model), '--template', 'chatml', '--prompts',
       str(tmp_path / 'question.jsonl'), '--max-new-tokens', '6', '--out',
       str(tmp_path / 'answers.jsonl'), '--model-id', 'tiny'], REPO)
  answers = [json.loads(line) for line in (tmp_path / 'answers.jsonl').read_text().splitlines()]
  assert [a['question_id'] for a in answers] == [81, 82]
  assert [len(a['choices'][0]['turns']) for a in answers] == [2, 1]
  assert all(a['model_id'] == 'tiny' and a['answer_id'] and a['tstamp'] for a in answers)
  # Turn 2 was answered with turn 1 and its answer in the conversation.
  config = default_config()
  config.model.path, config.data.template = str(model), 'chatml'
  loaded = eval_model.from_hf(config.model.path, config.data)
  from jaxsft.eval.generate import SamplingConfig
  first, second = answers[0]['choices'][0]['turns']
  history = [{'role': 'user', 'content': 'hello'}, {'role': 'assistant', 'content': first},
             {'role': 'user', 'content': 'and again'}]
  assert eval_model.answer(loaded, [history], SamplingConfig(max_new_tokens=6)) == [second]


def test_tree_rows_score_as_packed_requests(stage):
  """Contexts with their continuations as trees in shared rows (segment ids as bit sets: a
  continuation sees its context and itself) give what reading every request whole gives,
  including one-token continuations and rows holding several groups."""
  from jaxsft.eval import scoring
  root, model = stage
  loaded = eval_model.from_hf(str(model), default_config().data)
  rng = random.Random(4)
  requests, groups = [], []
  for size in (4, 4, 2, 4, 3, 4, 1):
    context = [rng.randrange(5, 90) for _ in range(rng.randint(1, 40))]
    groups.append(list(range(len(requests), len(requests) + size)))
    requests += [(context, [rng.randrange(5, 90) for _ in range(rng.randint(1, 9))])
                 for _ in range(size)]
  trees = scoring._score_trees(  # pylint: disable=protected-access
      loaded.model_config, loaded.variables, requests, [g for g in groups if len(g) > 1],
      rows_per_call=2, limit=256, progress=None)
  packed = scoring._score_packed(  # pylint: disable=protected-access
      loaded.model_config, loaded.variables, [(c + k, len(k)) for c, k in requests],
      rows_per_call=2, limit=256, progress=None)
  assert sorted(trees) == [i for g in groups if len(g) > 1 for i in g]
  for i, scored in trees.items():
    assert scored.logprob == pytest.approx(packed[i].logprob, abs=1e-4)
    assert scored.token_logprobs == pytest.approx(packed[i].token_logprobs, abs=1e-4)
    assert scored.is_greedy == packed[i].is_greedy


def test_shared_contexts_score_as_packed_requests(stage):
  """Reading a context once for all its continuations (KV cache, contexts and continuations
  packed) gives what reading every request whole gives."""
  from jaxsft.eval import scoring, shared_scoring
  root, model = stage
  config = default_config()
  config.model.path = str(model)
  loaded = eval_model.from_hf(config.model.path, config.data)
  rng = random.Random(3)
  requests, groups = [], []
  for size in (4, 4, 2, 4, 3, 4):
    context = [rng.randrange(5, 90) for _ in range(rng.randint(3, 40))]
    groups.append(list(range(len(requests), len(requests) + size)))
    requests += [(context, [rng.randrange(5, 90) for _ in range(rng.randint(1, 9))])
                 for _ in range(size)]
  shared = shared_scoring.score_shared(loaded.model_config, loaded.variables, requests, groups,
                                       rows_per_call=2)
  packed = scoring._score_packed(  # pylint: disable=protected-access
      loaded.model_config, loaded.variables, [(c + k, len(k)) for c, k in requests],
      rows_per_call=2, limit=256, progress=None)
  for i, expected in enumerate(packed):
    assert shared[i].logprob == pytest.approx(expected.logprob, abs=1e-4)
    assert shared[i].token_logprobs == pytest.approx(expected.token_logprobs, abs=1e-4)
    assert shared[i].is_greedy == expected.is_greedy
