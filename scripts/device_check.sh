#!/usr/bin/env bash
# The device check of issue 18: what a session lent a GPU runs first, in one call.
#
#   bash scripts/device_check.sh              # on the GPU: under 8 minutes
#   bash scripts/device_check.sh --dry-run    # anywhere: tiny shapes on the CPU (CI runs it)
#
# Steps, in order, each timed, its output kept, and run even when an earlier one failed (one
# broken part must not hide the others):
#   environment     nvidia-smi, the JAX backend and devices, package versions
#   gpu-parity      tests/test_gpu.py: cuDNN attention vs XLA, logits and one train step for
#                   full / LoRA / QLoRA in bf16 (dry run: `blocked` vs `xla` on the CPU)
#   bench-train     scripts/bench_train.py, LLaMA-3.2-1B shape, seq 2048, bf16, every method:
#                   tokens/s, MFU, peak memory
#   plan-native     jaxsft plan of the bench's full fine-tuning run, compiled for the GPU
#   plan-cpu        the same with JAX_PLATFORMS=cpu (the plans in docs/benchmarks.md)
#   plan-tpu        the same with --platform tpu, where jaxsft plan has that flag
#   bench-generate  scripts/bench_generate.py: KV-cache decoding vs a forward pass per token
#   context-parallel  scripts/check_context.py: a LoRA step with rows split over the devices
#                   (a multi-device machine's own; else fake CPU devices) vs one device, and
#                   jaxsft plan --devices 8 of configs/llama3_8b_long_context.py at 1M tokens
#                   (dry run: a tiny model on 4 devices)
# Then one Markdown block (date, command, device, each step's status, time and figures) goes
# to $OUT/device_check.md when $OUT is set (the device tool brings $OUT back), else to
# ./device_check.md or --out PATH, and to stdout; the whole log goes beside it (.log).
#
# Options: --dry-run; --out PATH (the Markdown file); --only STEP,... (run only these steps,
# e.g. to rerun a failed one: the environment step always runs); --compare-hf (bench_train's
# transformers + PEFT side too: minutes more, off on the device by default); --budget SECONDS
# (the time the steps may take together: 470 on the device, so the call ends inside 8 minutes).
# Exit status: 0 when every step run is ok (plan-tpu skipped for want of jaxsft plan's
# --platform counts as ok), else 1.
# PYTHON names the interpreter (default python3: on the device, the one that holds JAX).

set -u
set -o pipefail

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

