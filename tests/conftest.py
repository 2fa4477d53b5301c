"""Test set-up: 8 fake CPU devices for the sharding tests, float32 matmuls, quiet TensorFlow.

XLA_FLAGS must be set before jax is imported anywhere, so it is set here, at collection time.
Single-device tests simply run on the first device.
"""

import os

# multiprocess_utils.TEST_XLA_CPU_FLAGS: XLA:CPU's older elemental emitters instead of its MLIR
# fusion emitters. With LLVM at its lowest level (below) they compile a small train step in less
# than half the CPU time (depth-1 ViT-Ti/4 step: 6.1 -> 2.7 CPU-s; tests/test_accumulation.py and
# test_train_step.py: 190 -> 129 CPU-s, every test passing). The programs compute the same
# operations; results differ by float rounding at most. Users' runs keep XLA's default (on the
# recipe's step the older emitters ran no faster). The subprocesses the tests start get the same
# flags (`multiprocess_utils.xla_flags`).
from multiprocess_utils import xla_flags  # noqa: E402  (imports no JAX)

os.environ.setdefault('XLA_FLAGS', xla_flags(8))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The default 'highest' precision makes CPU float32 matmuls exact, which the reference
# comparisons rely on.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
# LLVM at its lowest optimisation level (XLA's HLO passes, and so every program's operations,
# fusions and cost analysis, are unchanged): most of a test is compiling a tiny program that then
# runs for milliseconds, and this takes about a quarter off the CPU time of the compile-heavy files
# (tests/test_train_step.py and test_finetune.py: 127 -> 98 CPU-s, every test passing). Subprocesses
# inherit it. tests/test_compile.py turns it off for its TPU compiles, which report what a user's
# compile gives. Set JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test fully optimised CPU code.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# A persistent compilation cache, inherited by every subprocess the tests start: the many small
# CLI runs compile the same few programs, and loading an executable is ~10x cheaper than compiling
# it on 2 cores (it halves a 12-step CLI run). Set CJEPA_TEST_JAX_CACHE to keep it across sessions;
# by default it is fresh and removed at exit.
#
# Concurrent writers: with its default settings (no size limit) JAX writes a cache entry with a
# plain `write_bytes`, without a lock, and a reader that finds the file takes whatever bytes are
# there: two processes compiling the same program at once (the two xdist workers, or the 2-process
# jobs of tests/test_multihost*.py) can read a half-written entry. JAX then warns ("Error reading
# persistent compilation cache entry ... truncated stream") and compiles again; it does not abort.
# A size limit turns on JAX's LRU eviction, under which every read and write holds a file lock
# (the `filelock` package; the limit is far above what a session writes, ~100 MB), so one cache is
# shared cleanly by every process of the session. Without `filelock` (JAX then refuses a size
# limit) each xdist worker gets a directory of its own instead.
# (The "Fatal Python error: Aborted" that xdist workers met in the linear probe does not come from
# the cache: most likely it is XLA:CPU's collective deadlock on many queued steps, which aborts
# after a timeout; see cjepa_jax/evals/linear.py, MAX_STEPS_IN_FLIGHT.)
_CACHE_OWNER = 'CJEPA_TEST_JAX_CACHE_OWNER'   # Which pytest process chose the directory.
try:
  import filelock  # noqa: E402,F401  pylint: disable=unused-import
  _locked = True
except ImportError:
  _locked = False
_owner = 'session' if _locked else os.environ.get('PYTEST_XDIST_WORKER', 'main')
if ('JAX_COMPILATION_CACHE_DIR' not in os.environ
    or os.environ.get(_CACHE_OWNER, _owner) != _owner):   # Unlocked: not the controller's.
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  if os.environ.get('CJEPA_TEST_JAX_CACHE'):
    _cache = os.path.join(os.environ['CJEPA_TEST_JAX_CACHE'], _owner)
    os.makedirs(_cache, exist_ok=True)
  else:
    _cache = tempfile.mkdtemp(prefix=f'cjepa_jax_cache_{_owner}_')
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ[_CACHE_OWNER] = _owner
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
if _locked:
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_CIFAR10 = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'datasets' / 'cifar10'


@pytest.fixture(scope='session')
def shared_cifar10_tarballs():
  """The shared CIFAR-10 tarballs, or skip when ../shared is absent."""
  if not (SHARED_CIFAR10 / 'train.tar.gz').exists():
    pytest.skip('../shared/datasets/cifar10 is not present')
  return SHARED_CIFAR10


# The files that take longest (multi-process jobs, CLI runs) go first: under `pytest -n 2 --dist
# loadfile` (README) each file runs whole on one worker, and a long file started last would leave
# the other worker idle at the end.
_SLOW_FIRST = ('test_train.py', 'test_multihost.py', 'test_train_step.py', 'test_finetune.py',
               'test_multihost_evals.py', 'test_evals.py', 'test_benchmarks.py',
               'test_input_pipeline.py', 'test_models.py')  # Longest first (--durations, 2 cores).


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: a multi-process job, a CLI run that kills, preempts, corrupts or resumes, '
      'a long training check or a TPU compile; `-m "not slow"` is the fast tier (README, '
      'Tests)')
  # pytest-xdist (>= 3.6) hands out `--dist loadfile` files in descending order of their number of
  # tests unless told not to: the 2-test multi-process files would start last and end alone.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: order within a file.
