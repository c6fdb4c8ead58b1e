"""What a run's trackers recorded, read back with each tracker's own formats and APIs: MLflow's
client, W&B's record protobufs (`wandb.proto`), TensorBoard's event protobufs (tensorboardX's).

W&B 0.2x no longer ships a Python reader for its `.wandb` run files; their framing is LevelDB's
log format (32 KiB blocks of checksummed records, a record split over blocks as first / middle
/ last parts) after a 7-byte header, which `_leveldb_records` walks."""

import json
import os
import pathlib
import struct
from collections import defaultdict


def _leveldb_records(data: bytes, header: int):
  block, position, pending = 32768, header, b''
  while position + 7 <= len(data):
    left_in_block = block - position % block
    if left_in_block < 7:  # a block's tail too short for a record header is padding
      position += left_in_block
      continue
    _, length, kind = struct.unpack('<IHB', data[position:position + 7])
    payload = data[position + 7:position + 7 + length]
    position += 7 + length
    if kind == 0:  # zero-filled rest of a block
      position += block - position % block if position % block else 0
      continue
    if kind == 1:
      yield payload
    elif kind == 2:
      pending = payload
    elif kind == 3:
      pending += payload
    elif kind == 4:
      yield pending + payload
      pending = b''


def wandb_history(workdir) -> tuple[set[str], dict[int, dict[str, float]]]:
  """`(run ids, {step: {key: value}})` of every W&B run file under `workdir/wandb` (a resumed
  run writes a second file for the same id); a step logged twice must carry equal values."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  ids, history = set(), defaultdict(dict)
  for path in sorted(pathlib.Path(workdir, 'wandb').glob('*run-*/run-*.wandb')):
    data = path.read_bytes()
    assert data[:4] == b':W&B', path
    for payload in _leveldb_records(data, header=7):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(payload)
      kind = record.WhichOneof('record_type')
      if kind == 'run':
        ids.add(record.run.run_id)
      elif kind == 'history':
        items = {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                 for item in record.history.item}
        step = int(items.pop('_step'))
        values = {k: v for k, v in items.items() if not k.startswith('_')}
        for key, value in values.items():
          assert history[step].get(key, value) == value, (step, key)
        history[step].update(values)
  return ids, dict(history)


def mlflow_client(workdir):
  """An MLflow client of the work directory's file store (behind MLflow's switch for it)."""
  from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel
  os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')
  return MlflowClient(pathlib.Path(workdir, 'mlruns').as_uri())


def mlflow_history(workdir, run_id: str, keys) -> dict[int, dict[str, float]]:
  """`{step: {key: value}}` of an MLflow run in the work directory's file store."""
  client = mlflow_client(workdir)
  history = defaultdict(dict)
  for key in keys:
    for metric in client.get_metric_history(run_id, key):
      assert history[metric.step].get(key, metric.value) == metric.value, (metric.step, key)
      history[metric.step][key] = metric.value
  return dict(history)


def tensorboard_scalars(workdir) -> dict[int, dict[str, float]]:
  """`{step: {tag: value}}` of the event files in `workdir/tensorboard` (TFRecord framing: a
  length, its checksum, the event, its checksum)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  history = defaultdict(dict)
  for path in sorted(pathlib.Path(workdir, 'tensorboard').glob('events.out.tfevents.*')):
    data, position = path.read_bytes(), 0
    while position < len(data):
      (length,) = struct.unpack('<Q', data[position:position + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[position + 12:position + 12 + length])
      position += 12 + length + 4
      for value in event.summary.value:
        if value.HasField('simple_value'):
          history[event.step][value.tag] = value.simple_value
  return dict(history)


def jsonl_history(workdir) -> dict[int, dict[str, float]]:
  """`{step: {key: value}}` of `metrics.jsonl`, the finite numbers only (what trackers get)."""
  history = defaultdict(dict)
  for line in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    step = record.pop('step')
    history[step].update({k: v for k, v in record.items()
                          if isinstance(v, (int, float)) and v == v and abs(v) != float('inf')})
  return dict(history)
