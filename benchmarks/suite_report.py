r"""The JSON lines and the summary of `benchmarks/gpu_suite.sh`; imports no jax and no TensorFlow.

  python benchmarks/suite_report.py record --name H14_scan --rc 0 --wall_s 41.2 \
      --stdout run.out --stderr run.err --xla_flags '...' --args '...'   # one JSON line
  python benchmarks/suite_report.py record --name H14_cudnn --skipped 'suite budget spent'
  python benchmarks/suite_report.py summary OUT/results.jsonl [--profile OUT/profile]

`record` turns one `benchmarks/step.py --json` run into one JSON line: the step's own object plus
`name`, `status` ('ok', 'error', 'timeout' or 'skipped'), `rc`, `wall_s`, `args` and, unless ok,
`error` (the last lines of its stderr). A run that imported TensorFlow is an 'error' however fast.

`summary` prints a markdown table of the lines (img/s, step time, TFLOP/s, MFU against both the
989 TFLOP/s datasheet peak and the ~790 TFLOP/s bf16 matmul rate measured on this workplace's
H200s, peak memory, compile time, img/s over the baseline row) and, with `--profile`, the top
operations by device time of each Perfetto trace under that folder.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import sys
from typing import Any, Iterable, Sequence

# Dense bf16 TFLOP/s of one H200: the datasheet's, and the matmul rate measured on this
# workplace's H200s (8192^3 bf16 products on random data, 769 to 798 TFLOP/s).
DATASHEET_TFLOPS = 989.0
MEASURED_TFLOPS = 790.0
# Lines of a failed run's stderr kept in its JSON line.
_ERROR_LINES = 8


def _last_json(path: str) -> dict[str, Any] | None:
  """The last line of `path` parsed as a JSON object, or None."""
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return None
  if not lines:
    return None
  try:
    obj = json.loads(lines[-1])
  except ValueError:
    return None
  return obj if isinstance(obj, dict) else None


def _tail(path: str, n: int = _ERROR_LINES) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      lines = [line.rstrip() for line in f if line.strip()]
  except OSError:
    return ''
  return '\n'.join(lines[-n:])


def record(args: argparse.Namespace) -> dict[str, Any]:
  """One JSON object for one run of the suite (see the module docstring)."""
  base = dict(name=args.name, args=args.args, xla_flags=args.xla_flags, rc=args.rc,
              wall_s=args.wall_s)
  if args.skipped:
    return dict(base, status='skipped', error=args.skipped)
  result = _last_json(args.stdout) if args.rc == 0 else None
  if result is None:
    # timeout(1) exits 124 at its limit, 137 when it had to kill.
    status = 'timeout' if args.rc in (124, 137) else 'error'
    error = _tail(args.stderr) or _tail(args.stdout) or f'exit status {args.rc}, no output'
    return dict(base, status=status, error=error)
  out = dict(result, **base, status='ok')
  if result.get('tensorflow_imported', True):  # A missing key is a step.py that cannot tell.
    out.update(status='error', error='TensorFlow was imported (or not reported) by the step.')
  return out


def _fmt(x: Any, spec: str, scale: float = 1.0) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return ''
  return format(x * scale, spec)


def _label(r: dict[str, Any]) -> str:
  if r.get('status') != 'ok':
    return f"{r['name']}"
  parts = [f"{r['variant']}" + (f" d{r['depth']}" if r.get('depth') else ''),
           f"b{r['batch_size']}"]
  if r.get('scan'):
    parts.append('scan')
  if r.get('remat', 'none') != 'none':
    parts.append(f"remat {r['remat']}")
  if r.get('attention', 'xla') != 'xla':
    parts.append(r['attention'])
  return f"{r['name']} ({', '.join(parts)})"


def table(rows: Sequence[dict[str, Any]], baseline: str = '') -> str:
  """A markdown table of the suite's JSON lines; MFU only on GPUs (n/a elsewhere)."""
  base = next((r for r in rows if r.get('name') == baseline and r.get('status') == 'ok'), None)
  cols = ['run', 'status', 'img/s', 'step ms (min / max)', 'TFLOP/s', 'MFU 989', 'MFU 790',
          'peak mem GiB', 'compile s', f"img/s vs {baseline or 'baseline'}"]
  lines = ['| ' + ' | '.join(cols) + ' |', '| ' + ' | '.join(['---'] * len(cols)) + ' |']
  for r in rows:
    if r.get('status') != 'ok':
      why = (r.get('error') or '').strip().splitlines()
      why = why[-1][:120].replace('|', '/') if why else ''
      lines.append(f"| {_label(r)} | {r.get('status')}: {why} |" + ' |' * (len(cols) - 2))
      continue
    gpu = r.get('platform') == 'gpu'
    devices = r.get('devices') or 1
    tflops = r.get('tflops')
    mfu = [_fmt(tflops / (p * devices), '.1%') if gpu and tflops else 'n/a'
           for p in (DATASHEET_TFLOPS, MEASURED_TFLOPS)]
    mem = r.get('peak_memory_bytes')
    vs = (_fmt(r['images_per_s'] / base['images_per_s'], '.3f')
          if base and r.get('images_per_s') else '')
    lines.append(
        f"| {_label(r)} | ok | {_fmt(r.get('images_per_s'), '.1f')} | "
        f"{_fmt(r.get('step_time_s'), '.1f', 1e3)} ({_fmt(r.get('step_time_min_s'), '.1f', 1e3)}"
        f" / {_fmt(r.get('step_time_max_s'), '.1f', 1e3)}) | {_fmt(tflops, '.4g')} | "
        f"{mfu[0]} | {mfu[1]} | {_fmt(mem, '.2f', 2.0**-30) if mem else 'n/a'} | "
        f"{_fmt(r.get('compile_s'), '.1f')} | {vs} |")
  return '\n'.join(lines)