ARGS=("$@")
DRY_RUN=0
COMPARE_HF=0
MARKDOWN=''
BUDGET_S=''
ONLY=''
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --compare-hf) COMPARE_HF=1 ;;
    --out) MARKDOWN=${2:?--out needs a path}; shift ;;
    --out=*) MARKDOWN=${1#--out=} ;;
    --only) ONLY=,${2:?--only needs step names},; shift ;;
    --only=*) ONLY=,${1#--only=},; ;;
    --budget) BUDGET_S=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET_S=${1#--budget=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
if [ -z "$MARKDOWN" ]; then
  MARKDOWN=${OUT:+$OUT/}device_check.md
fi
mkdir -p "$(dirname "$MARKDOWN")"
LOG=${MARKDOWN%.md}.log
: > "$LOG"
PY=${PYTHON:-python3}
# This tree's jaxsft, installed or not: the device has no registry to install it from.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$DRY_RUN" = 1 ]; then
  MODE='dry run (tiny shapes, JAX_PLATFORMS=cpu, XLA:CPU at -O0: checks the script, '
  MODE+='measures nothing)'
  # The dry run checks that every step runs; a GPU seen here would only make it slower.
  export JAX_PLATFORMS=cpu
  # Tiny shapes spend their time in XLA:CPU's compiles; LLVM at -O0 compiles them about 2.5x
  # faster (measured on this script's train steps), and nothing here is a timing.
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
  BUDGET_S=${BUDGET_S:-90}
  HARD_S=$(( BUDGET_S * 3 ))  # a loaded CI machine may be slow: warn, do not cut steps
  RESERVE_S=0
else
  MODE='device'
  BUDGET_S=${BUDGET_S:-470}
  HARD_S=$BUDGET_S
  RESERVE_S=25  # kept for each later step, so a slow step cannot starve the rest
fi
WARN_S=$(( BUDGET_S * 85 / 100 ))

STEPS="$WORK/steps.tsv"
: > "$STEPS"
STEPS_LEFT=8

quote() {  # the arguments as one shell line, quoted only where needed
  local out='' arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="$arg "; else
      out+="'${arg//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

now_ms() { date +%s%3N; }

record() {  # name status milliseconds command
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"
  echo "== $1: $2 ($(( $3 / 1000 )).$(( $3 % 1000 / 100 )) s)" | tee -a "$LOG"
  if [ "$SECONDS" -ge "$WARN_S" ]; then
    echo "device_check: warning: ${SECONDS} s used of the ${BUDGET_S} s budget" | tee -a "$LOG"
  fi
}

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND under a time limit (CAP, less when the
# budget is short), its output to stdout, the log and $WORK/NAME.log; sets RC.
run_step() {
  local name=$1 cap=$2
  shift 2
  STEPS_LEFT=$(( STEPS_LEFT - 1 ))
  local limit=$(( HARD_S - SECONDS - RESERVE_S * STEPS_LEFT ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  local line
  line=$(quote "$@")
  STEP_LINE=$line
  if [ -n "$ONLY" ] && [ "$name" != environment ] && [[ "$ONLY" != *",$name,"* ]]; then
    RC=0 STEP_MS=0 STATUS='not selected'
    : > "$WORK/$name.log"
    return
  fi
  echo "== $name: $line" | tee -a "$LOG"
  if [ "$limit" -lt 15 ]; then
    RC=124 STEP_MS=0 STATUS='skipped (time budget spent)'
    : > "$WORK/$name.log"
    return
  fi
  local start
  start=$(now_ms)
  # timeout signals the whole process group: bench_train's worker processes stop too.
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" | tee -a "$LOG"
  RC=${PIPESTATUS[0]}
  STEP_MS=$(( $(now_ms) - start ))
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
    STATUS="failed (timed out after $limit s)"
  elif [ "$RC" = 0 ]; then
    STATUS=ok
  else
    STATUS="failed (exit $RC)"
  fi
}

echo "device_check: $MODE; budget ${BUDGET_S} s; log $LOG" | tee -a "$LOG"

# ---------------------------------------------------------------------------- environment
if command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    > "$WORK/nvidia-smi.txt" 2>&1 || true
fi
cat > "$WORK/environment.py" << 'EOF'
import importlib.metadata as metadata
import platform
import sys

import jax

print(f'python {platform.python_version()} ({sys.executable})')
for name in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax',
             'orbax-checkpoint', 'numpy', 'transformers', 'torch', 'peft', 'datasets',
             'ml-collections', 'dill', 'multiprocess', 'fsspec', 'pyarrow', 'huggingface-hub'):
  try:
    print(f'{name} {metadata.version(name)}')
  except metadata.PackageNotFoundError:
    pass
print(f'backend {jax.default_backend()}')
print(f'devices {jax.devices()}')
print(f'device_kind {jax.devices()[0].device_kind}')
# jaxsft needs both, and the device has neither unless the carried wheels were installed.
import datasets
import ml_collections
import jaxsft.train.step
want = sys.argv[1]
if want != 'any' and jax.default_backend() != want:
  sys.exit(f'the JAX backend is {jax.default_backend()!r}, not {want!r}')
EOF
WANT_BACKEND=gpu
[ "$DRY_RUN" = 1 ] && WANT_BACKEND=any
run_step environment 120 "$PY" "$WORK/environment.py" "$WANT_BACKEND"
record environment "$STATUS" "$STEP_MS" "$STEP_LINE"

# ---------------------------------------------------------------------------- 1. parity
PYTEST=("$PY" -m pytest -q -s -n 0 -p no:cacheprovider tests/test_gpu.py)
if [ "$DRY_RUN" = 1 ]; then
  # The blocked kernel in place of cuDNN (128 positions: its fewest blocks), and the logits
  # and QLoRA tests only: every line of the comparison code (LoRA's zero leaves, the 4-bit
  # base) at half the time of all four tests.
  PYTEST=(env JAXSFT_GPU_TEST_KERNEL=blocked JAXSFT_GPU_TEST_SEQ=128 "${PYTEST[@]}"
          -k 'logits or qlora')
fi
run_step gpu-parity 180 "${PYTEST[@]}"
if [ "$STATUS" = ok ] && ! grep -Eq '[0-9]+ passed' "$WORK/gpu-parity.log"; then
  STATUS='skipped (no test ran: is a GPU visible to JAX?)'
fi
record gpu-parity "$STATUS" "$STEP_MS" "$STEP_LINE"

# ---------------------------------------------------------------------------- 2. bench_train
if [ "$DRY_RUN" = 1 ]; then
  BENCH=(--model tiny --seq 128 --batch 2 --steps 2 --warmup 1)
  # bench_train's `tiny` model.
  TINY='{"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_layers": 2, '
  TINY+='"num_heads": 2, "num_kv_heads": 1, "head_dim": 64}'
  PLAN_SHAPE=(--config.model.preset= "--config.model.architecture=$TINY"
              --config.data.max_seq_len=128 --config.batch_size=2)
else
  BENCH=(--model llama3.2-1b --seq 2048 --batch 8)
  PLAN_SHAPE=(--config.model.preset=llama3.2-1b --config.data.max_seq_len=2048
              --config.batch_size=8)
fi
BENCH_JSON=${MARKDOWN%.md}_bench_train.jsonl
: > "$BENCH_JSON"  # bench_train appends
# shellcheck disable=SC2054  # the commas are bench_train's list of methods
BENCH_CMD=("$PY" scripts/bench_train.py "${BENCH[@]}" --methods full,lora,qlora
           --dtype bfloat16 --out "$BENCH_JSON")
[ "$COMPARE_HF" = 1 ] && BENCH_CMD+=(--compare-hf)
run_step bench-train 300 "${BENCH_CMD[@]}"
if [ "$STATUS" = ok ]; then
  # bench_train reports a failed method in its table and still exits 0.
  failed=$("$PY" -c 'import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
bad = [r["method"] + "/" + r["side"] for r in rows if "tokens_per_s" not in r]
print(" ".join(bad) if bad or len(rows) >= 3 else "missing results")' "$BENCH_JSON" \
    2> /dev/null) || failed='unreadable results'
  [ -n "$failed" ] && STATUS="failed ($failed)"
fi
record bench-train "$STATUS" "$STEP_MS" "$STEP_LINE"

# ---------------------------------------------------------------------------- 3. plans
# The bench's full fine-tuning run (fp32 master weights, bf16 compute, no remat, batch 8 x
# 2048), so the GPU plan can be read against the peak memory bench_train measured.
PLAN=("$PY" -m jaxsft.cli plan --config configs/llama3_8b_full.py --config.model.path=
      "${PLAN_SHAPE[@]}" --config.model.remat_policy=none --device-memory-gib 80)
run_step plan-native 120 "${PLAN[@]}"
record plan-native "$STATUS" "$STEP_MS" "$STEP_LINE"
if [ "$DRY_RUN" = 1 ]; then
  # JAX_PLATFORMS=cpu already holds for the whole dry run: the native plan is this one, and
  # compiling it twice would only cost CI time. The report still gets both columns.
  STEPS_LEFT=$(( STEPS_LEFT - 1 ))
  cp "$WORK/plan-native.log" "$WORK/plan-cpu.log"
  record plan-cpu "$STATUS" 0 "$(quote env JAX_PLATFORMS=cpu "${PLAN[@]}")"
else
  run_step plan-cpu 150 env JAX_PLATFORMS=cpu "${PLAN[@]}"
  record plan-cpu "$STATUS" "$STEP_MS" "$STEP_LINE"
fi
if "$PY" -m jaxsft.cli plan --help 2>/dev/null | grep -q -- '--platform'; then
  run_step plan-tpu 120 "${PLAN[@]}" --platform tpu
  record plan-tpu "$STATUS" "$STEP_MS" "$STEP_LINE"
else
  STEPS_LEFT=$(( STEPS_LEFT - 1 ))
  : > "$WORK/plan-tpu.log"
  record plan-tpu 'skipped (jaxsft plan has no --platform flag yet)' 0 \
    "$(quote "${PLAN[@]}" --platform tpu)"
fi

# ---------------------------------------------------------------------------- 4. generate
if [ "$DRY_RUN" = 1 ]; then
  GENERATE=(--hidden 128 --layers 2 --prompt 16 --new 8 --batch 2)
else
  GENERATE=(--hidden 2048 --layers 16 --batch 8 --dtype bfloat16)
fi
run_step bench-generate 120 "$PY" scripts/bench_generate.py "${GENERATE[@]}"
record bench-generate "$STATUS" "$STEP_MS" "$STEP_LINE"

# ---------------------------------------------------------------------------- 5. context
cat > "$WORK/context.sh" << 'EOF'
set -u
PY=$1; DRY_RUN=$2
DEVICES=$("$PY" -c 'import jax; print(jax.device_count())' 2>/dev/null || echo 0)
if [ "$DRY_RUN" = 0 ] && [ "$DEVICES" -ge 2 ]; then
  "$PY" scripts/check_context.py || exit 1
else
  "$PY" scripts/check_context.py --fake-devices 4 --length 256 || exit 1
fi
if [ "$DRY_RUN" = 1 ]; then
  PLAN=(--config.model.preset= "--config.model.architecture={'vocab_size': 512, 'hidden_size': 128, 'intermediate_size': 256, 'num_layers': 2, 'num_heads': 4, 'num_kv_heads': 2}"
        --config.data.max_seq_len=4096 --config.mesh.shape='(1,1,4,1)' --devices 4)
else
  PLAN=(--config.data.max_seq_len=1048576 --devices 8)
fi
"$PY" -m jaxsft.cli plan --config configs/llama3_8b_long_context.py --config.model.path= \
  "${PLAN[@]}" --device-memory-gib 80
EOF
run_step context-parallel 150 bash "$WORK/context.sh" "$PY" "$DRY_RUN"
record context-parallel "$STATUS" "$STEP_MS" "$STEP_LINE"

# ---------------------------------------------------------------------------- the report
export DC_WORK=$WORK DC_BENCH_JSON=$BENCH_JSON DC_MODE=$MODE DC_SECONDS=$SECONDS
export DC_BUDGET=$BUDGET_S
DC_COMMAND='bash scripts/device_check.sh'
[ ${#ARGS[@]} -gt 0 ] && DC_COMMAND+=" $(quote "${ARGS[@]}")"
export DC_COMMAND
REPORT_RC=0
"$PY" - "$MARKDOWN" << 'EOF' || REPORT_RC=$?
"""Builds the Markdown block from the step records, logs and bench_train's JSON lines."""
import datetime
import json
import os
import re
import subprocess
import sys

work = os.environ['DC_WORK']


def read(name):
  try:
    with open(os.path.join(work, name), errors='replace') as f:
      return f.read()
  except OSError:
    return ''


steps = [line.split('\t', 3) for line in read('steps.tsv').splitlines() if line]
status = {name: state for name, state, _, _ in steps}
commands = {name: command for name, _, _, command in steps}
out = []
add = out.append


def code(text):
  add('```text')
  add(text.rstrip() or '(no output)')
  add('```')


def failure(name):
  """The end of a failed step's output: the error, without the log's scrolling."""
  if status.get(name, '').startswith('failed'):
    tail = [line for line in read(f'{name}.log').splitlines() if line.strip()][-25:]
    add(f'{name} failed; the end of its output:')
    code('\n'.join(tail))
    add('')


def commit():
  sha = os.environ.get('DEVICE_CHECK_COMMIT', '')
  if sha:
    return sha
  try:
    sha = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True).stdout.strip()
    return sha + (' with uncommitted changes' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown (no git here: set DEVICE_CHECK_COMMIT)'


environment = read('environment.log')
kind = re.search(r'^device_kind (.+)$', environment, re.M)
gpu = read('nvidia-smi.txt').strip()
device = gpu.splitlines()[0] if gpu else (kind.group(1) if kind else 'unknown')
date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
seconds, budget = int(os.environ['DC_SECONDS']), int(os.environ['DC_BUDGET'])
add(f'### Device check: {device}, {date}')
add('')
add(f'Mode: {os.environ["DC_MODE"]}. Commit: {commit()}. Total: {seconds} s '
    f'(budget {budget} s{"; OVER BUDGET" if seconds > budget else ""}).')
add('')
add('```bash')
add(os.environ['DC_COMMAND'])
add('```')
if os.environ.get('OUT'):
  add('')
  add('Run through the device tool, by the `run` call in docs/benchmarks.md ("Device check").')
add('')
add('#### Environment')
add('')
add(f'nvidia-smi (name, memory, driver): {gpu or "not present"}')
add('')
code(environment)
add('')
add('| step | status | seconds |')
add('| --- | --- | ---: |')
for name, state, ms, _ in steps:
  add(f'| {name} | {state} | {int(ms) / 1000:.1f} |')
add('')

add('#### 1. Attention parity (tests/test_gpu.py)')
add('')
add(f'`{commands.get("gpu-parity", "")}`: {status.get("gpu-parity", "not run")}')
add('')
parity = read('gpu-parity.log')
lines = [m.group(0) for m in re.finditer(
    r'(logits|full|lora|qlora) (\S+ vs \S+:|with a wrong mask).*', parity)]
summary = [line for line in parity.splitlines()
           if re.search(r'\d+ (passed|failed|skipped|error)', line)]
code('\n'.join(lines + summary[-1:]) if lines or summary else parity[-3000:])
add('')

failure('gpu-parity')
add('#### 2. Training speed (scripts/bench_train.py)')
add('')
add(f'`{commands.get("bench-train", "")}`: {status.get("bench-train", "not run")}')
add('')
results = []
try:
  with open(os.environ['DC_BENCH_JSON']) as f:
    bench_lines = f.read().splitlines()
except OSError:
  bench_lines = []
for line in bench_lines:
  try:
    results.append(json.loads(line))
  except ValueError:
    pass
jax_side = {r['method']: r for r in results if r.get('side') == 'jax' and 'tokens_per_s' in r}
full, lora, qlora = (jax_side.get(m) for m in ('full', 'lora', 'qlora'))
if results:
  add('| method | side | tokens/s | step (s) | MFU | peak memory (GiB) | compile (s) | '
      'first loss |')
  add('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
  for r in results:
    side = 'jaxsft' if r.get('side') == 'jax' else 'transformers + PEFT'
    if 'tokens_per_s' not in r:
      add(f'| {r.get("method")} | {side} | failed: {r.get("error", "?")} | | | | | |')
      continue
    mfu = '-' if r.get('mfu') is None else f'{100 * r["mfu"]:.1f} %'
    add(f'| {r["method"]} | {side} | {r["tokens_per_s"]:,.0f} | {r["step_s"]:.3f} | {mfu} | '
        f'{r["peak_memory_gib"]:.2f} ({r["memory_kind"]}) | {r["compile_s"]:.1f} | '
        f'{r["first_loss"]:.4f} |')
  add('')
  targets = []
  if full and full.get('mfu') is not None:
    met = 'met' if full['mfu'] >= 0.45 else 'NOT met'
    targets.append(f'full fine-tuning MFU {100 * full["mfu"]:.1f} % (target >= 45 % on an '
                   f'H100): {met}')
  elif full:
    targets.append(f'full fine-tuning MFU: no peak FLOP/s known for {full["device"]!r}')
  if full and lora:
    ratio = lora['tokens_per_s'] / full['tokens_per_s']
    targets.append(f'LoRA / full tokens/s {ratio:.2f}x (target >= 1.3x): '
                   f'{"met" if ratio >= 1.3 else "NOT met"}')
  if lora and qlora:
    ratio = qlora['tokens_per_s'] / lora['tokens_per_s']
    targets.append(f'QLoRA / LoRA tokens/s {ratio:.2f}x (target >= 0.8x): '
                   f'{"met" if ratio >= 0.8 else "NOT met"}')
  for line in targets:
    add(f'- {line}')
  if os.environ['DC_MODE'] != 'device':
    add('- (dry run: these figures say nothing about speed)')
else:
  code(read('bench-train.log')[-3000:])
add('')

failure('bench-train')
add('#### 3. Memory plan: GPU compile vs CPU compile (jaxsft plan)')
add('')
plans = {'plan-native': 'native compile', 'plan-cpu': 'JAX_PLATFORMS=cpu',
         'plan-tpu': '--platform tpu'}
for name in plans:
  add(f'- {name}: `{commands.get(name, "")}`: {status.get(name, "not run")}')
add('')
parts = ('frozen weights', 'trained weights', 'optimizer state', 'temporaries', 'total')
values = {}
for name in plans:
  for part, gib in re.findall(r'^\s*(' + '|'.join(parts) + r')\s+([\d.]+) GiB', read(f'{name}.log'),
                              re.M):
    values[name, part] = gib
add('| part (GiB per device) | ' + ' | '.join(plans.values()) + ' |')
add('| --- |' + ' ---: |' * len(plans))
for part in parts:
  add(f'| {part} | ' + ' | '.join(values.get((name, part), '-') for name in plans) + ' |')
add('')
if full and ('plan-native', 'total') in values:
  add(f'bench_train measured a peak of {full["peak_memory_gib"]:.2f} GiB ({full["memory_kind"]}) '
      f'for the same full fine-tuning step; the native plan says {values["plan-native", "total"]}'
      ' GiB.')
  add('')
for name in plans:
  # Beside the parts: the verdict, the attention kernel chosen, what a lowering could not say,
  # and errors (the part lines themselves are in the table).
  extra = [line for line in read(f'{name}.log').splitlines() if line.strip()
           and not re.match(r'\s*(' + '|'.join(parts) + r')\s+[\d.]+ GiB|per-device memory:', line)
           and not line.startswith(('== ', 'WARNING: All log messages'))]
  if extra:
    add(f'{name}:')
    code('\n'.join(extra[-12:]))
    add('')

for name in plans:
  failure(name)
add('#### 4. Decoding (scripts/bench_generate.py)')
add('')
add(f'`{commands.get("bench-generate", "")}`: {status.get("bench-generate", "not run")}')
add('')
generate = read('bench-generate.log')
lines = [line for line in generate.splitlines() if 'tok/s' in line]
code('\n'.join(lines) if lines else generate[-3000:])

add('')
failure('bench-generate')
add('#### 5. Context parallelism (scripts/check_context.py, jaxsft plan --devices)')
add('')
add(f'`{commands.get("context-parallel", "")}`: {status.get("context-parallel", "not run")}')
add('')
context = read('context-parallel.log')
lines = [line for line in context.splitlines()
         if line.startswith(('context parallel', 'planned for', '  ', 'verdict'))]
code('\n'.join(lines) if lines else context[-3000:])
add('')
failure('context-parallel')
text = '\n'.join(out).rstrip() + '\n'
with open(sys.argv[1], 'w') as f:
  f.write(text)
print(text)
EOF

if [ "$REPORT_RC" != 0 ]; then
  echo "device_check: the Markdown report failed (exit $REPORT_RC); the steps were:" >&2
  cut -f1,2 "$STEPS" >&2
  exit 1
fi
echo "device_check: Markdown in $MARKDOWN, log in $LOG"
NOT_OK=$(awk -F'\t' '$2 != "ok" && $2 != "not selected" &&
  $2 !~ /^skipped \(jaxsft plan has no --platform/ {
  print "  " $1 ": " $2 }' "$STEPS")
if [ -n "$NOT_OK" ]; then
  printf 'device_check: not every step passed:\n%s\n' "$NOT_OK" >&2
  exit 1
fi
exit 0
