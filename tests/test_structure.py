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
               'cjepa_jax.compile', 'cjepa_jax.convert_array_record', 'cjepa_jax.mask_stats',
               'cjepa_jax.cli'}
# Sub-packages: every module in them is a library module, checked like the others.
PACKAGES = ('cjepa_jax/checkpoint', 'cjepa_jax/data', 'cjepa_jax/evals', 'cjepa_jax/models')
# Beyond this many lines a module says at its top why it is not split.
MAX_LINES = 450


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


def test_entry_points_are_the_cli_modules_and_nothing_else_runs_as_a_script():
  """Every `def main` / `__main__` / absl app lives in an entry point, never in a library module,
  and every console script of setup.py names an entry point's `run`."""
  for path in sorted(PACKAGE.rglob('*.py')):
    name = _module_name(path)
    if name in CLI_MODULES or name == 'cjepa_jax.distributed':  # distributed: app.run's wrapper.
      continue
    text = path.read_text(encoding='utf-8')
    assert "__name__ == '__main__'" not in text and 'app.run(' not in text, name
    assert not re.search(r'^def main\(', text, re.M), name
  scripts = re.findall(r"'cjepa-[\w-]+=(cjepa_jax[\w.]*):run'", (ROOT / 'setup.py').read_text())
  assert scripts and set(scripts) <= CLI_MODULES, scripts


def test_sub_packages_exist_and_are_checked():
  """The folders hold library modules only (no entry point hides in them), and the walk above
  reaches them: each has an `__init__.py` and appears in the package docstring."""
  doc = (PACKAGE / '__init__.py').read_text(encoding='utf-8').split('"""')[1]
  for folder in PACKAGES:
    path = ROOT / folder
    assert (path / '__init__.py').exists(), folder
    assert path.name + '/' in doc, folder
    for module in path.glob('*.py'):
      assert _module_name(module) not in CLI_MODULES, module


def test_long_modules_say_why():
  """A module over MAX_LINES lines says why at its top."""
  long = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    rel = path.relative_to(PACKAGE).as_posix()
    text = path.read_text(encoding='utf-8')
    doc = text.split('"""')[1] if text.count('"""') >= 2 else ''
    if text.count('\n') > MAX_LINES and 'longer than 450 lines' not in doc:
      long[rel] = text.count('\n')
  assert not long, long


def test_importing_every_module_defines_no_flags_and_setup_needs_no_tensorflow():
  code = '''
import importlib, pkgutil, sys
from absl import flags
import cjepa_jax
# The steps, their setups, the loop, the evaluators' registry, the grain loader and the
# checkpoints: TensorFlow only on first use (the tf.data loader), so a step can be built,
# compiled, benchmarked and fed without it.
from cjepa_jax import train_step, finetune_step, sharding, optim, loop
from cjepa_jax.evals import registry
from cjepa_jax.data import augment, grain_loader, input_pipeline, sources
from cjepa_jax.checkpoint import manager, reading
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
  offenders = []
  for path in sorted(PACKAGE.rglob('*.py')):
    if path.parent.name == 'evals' and path.stem in names:
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