def _trace_files(folder: str) -> list[str]:
  """One trace per profile: the Perfetto JSON, else the profiler's own `<host>.trace.json.gz`."""
  found = []
  for root, _, files in os.walk(folder):
    traces = sorted(f for f in files if f.endswith('.trace.json.gz') or f.startswith('perfetto'))
    perfetto = [f for f in traces if f.startswith('perfetto')]
    if traces:
      found.append(os.path.join(root, (perfetto or traces)[0]))
  return sorted(found)


def top_ops(trace_path: str, n: int = 15) -> list[tuple[str, float, int]]:
  """(name, total ms, count) of the `n` costliest complete events on the trace's devices.

  Device processes are those whose name mentions a GPU or TPU; with none (CPU) all processes
  count, less the Python tracer's frames (names starting with '$'). Within them the 'XLA Ops'
  threads are used where there are any (their parents, the 'XLA Modules' and 'Steps' threads,
  would count the same time twice), else every thread.
  """
  with gzip.open(trace_path, 'rt', encoding='utf-8') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  proc, thread = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      proc[e.get('pid')] = str(e.get('args', {}).get('name', ''))
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      thread[(e.get('pid'), e.get('tid'))] = str(e.get('args', {}).get('name', ''))
  device = {p for p, name in proc.items() if 'GPU' in name or 'TPU' in name}
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e
              and (e.get('pid') in device if device else not str(e.get('name')).startswith('$'))]
  ops_threads = {k for k, name in thread.items() if 'XLA Ops' in name}
  if ops_threads:
    complete = [e for e in complete if (e.get('pid'), e.get('tid')) in ops_threads]
  total: dict[str, float] = collections.defaultdict(float)
  count: dict[str, int] = collections.Counter()
  for e in complete:
    total[e.get('name', '?')] += float(e['dur']) / 1e3  # Microseconds -> ms.
    count[e.get('name', '?')] += 1
  return sorted(((k, v, count[k]) for k, v in total.items()), key=lambda t: -t[1])[:n]


def profile_report(folder: str, n: int = 15) -> str:
  out = []
  for path in _trace_files(folder):
    try:
      ops = top_ops(path, n)
    except (OSError, ValueError, KeyError) as e:
      out.append(f'{os.path.relpath(path, folder)}: unreadable ({e})')
      continue
    whole = sum(t for _, t, _ in top_ops(path, 10**9)) or 1.0
    out.append(f'Top {len(ops)} ops by time, {os.path.relpath(path, folder)} '
               f'(all traced steps; {whole:.1f} ms of op time in all):\n')
    out.append('| op | ms | share | count |\n| --- | --- | --- | --- |')
    out.extend(f'| `{name[:90]}` | {t:.2f} | {t / whole:.1%} | {c} |' for name, t, c in ops)
    out.append('')
  return '\n'.join(out) if out else f'No Perfetto trace under {folder}.'


def read_lines(path: str) -> list[dict[str, Any]]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv: Iterable[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='benchmarks/suite_report.py')
  sub = p.add_subparsers(dest='cmd', required=True)
  r = sub.add_parser('record', help='One JSON line for one run of the suite.')
  r.add_argument('--name', required=True)
  r.add_argument('--rc', type=int, default=0)
  r.add_argument('--wall_s', type=float, default=0.0)
  r.add_argument('--stdout', default='')
  r.add_argument('--stderr', default='')
  r.add_argument('--xla_flags', default='')
  r.add_argument('--args', default='')
  r.add_argument('--skipped', default='', help='Why the run did not start.')
  s = sub.add_parser('summary', help='Markdown table (and top ops) of results.jsonl.')
  s.add_argument('results')
  s.add_argument('--profile', default='', help='Folder holding the Perfetto traces.')
  s.add_argument('--baseline', default='H14_scan', help='Run name the img/s ratios divide by.')
  args = p.parse_args(None if argv is None else list(argv))
  if args.cmd == 'record':
    print(json.dumps(record(args), sort_keys=True), flush=True)
    return 0
  rows = read_lines(args.results)
  print(table(rows, args.baseline))
  print(f"\n{sum(r.get('status') == 'ok' for r in rows)} of {len(rows)} runs ok.")
  for r in rows:
    if r.get('profile_error'):
      print(f"{r['name']}: the profile failed: {r['profile_error']}")
  if args.profile:
    print('\n' + profile_report(args.profile))
  return 0


if __name__ == '__main__':
  sys.exit(main())
