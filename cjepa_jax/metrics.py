"""Metric writers: `DIR/metrics.jsonl`, TensorBoard event files in DIR, and a console line.

`LogWindow` is the trainers' (pretraining and fine-tuning) window of step metrics: averaged,
timed (img/s, MFU) and written at each log step (`is_log_step`). `check_finite` stops a run
whose step metrics went NaN or inf (`NonFiniteError`); `BestResult` follows the best value of one
evaluation result (fine-tuning keeps that step's checkpoint).

Metrics that match the state: a trainer that resumes from the checkpoint of step S (the latest, or
an earlier one after a damaged one, a SIGKILL or a crash) logs steps S+1, ... again, so
`MetricWriter(workdir, start_step=S)` first removes what the lost run logged past S:
  * `metrics.jsonl` keeps its rows of steps <= S (rewritten atomically); the later rows (and a
    line cut off mid-write) are appended to `metrics.discarded.jsonl`, each with
    `"discarded_at_resume_from": S`, never silently duplicated or lost;
  * every TensorBoard events file in DIR is rewritten without its events of steps > S (the
    records are copied byte for byte, CRCs included); the resumed run writes a new events file,
    `events.out.tfevents.<time>.<host>.<pid>.from_step_<S>`.
    So TensorBoard, or any reader of event files, shows one curve per tag (no step purge
    needed: the replaced values are in `metrics.discarded.jsonl`). A TensorBoard already
    running may need a reload to forget what it had read.

Only the main process (process 0) writes; the others get a writer that drops everything, so call
sites need no `if process_index() == 0`.
"""

from __future__ import annotations

import datetime
import json
import logging as py_logging
import math
import os
import struct
import time
from typing import Any, Callable, Iterable, Mapping

from absl import logging

METRICS_FILE = 'metrics.jsonl'
DISCARDED_FILE = 'metrics.discarded.jsonl'
EVENTS_GLOB = 'events.out.tfevents.'
# Libraries whose INFO lines would bury the progress line; their warnings still show.
_QUIET_PATHS = ('/orbax/', '/etils/', '/tensorflow_datasets/')


def _to_python(value: Any) -> Any:
  try:
    value = value.item()
  except AttributeError:
    pass
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN / inf; keep them readable.
  return value


