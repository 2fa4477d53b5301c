"""metrics.py's resume truncation: rows and TensorBoard events past the resumed step, once each.

The end-to-end case (SIGKILL, resume, each step once and equal to an uninterrupted run) is in
tests/test_train.py.
"""

import json

import pytest

from cjepa_jax import metrics as metrics_lib


def _events(workdir):
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    for raw, _ in metrics_lib.read_event_records(str(path)):
      event = event_pb2.Event()
      event.ParseFromString(raw[12:-4])
      out += [(v.tag, event.step, round(v.simple_value, 3)) for v in event.summary.value]
  return out


def test_writer_on_resume_moves_later_rows_aside_and_cuts_the_events(tmp_path):
  pytest.importorskip('tensorboardX')
  writer = metrics_lib.MetricWriter(str(tmp_path), start_step=0)
  for step in (2, 4, 6):
    writer.write(step, {'loss': float(step)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 8, "lo')   # Cut off by a kill mid-write.
  writer = metrics_lib.MetricWriter(str(tmp_path), start_step=4)   # Resumed from step 4.
  for step in (6, 8):
    writer.write(step, {'loss': 10.0 + step})
  writer.close()
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in rows] == [(2, 2.0), (4, 4.0), (6, 16.0), (8, 18.0)]
  discarded = [json.loads(l) for l in (tmp_path / 'metrics.discarded.jsonl').read_text()
               .splitlines()]
  assert discarded == [{'step': 6, 'loss': 6.0, 'discarded_at_resume_from': 4},
                       {'unparsed': '{"step": 8, "lo', 'discarded_at_resume_from': 4}]
  assert sorted(_events(tmp_path)) == [('loss', 2, 2.0), ('loss', 4, 4.0), ('loss', 6, 16.0),
                                       ('loss', 8, 18.0)]


def test_writer_without_start_step_appends_and_a_fresh_start_drops_everything(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 2, "loss": 1.0}\n')
  metrics_lib.MetricWriter(str(tmp_path)).close()   # Append only: untouched.
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 2, "loss": 1.0}\n'
  metrics_lib.MetricWriter(str(tmp_path), start_step=0).close()   # No checkpoint: a fresh start.
  assert (tmp_path / 'metrics.jsonl').read_text() == ''
  assert json.loads((tmp_path / 'metrics.discarded.jsonl').read_text())['step'] == 2


def test_disabled_writer_touches_nothing(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 2}\n')
  metrics_lib.MetricWriter(str(tmp_path), enabled=False, start_step=0).close()
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 2}\n'
