"""The grain loader: a global shuffle, batches of positions, O(1) exact resume; no TensorFlow.

Selected by `data.loader = 'grain'` (the default); `input_pipeline` builds the source
(`sources`) and calls `train_batches` / `eval_batches` here, with `augment`'s preprocessing.

Training order: a global shuffle. Global position g (step s holds [s*B, (s+1)*B), B the global
batch) reads example perm_e[g - e*N] of the whole split (N examples, e = g // N), perm_e a
permutation seeded by (seed, e). Process p takes positions [s*B + p*b, s*B + (p+1)*b) of step s
(b = B / process_count). The augmentation of position g is seeded by (seed, g). So the batch of a
step is a function of (seed, step) alone, whatever the number of processes or worker threads, and
resuming at step s is a jump, not a skip (O(1), no iterator state in the checkpoint).

Corrupt images keep their slot: a placeholder marked invalid, replaced on the host by another
image of the batch and counted in `data_skipped`, as with the tf.data loader.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
import numpy as np

from cjepa_jax.data import augment
from cjepa_jax.data import batching
from cjepa_jax.data.spec import DataSpec


# Stream id folded into the order's seeds (each random decision has its own stream).
_ORDER = 1
# Positions are int64; an epoch count this large is never reached.
_STREAM_END = 2 ** 62


class EpochPermutation:
  """g -> the example read at global position g: perm_{g // n}[g % n], perm_e seeded (seed, e).

  Thread-safe; keeps the last two epochs' permutations (a batch may straddle an epoch boundary).
  """

  def __init__(self, seed: int, n: int):
    self._seed, self._n = int(seed), int(n)
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self._seed, _ORDER, epoch]).permutation(self._n)
        perm = perm.astype(np.int64 if self._n >= 2 ** 31 else np.int32)
        self._cache = {e: p for e, p in self._cache.items() if e == epoch - 1}
        self._cache[epoch] = perm
      return perm

  def __call__(self, g: int) -> int:
    epoch, offset = divmod(int(g), self._n)
    return int(self._perm(epoch)[offset])


def local_to_global(k: int, *, local_batch: int, process_index: int, process_count: int) -> int:
  """Element k of a process's stream -> global position (step k // b, slot p * b + k % b)."""
  step, slot = divmod(int(k), local_batch)
  return step * local_batch * process_count + process_index * local_batch + slot


# ------------------------------------------------------------------------------------------------
# Pipelines.
# ------------------------------------------------------------------------------------------------


def _threads(data: DataSpec) -> int:
  workers = int(data.workers)
  if workers > 0:
    return workers
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return 2 * (cores or 1)  # PIL decodes and resizes without the GIL.


def _placeholder(size: int) -> dict[str, Any]:
  return dict(image=np.zeros((size, size, 3), np.float32), label=np.int32(-1),
              valid=np.bool_(False), pos=np.int64(-1), source='')


def _safe(fn: Callable[[dict[str, Any]], np.ndarray], ex: dict[str, Any], pos: int,
          size: int) -> dict[str, Any]:
  """fn(ex) as a valid example, or (any failure: corrupt or unreadable image) a placeholder."""
  try:
    image = fn(ex)
    return dict(image=image, label=np.int32(ex['label']), valid=np.bool_(True),
                pos=np.int64(pos), source=ex['source'])
  except Exception as e:  # pylint: disable=broad-except  (any bad image keeps its slot)
    out = _placeholder(size)
    out['source'] = f'{ex.get("source", pos)} ({type(e).__name__}: {e})'
    return out


def _read(source, index: int) -> dict[str, Any]:
  """source[index], or a stub that fails in preprocessing (an unreadable file keeps its slot)."""
  try:
    return source[index]
  except Exception as e:  # pylint: disable=broad-except
    return dict(encoded=b'', label=-1, source=f'{index} (read failed: {e})')


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Examples -> a batch (invalid slots hold the placeholder's zero image)."""
  return dict(image=np.stack([e['image'] for e in examples]),
              label=np.asarray([e['label'] for e in examples], np.int32),
              valid=np.asarray([e['valid'] for e in examples], bool),
              pos=np.asarray([e['pos'] for e in examples], np.int64),
              source=[e['source'] for e in examples])


def _parallel_batches(fn: Callable[[int], dict[str, Any]], start: int, stop: int,
                      batch: int, data: DataSpec) -> Iterator[dict[str, Any]]:
  """Batches of fn(k) for k in [start, stop), in order: batch j holds k = start + j * batch, ...

  grain maps whole batches (a MapDataset over batch numbers), several at once on its reader
  threads, and yields them in order. Per batch, not per example: one grain element per batch
  keeps grain's per-element bookkeeping off the critical path (it costs as much as decoding a
  CIFAR image), and PIL decodes and resizes without the GIL, so the threads run in parallel.
  """
  import grain.python as grain  # pylint: disable=g-import-not-at-top  (only when used)

  def make(j):
    first = start + j * batch
    return _collate([fn(k) for k in range(first, first + batch)])

  ds = grain.MapDataset.range(0, (stop - start) // batch).map(make)
  threads = _threads(data)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=threads + max(0, int(data.prefetch))))
  return iter(ds)


def train_batches(source, data: DataSpec, *, start_step: int,
                  local_batch: int, process_index: int, process_count: int,
                  infinite_source: bool = False) -> Iterator[dict[str, Any]]:
  """Host-local training batches from step `start_step` on (see the module docstring).

  Yields dict(image=float32 [b, S, S, 3], label=int32 [b], data_skipped=int).
  """
  order = None if infinite_source else EpochPermutation(data.seed, len(source))
  to_global = functools.partial(local_to_global, local_batch=local_batch,
                                process_index=process_index, process_count=process_count)
  pp = augment.Preprocess.from_spec(data)
  seed = int(data.seed)

  def example(k):
    g = to_global(k)
    ex = _read(source, g if order is None else order(g))
    return _safe(lambda e: augment.train_transform(e, seed, g, pp), ex, g, pp.image_size)

  skipped = 0
  for batch in _parallel_batches(example, start_step * local_batch, _STREAM_END, local_batch,
                                 data):
    valid = batch['valid']
    if not valid.all():
      skipped += int((~valid).sum())
      logging.warning('Input pipeline: skipped %d undecodable image(s) (%d so far): %s',
                      int((~valid).sum()), skipped,
                      ', '.join(s for s, v in zip(batch['source'], valid) if not v)[:500])
    yield dict(image=batching.fill_invalid(batch['image'], valid),
               label=batching.fill_invalid(batch['label'], valid), data_skipped=skipped)


def eval_batches(source, data: DataSpec, index: np.ndarray, *, total: int,
                 resize: int, local_batch: int, process_count: int
                 ) -> Iterator[dict[str, Any]]:
  """One pass over `index` (this process's split positions), padded to the common batch count.

  Yields dict(image [b, S, S, 3], label [b], valid [b], pos int32 [b] (-1 on padding),
  data_skipped).
  """
  pp = augment.Preprocess.from_spec(data)
  steps = batching.eval_steps(total, process_count, local_batch)

  def example(k):
    if k >= len(index):
      return _placeholder(pp.image_size)
    pos = int(index[k])
    return _safe(lambda e: augment.eval_transform(e, pp, resize), _read(source, pos), pos,
                 pp.image_size)

  skipped = 0
  for batch in _parallel_batches(example, 0, steps * local_batch, local_batch, data):
    failed = [s for s, v, p in zip(batch['source'], batch['valid'], batch['pos']) if not v and s]
    if failed:
      skipped += len(failed)
      logging.warning('Input pipeline: skipped %d undecodable image(s) (%d so far): %s',
                      len(failed), skipped, ', '.join(failed)[:500])
    yield dict(image=batch['image'], label=batch['label'], valid=batch['valid'],
               pos=batch['pos'].astype(np.int32), data_skipped=skipped)
