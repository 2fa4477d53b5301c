r"""Renders `cjepa-compile --json` reports as BENCHMARKS.md's ahead-of-time TPU table.

  python benchmarks/tpu_table.py DIR [--rows h14_v5p32,h14_v5p16,...]

DIR holds `NAME.json` (a report) and `NAME.cmd` (its command), as `benchmarks/tpu_compile.sh`
writes them. Prints one markdown table (memory per chip, fit, compile time, the compiler's
estimates, collectives per chip and step) and the commands, row by row. Every time and
throughput in it is the compiler's estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

COLUMNS = ('row', 'recipe', 'slice (chips)', 'mesh data x fsdp', 'batch / chip', 'accum',
           'remat', 'scan', 'memory / chip: args + temps = total (GiB)', 'fits (headroom)',
           'compile (s)', 'est. step (s)', 'est. img/s / chip', 'est. MFU',
           'all-gather / reduce-scatter / all-reduce (GiB / chip / step)')


def _gib(x: float) -> str:
  return f'{x:.1f}'


def row(name: str, r: dict[str, Any]) -> list[str]:
  """One table row of report `r`."""
  m, e, c = r.get('memory_gib') or {}, r.get('estimate') or {}, r.get('collectives') or {}
  if m:
    memory = f"{_gib(m['arguments'])} + {_gib(m['temporaries'])} = {_gib(m['total'])}"
    fits = f"yes ({100 * r['headroom']:.0f}%)" if r['fits'] else (
        f"no ({_gib(m['total'])} > {r['hbm_gib']:g})")
  else:
    memory, fits = 'out of HBM at compile', 'no'
  est = e.get('step_seconds') or 0.0
  coll = ' / '.join(_gib(c.get(k, {}).get('bytes', 0.0) / 2**30)
                    for k in ('all-gather', 'reduce-scatter', 'all-reduce')) if c else '-'
  cost_note = '' if r.get('cost_source', 'program') == 'program' else ' (extrap.)'
  return [name, r.get('config', ''), f"{r['topology']} ({r['chips']})",
          f"{r['mesh']['data']} x {r['mesh']['fsdp']}", f"{r['batch_per_chip']:g}",
          str(r['accum_steps']), r['remat_policy'], 'yes' if r['scan'] else 'no', memory, fits,
          f"{r['compile_seconds']:.0f}",
          f'{est:.3f}{cost_note}' if est else '-',
          f"{e['images_per_second_per_chip']:.0f}" if est else '-',
          f"{100 * e['mfu']:.0f}%" if est else '-', coll]


def table(reports: list[tuple[str, dict[str, Any]]]) -> str:
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + ' --- |' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(row(name, r)) + ' |' for name, r in reports]
  return '\n'.join(lines)


def load(directory: pathlib.Path, names: list[str] | None) -> list[tuple[str, dict, str]]:
  paths = ([directory / f'{n}.json' for n in names] if names else
           sorted(directory.glob('*.json')))
  out = []
  for path in paths:
    if not path.exists():
      raise FileNotFoundError(f'{path} does not exist: run benchmarks/tpu_compile.sh '
                              f'{directory} {path.stem} first.')
    cmd = path.with_suffix('.cmd')
    out.append((path.stem, json.loads(path.read_text().strip().splitlines()[-1]),
                cmd.read_text().strip() if cmd.exists() else ''))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('directory', type=pathlib.Path)
  parser.add_argument('--rows', default='', help='Comma-separated row names, in table order.')
  args = parser.parse_args()
  try:
    reports = load(args.directory, [r for r in args.rows.split(',') if r] or None)
  except (FileNotFoundError, json.JSONDecodeError) as e:
    parser.error(str(e))
  print(table([(n, r) for n, r, _ in reports]))
  print()
  for name, _, cmd in reports:
    print(f'    {name}: {cmd}')


if __name__ == '__main__':
  main()
