"""Host-side batch arithmetic both loaders share: the local batch, the evaluation pass length,
and the fill of the slots whose image failed to decode (so a batch keeps its static size)."""

from __future__ import annotations

import numpy as np


def local_batch(batch_size: int, process_count: int) -> int:
  """The per-process batch of a global `batch_size`; ValueError naming the fix unless it divides."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f'The global batch size {batch_size} must be a positive multiple of the number of '
        f'processes ({process_count}); change config.batch_size.')
  return batch_size // process_count


def ceil_div(a: int, b: int) -> int:
  """ceil(a / b) for positive integers, exactly."""
  return -(-a // b)


def eval_steps(total: int, process_count: int, batch: int) -> int:
  """Batches of an evaluation pass on every process: those of the process with the most
  examples (ceil(ceil(total / process_count) / batch), `batch` the local batch), so that
  collective evaluation steps line up across processes."""
  return ceil_div(ceil_div(total, process_count), batch)


def fill_invalid(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Slots with valid = False take, in turn, the values of the valid slots (static batch size)."""
  if valid.all() or not valid.any():
    return x
  good = np.flatnonzero(valid)
  bad = np.flatnonzero(~valid)
  x = x.copy()
  x[bad] = x[good[np.arange(bad.size) % good.size]]
  return x
