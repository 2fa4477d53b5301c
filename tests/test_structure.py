"""The package's shape: data flows down, nothing happens at import, the step needs no TensorFlow."""

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'cjepa_jax'
# The command-line entry points (and their shared error path): nothing else may import them.
CLI_MODULES = {'cjepa_jax.train', 'cjepa_jax.probe', 'cjepa_jax.finetune',
               'cjepa_jax.convert_torch', 'cjepa_jax.convert_hf', 'cjepa_jax.export',
               'cjepa_jax.compile', 'cjepa_jax.cli'}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every cjepa_jax module `path` imports (at any depth of the file, lazy imports included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found.update(f'{node.module}.{a.name}' for a in node.names)
  return {n for n in found if n.startswith('cjepa_jax')}


def test_no_library_module_imports_an_entry_point():
  offenders = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    name = _module_name(path)
    if name in CLI_MODULES:
      continue
    bad = _imports(path) & CLI_MODULES
    if bad:
      offenders[name] = sorted(bad)
  assert not offenders, offenders


def test_importing_every_module_defines_no_flags_and_setup_needs_no_tensorflow():
  code = '''
import importlib, pkgutil, sys
from absl import flags
import cjepa_jax
# The steps, their setups, the loop and the evaluators' registry: TensorFlow only on first use
# (the input pipeline), so a step can be built, compiled and benchmarked without it.
from cjepa_jax import train_step, finetune_step, sharding, optim, loop
from cjepa_jax.evals import registry
step_imports_tf = 'tensorflow' in sys.modules
for m in pkgutil.walk_packages(cjepa_jax.__path__, 'cjepa_jax.'):
  importlib.import_module(m.name)
defined = sorted(f for f in ('config', 'workdir', 'coordinator_address', 'num_processes',
                             'process_id', 'local_device_ids') if f in flags.FLAGS)
print(step_imports_tf, defined)
'''
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'}, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split('\n')[-2] == 'False []', result.stdout


def test_package_docstring_lists_every_module():
  doc = (PACKAGE / '__init__.py').read_text(encoding='utf-8').split('"""')[1]
  for path in sorted(PACKAGE.rglob('*.py')):
    rel = path.relative_to(PACKAGE).as_posix()
    if path.name == '__init__.py':
      continue
    listed = rel if not rel.startswith('evals/') else 'evals/'
    assert listed in doc, f'{rel} is not in cjepa_jax/__init__.py\'s module list'
  evals_doc = (PACKAGE / 'evals' / '__init__.py').read_text(encoding='utf-8').split('"""')[1]
  for path in sorted((PACKAGE / 'evals').glob('*.py')):
    if path.name != '__init__.py':
      assert path.name in evals_doc, f'evals/{path.name} is not in evals/__init__.py\'s list'


def test_nothing_outside_an_evaluator_branches_on_its_name():
  """An evaluator is its file and its registration: no other module compares with its name
  (the runner, the trainers and the loop go through its `Type`)."""
  from cjepa_jax.evals import registry  # pylint: disable=g-import-not-at-top
  names = set(registry.names())
  # hf.py's model card reads probe_results.json files of every version, older ones included, by
  # their evaluators' names: a reader of files, like evals/units.py; still to move onto `Type`.
  readers = {PACKAGE / 'hf.py'}
  offenders = []
  for path in sorted(PACKAGE.rglob('*.py')):
    if (path.parent.name == 'evals' and path.stem in names) or path in readers:
      continue   # Its own file.
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if isinstance(node, ast.Compare):
        for side in (node.left, *node.comparators):
          if isinstance(side, ast.Constant) and side.value in names:
            offenders.append(f'{path.relative_to(ROOT)}:{node.lineno} compares with '
                             f'{side.value!r}')
  assert not offenders, offenders


def test_benchmarks_hold_tools_and_experiments_say_what_makes_each_figure():
  """benchmarks/ keeps the reusable tools, each in its README; the scripts behind RESULTS.md live
  in experiments/cifar10/, each in its README, which names every figure RESULTS.md shows."""
  for folder in (ROOT / 'benchmarks', ROOT / 'experiments' / 'cifar10'):
    readme = (folder / 'README.md').read_text(encoding='utf-8')
    for path in sorted(folder.iterdir()):
      if path.is_file() and path.suffix in ('.py', '.sh'):
        assert path.name in readme, f'{path.relative_to(ROOT)} is not in {folder.name}/README.md'
  assert not list((ROOT / 'benchmarks').glob('cifar10_*')), 'experiment scripts belong in experiments/'
  results = (ROOT / 'RESULTS.md').read_text(encoding='utf-8')
  readme = (ROOT / 'experiments' / 'cifar10' / 'README.md').read_text(encoding='utf-8')
  figures = set(re.findall(r'results/[\w.-]+\.png', results))
  assert figures and not [f for f in sorted(figures) if f not in readme], figures