class _QuietLibraries(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(p in record.pathname for p in _QUIET_PATHS)


def quiet_library_logs() -> None:
  """Keeps orbax's and tfds's INFO lines off the console (absl routes every module's logs)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def _row_step(line: str) -> int | None:
  """The `step` of a metrics.jsonl line, or None for a line that is not a whole row."""
  try:
    row = json.loads(line)
    return int(row['step']) if isinstance(row, dict) else None
  except (ValueError, KeyError, TypeError):
    return None


def truncate_metrics(workdir: str, step: int) -> list[int]:
  """Moves the rows of `workdir/metrics.jsonl` past `step` to `metrics.discarded.jsonl`.

  Rows of steps <= `step` stay, in order (the file is rewritten through a temporary file and a
  rename, so a kill meanwhile leaves either file whole). A line that is not a whole row (cut off
  by a kill) is moved too. Returns the steps moved (-1 for a cut-off line).
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  kept, moved, steps = [], [], []
  for line in lines:
    row_step = _row_step(line)
    if row_step is not None and row_step <= step:
      kept.append(line)
      continue
    steps.append(-1 if row_step is None else row_step)
    row = json.loads(line) if row_step is not None else {'unparsed': line}
    moved.append(json.dumps(dict(row, discarded_at_resume_from=int(step))))
  if not moved:
    return []
  with open(os.path.join(workdir, DISCARDED_FILE), 'a', encoding='utf-8') as f:
    f.write(''.join(m + '\n' for m in moved))
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(''.join(k + '\n' for k in kept))
  os.replace(tmp, path)
  return steps


def read_event_records(path: str) -> list[tuple[bytes, int | None]]:
  """The records of a TensorBoard events file (TFRecord framing): `(raw bytes, event step)`.

  The raw bytes are the whole record (length, its CRC, the serialized Event, its CRC). The step is
  None for a record that does not parse; reading stops at a record cut off by a kill.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  records, offset = [], 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    end = offset + 12 + length + 4
    if end > len(data):
      break
    event = event_pb2.Event()
    try:
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      step = int(event.step)
    except Exception:  # pylint: disable=broad-exception-caught  (protobuf's DecodeError)
      step = None
    records.append((data[offset:end], step))
    offset = end
  return records


def truncate_events(workdir: str, step: int) -> list[str]:
  """Rewrites every events file in `workdir` without its events past `step`; returns those files.

  Cut-off or unparsable records are dropped as well.
  """
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return []
  changed = []
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    if not name.startswith(EVENTS_GLOB) or not os.path.isfile(path):
      continue
    records = read_event_records(path)
    kept = [raw for raw, s in records if s is not None and s <= step]
    if len(kept) == len(records) and sum(map(len, kept)) == os.path.getsize(path):
      continue
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(b''.join(kept))
    os.replace(tmp, path)
    changed.append(path)
  return changed


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

  `start_step` (the step a trainer starts from: 0, or the checkpoint it resumed): metrics and
  events past it, logged by an earlier start that did not save them, are removed first (see the
  module docstring). None leaves the files as they are (append only).
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None):
    self.enabled = enabled
    self._tb = None
    self._file = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if start_step is not None:
      moved = truncate_metrics(workdir, start_step)
      events = truncate_events(workdir, start_step)
      if moved or events:
        logging.info('Starting from step %d: %d row(s) of %s logged past it (steps %s) moved to '
                     '%s, and %d TensorBoard events file(s) cut at step %d, so that every step is '
                     'logged once.', start_step, len(moved), METRICS_FILE,
                     ', '.join(map(str, moved)) or '-', DISCARDED_FILE, len(events), start_step)
    self._file = open(os.path.join(workdir, METRICS_FILE), 'a', encoding='utf-8')
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # A new events file per start, named by where it starts (and the pid: two starts within a
      # second would otherwise share tensorboardX's name, and the second would overwrite it).
      suffix = f'.{os.getpid()}' + (f'.from_step_{start_step}' if start_step is not None else '')
      self._tb = tensorboardX.SummaryWriter(workdir, filename_suffix=suffix)
    except ImportError:
      logging.warning('tensorboardX is not installed: no TensorBoard events are written.')

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: _to_python(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def progress_line(step: int, total: int, scalars: Mapping[str, Any], seconds_left: float) -> str:
  """`step 120/2000 (6.0%) | loss 0.4123 | 312.4 img/s | ETA 0:12:00`."""
  eta = datetime.timedelta(seconds=int(max(seconds_left, 0)))
  parts = [f'step {step}/{total} ({100.0 * step / max(total, 1):.1f}%)']
  if 'loss' in scalars:
    parts.append(f"loss {float(scalars['loss']):.4f}")
  if 'images_per_s' in scalars:
    parts.append(f"{float(scalars['images_per_s']):.1f} img/s")
  if scalars.get('mfu'):
    parts.append(f"MFU {100 * float(scalars['mfu']):.1f}%")
  parts.append(f'ETA {eta}')
  return ' | '.join(parts)


class Progress:
  """A progress line for long host loops (feature extraction, probe training), about every 20 s.

    meter = Progress('features of train', total=50_000)
    meter.update(512) ...; meter.done()

  logs `features of train: 12,288/50,000 (24.6%) | 341 /s | ETA 0:01:50` on the main process only
  when `enabled`; `done()` logs the total and the time taken.
  """

  def __init__(self, what: str, total: int | None, *, enabled: bool = True,
               every_s: float = 20.0):
    import jax  # pylint: disable=g-import-not-at-top  (metrics.py stays importable without jax)
    import time  # pylint: disable=g-import-not-at-top
    self._clock = time.monotonic
    self.what, self.total, self.count = what, total, 0
    self.enabled = enabled and jax.process_index() == 0
    self.every_s = every_s
    self._start = self._last = self._clock()

  def update(self, n: int) -> None:
    self.count += int(n)
    now = self._clock()
    if self.enabled and now - self._last >= self.every_s:
      self._last = now
      rate = self.count / max(now - self._start, 1e-9)
      speed = f'{rate:,.0f} /s' if rate >= 10 else f'{rate:.2g} /s'  # Slow loops: 0.42 /s.
      line = f'{self.what}: {self.count:,}'
      if self.total:
        left = max(self.total - self.count, 0) / max(rate, 1e-9)
        line += (f'/{self.total:,} ({100.0 * self.count / self.total:.1f}%) | {speed} | '
                 f'ETA {datetime.timedelta(seconds=int(left))}')
      else:
        line += f' | {speed}'
      logging.info(line)

  def done(self) -> None:
    if self.enabled:
      took = datetime.timedelta(seconds=int(self._clock() - self._start))
      logging.info('%s: %s done in %s.', self.what, f'{self.count:,}', took)


def is_log_step(step: int, log_every_steps: int, periods: Iterable[int], total_steps: int
                ) -> bool:
  """Whether a run logs after update number `step` (1 after the first update).

  Every `log_every_steps`, every step an evaluator is due (`periods`: their `every_steps`, as
  `EvalsSpec.periods()` gives them) and the last step.
  """
  return bool(step % log_every_steps == 0 or step == total_steps
              or any(step % every == 0 for every in periods))


class LogWindow:
  """Collects step metrics on the device; averages, times and writes them at each log step.

  Metrics stay on the device until a log step (no per-step host sync). Every step's metrics
  enter the average, so a resumed run logs exactly what an uninterrupted one does; only the
  first step of a process (which includes the compile) is left out of the timing.
  """

  def __init__(self, batch_size: int, total_steps: int, steps_per_epoch: int,
               flops_per_step: float, peak: float, writer: MetricWriter, *,
               last_value_keys: tuple[str, ...] = ('lr',)):
    """`flops_per_step` (whole batch) and `peak` (FLOP/s of all devices; 0: unknown) give MFU;
    `last_value_keys` are logged as the log step's value instead of the window's mean."""
    self.batch_size, self.total_steps = batch_size, total_steps
    self.steps_per_epoch = steps_per_epoch
    self.last_value_keys = last_value_keys
    self.flops_per_step, self.peak, self.writer = flops_per_step, peak, writer
    self.window: list[dict[str, Any]] = []
    self.timed_steps = 0
    self.t_window = self.t_start = None
    self.first_step = None
    self.last: dict[str, Any] = {}

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    import jax  # pylint: disable=g-import-not-at-top  (metrics.py stays importable without jax)
    self.window.append(metrics)
    if self.t_start is None:
      jax.block_until_ready(metrics['loss'])   # The compile: not part of any step time.
      self.t_start = self.t_window = time.perf_counter()
      self.first_step = step
    else:
      self.timed_steps += 1

  def flush(self, step: int, evaluate: Callable[[], dict[str, float]] | None = None,
            **extra: Any) -> None:
    """Writes the window's averages; `evaluate` (RankMe, the kNN probe) runs after the timing."""
    import jax  # pylint: disable=g-import-not-at-top
    host = jax.device_get(self.window)
    now = time.perf_counter()
    scalars = {k: math.fsum(float(m[k]) for m in host) / len(host)
               for k in host[0] if k != 'finite'}
    for k in self.last_value_keys:
      if k in host[-1]:   # e.g. no EMA momentum in a run without EMA.
        scalars[k] = float(host[-1][k])
    step_time = (now - self.t_window) / self.timed_steps if self.timed_steps else float('nan')
    flops_per_s = self.flops_per_step / step_time
    scalars.update(
        epoch=step / self.steps_per_epoch, step_time_s=step_time,
        images_per_s=self.batch_size / step_time, tflops=flops_per_s / 1e12,
        mfu=flops_per_s / self.peak if self.peak else 0.0, **extra)
    if evaluate is not None:
      # Timed apart from the steps: `eval_s` says what the window's evaluations (RankMe and any
      # kNN / few-shot monitor due) added to the run's wall time, which img/s leaves out.
      started = time.perf_counter()
      scalars.update(evaluate())
      scalars['eval_s'] = time.perf_counter() - started
    self.writer.write(step, scalars)
    if self.writer.enabled:  # Process 0 only, like the metric files.
      per_step = (now - self.t_start) / max(step - self.first_step, 1)
      logging.info('%s', progress_line(step, self.total_steps, scalars,
                                       per_step * (self.total_steps - step)))
    self.last = dict(scalars, step=step)
    self.window, self.timed_steps, self.t_window = [], 0, time.perf_counter()


class NonFiniteError(FloatingPointError):
  """The loss or the gradients became NaN or inf."""


def check_finite(step: int, finite: Any, last_good: int | None, workdir: str,
                 lr_key: str = 'optim.lr') -> None:
  """NonFiniteError naming the step, the last good checkpoint and what to try, unless `finite`
  (the step's flag, a scalar array: fetched here)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not bool(jax.device_get(finite)):
    if last_good is None:
      kept = 'No checkpoint was written before it.'
    else:
      kept = (f'The last good checkpoint (step {last_good}) in {workdir}/checkpoints is kept and '
              'nothing later was saved.')
    raise NonFiniteError(
        f'Non-finite loss or gradients at step {step}. {kept} Lower --config.{lr_key}, set '
        '--config.optim.grad_clip=1.0, or use --config.model.dtype=float32 to find the cause, '
        'then restart with the same --workdir.')


class BestResult:
  """The best value so far of the evaluation result `key` (higher is better) and its step.

  `extra` is what a checkpoint kept of it (`best_<name>`, `best_step`), so a resumed run goes on
  comparing with the best of the run, not of the start. `key` None: nothing is followed.
  """

  def __init__(self, key: str | None, extra: Mapping[str, Any]):
    self.key = key
    self.name = 'best_' + key.removeprefix('eval_') if key else ''
    self.value = float(extra.get(self.name, float('-inf')))
    self.step = extra.get('best_step')
    self.improved = False

  def observe(self, step: int, results: dict[str, Any]) -> dict[str, Any]:
    """`results` with the best value and its step; notes whether `step` improved on it."""
    if self.key is None or self.key not in results:
      return results
    if results[self.key] > self.value:
      self.value, self.step, self.improved = results[self.key], step, True
    logging.info('eval at step %d: %s %.4g (best %.4g at step %s).', step, self.key,
                 results[self.key], self.value, self.step)
    return dict(results, **{self.name: self.value, 'best_step': self.step})

  def extra(self) -> dict[str, Any]:
    """What a checkpoint keeps of it."""
    return {self.name: self.value, 'best_step': self.step} if self.key else {}
