"""Helpers for tests that start several real JAX processes on localhost (CPU, gloo collectives).

Shared by tests/test_launch.py (jax.distributed smoke tests), tests/test_multihost.py (the
trainer as a 2-process job) and tests/test_multihost_evals.py (the probe and fine-tuning as
one). Not a test module: pytest collects nothing here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Sequence

from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]

# XLA:CPU options every test process compiles with (tests/conftest.py says why): its older
# elemental emitters, which compile a small program in less than half the CPU time at the lowest
# LLVM level that conftest also sets.
TEST_XLA_CPU_FLAGS = '--xla_cpu_use_fusion_emitters=false'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process on the CPU with `devices` fake devices."""
  return f'--xla_force_host_platform_device_count={devices} {TEST_XLA_CPU_FLAGS}'


def clean_env(**extra: str) -> dict[str, str]:
  """os.environ without any scheduler / CJEPA_* variables, plus `extra`."""
  drop = ('SLURM_', 'CJEPA_', 'TPU_', 'OMPI_', 'MEGASCALE_', 'JAX_COORDINATOR', 'DRY_RUN')
  env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
  env.update(extra)
  return env


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
  """A clean environment for one CPU process with `devices` fake devices, importing this tree."""
  return clean_env(JAX_PLATFORMS='cpu',
                   XLA_FLAGS=xla_flags(devices),
                   PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='3', **extra)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for the coordination service)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def gloo_unavailable_reason() -> str | None:
  """None when this jaxlib has gloo CPU collectives (needed by multi-process CPU runs); else why."""
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return f'jaxlib has no _jax extension ({e})'
  if not hasattr(_jax, 'make_gloo_tcp_collectives'):
    return 'this jaxlib was built without gloo CPU collectives'
  return None


@dataclasses.dataclass
class ProcessResult:
  returncode: int | None   # None: still running when the deadline passed (then killed).
  stdout: str
  stderr: str


def run_processes(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], *,
                  timeout: float, cwd: pathlib.Path = ROOT) -> tuple[list[ProcessResult], float]:
  """Starts every command at once, waits for all (one shared deadline); kills any left over.

  Output goes to temporary files, not pipes: a process blocked on a full pipe would stall the
  others in their next collective.

  Returns:
    (one ProcessResult per command, wall-clock seconds until the last one exited).
  """
  start = time.monotonic()
  files, procs = [], []
  try:
    for cmd, env in zip(commands, envs, strict=True):
      out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
      files.append((out, err))
      procs.append(subprocess.Popen(list(cmd), cwd=cwd, env=env, text=True, stdout=out,
                                    stderr=err))
    for p in procs:
      try:
        p.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
      except subprocess.TimeoutExpired:
        pass
    elapsed = time.monotonic() - start
  finally:
    codes = [p.poll() for p in procs]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for code, (out, err) in zip(codes, files):
    out.seek(0)
    err.seek(0)
    results.append(ProcessResult(code, out.read(), err.read()))
    out.close()
    err.close()
  return results, elapsed


# The 2-process jobs' image folder and what they write (tests/test_multihost*.py).

NUM_CLASSES, PER_CLASS, SIZE = 10, 8, 32
TIMEOUT_S = 420  # A hang guard: two processes share 2 cores with another xdist worker.


def colour(label: int, k: int) -> tuple[int, int, int]:
  """The uniform colour of training image k of class `label`: every file its own colour."""
  return (12 + 24 * label, 20 + 30 * k, 128)


def write_colour_folder(root: pathlib.Path) -> None:
  """train/class<c>/img<k>.jpg: 10 x 8 uniform 32x32 JPEGs; test/: 2 copies per class.

  test/class<c>/img0.jpg is byte-identical to train/class<c>/img<c % 8>.jpg (so a 1-NN gets it
  right) and test/class<c>/img1.jpg to train/class<c+1>/img<c % 8>.jpg (so it gets it wrong).
  The image folder gives sorted file i to process i % 2: process 0 evaluates every img0 and
  process 1 every img1, so the kNN top-1 is exactly 0.5 only if both halves are counted once.
  """
  for c in range(NUM_CLASSES):
    (root / 'train' / f'class{c}').mkdir(parents=True)
    (root / 'test' / f'class{c}').mkdir(parents=True)
    for k in range(PER_CLASS):
      Image.new('RGB', (SIZE, SIZE), colour(c, k)).save(
          root / 'train' / f'class{c}' / f'img{k}.jpg', quality=95)
  for c in range(NUM_CLASSES):
    for j, source in enumerate((c, (c + 1) % NUM_CLASSES)):
      shutil.copyfile(root / 'train' / f'class{source}' / f'img{c % PER_CLASS}.jpg',
                      root / 'test' / f'class{c}' / f'img{j}.jpg')


def metric_rows(workdir: pathlib.Path) -> list[dict]:
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f]
