"""Checkpoint integrity: a checksum per array, recorded at save and checked at every restore.

Integrity. `save` computes, on the devices and in one jitted call, a 32-bit checksum per array:
its bits as uint32 words (16- and 8-bit types widened, 64-bit types split in two), each word
times an odd multiplier that depends on its row-major position, `(i * 2654435761 + 1) | 1`,
summed with uint32 wraparound. Integer wraparound sums are exact and order independent, so the
value is the same whatever the mesh or sharding (or host count) the state is saved from or
restored onto. `restore`, `restore_latest` and `restore_subtree` recompute the checksums of what
they read, check that every floating array is finite, and raise `CheckpointIntegrityError` (a
`CheckpointRestoreError`) naming the step directory and the first bad array. Checkpoints without
checksums (saved before this existed) still restore, with a one-time info that they cannot be
verified. `restore_latest` falls back from a damaged newest step to the newest one that
verifies, with a warning, and deletes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cjepa_jax.checkpoint import errors
from cjepa_jax.checkpoint import layout


META_FORMAT = 1


_GOLDEN = 2654435761  # Knuth's multiplicative-hash constant, 2**32 / phi (odd).
_UNVERIFIED_LOGGED: set[str] = set()  # Checkpoints without checksums already reported (info).


# ------------------------------------------------------------------------------------------------
# Checksums.
# ------------------------------------------------------------------------------------------------


def _as_words(x: jax.Array) -> jax.Array:
  """`x`'s bits as uint32 words: one per element (two, on a new last axis, for 64-bit types)."""
  dtype = jnp.dtype(x.dtype)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return _as_words(jax.random.key_data(x))
  if dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if dtype.itemsize == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[dtype.itemsize]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _position_multipliers(shape: tuple[int, ...]) -> jax.Array:
  """`(i * 2654435761 + 1) | 1` (uint32) for each element's row-major flat index i (mod 2**32).

  Built from per-axis iotas rather than a flattened arange, so that XLA shards it like the words
  (no reshape of a sharded array). Odd multipliers never map a non-zero word to zero.
  """
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return (index * jnp.uint32(_GOLDEN) + jnp.uint32(1)) | jnp.uint32(1)


def array_checksum(x: jax.Array) -> jax.Array:
  """A uint32 checksum of `x`'s bits and their positions; the same for every sharding of `x`.

  sum_i words[i] * ((i * 2654435761 + 1) | 1) mod 2**32. Traceable (use it under jit).
  """
  words = _as_words(jnp.asarray(x))
  return jnp.sum(words * _position_multipliers(words.shape), dtype=jnp.uint32)


@jax.jit
def _digest_leaves(leaves: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
  """Every leaf's checksum and whether it is finite (non-floating leaves count as finite)."""
  sums = [array_checksum(x) for x in leaves]
  finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
            for x in leaves]
  return sums, finite


def _key_name(key: Any) -> str:
  for attr in ('key', 'idx', 'name'):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey.
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_name(prefix: Sequence[str], path: Sequence[Any]) -> str:
  """orbax's name for a leaf ('opt_state.0.mu.encoder.kernel'): the same whether namedtuples
  come back as namedtuples (`restore`) or as dicts (`restore_subtree`)."""
  return '.'.join([*map(str, prefix), *(_key_name(k) for k in path)])


@dataclasses.dataclass(frozen=True)
class Digest:
  """Checksums and finiteness of a tree's arrays, by orbax leaf name."""

  checksums: dict[str, int]  # Leaf name -> checksum, in tree order.
  dtypes: dict[str, str]
  nonfinite: list[str]       # Names of floating leaves with a NaN or Inf.


def digest(tree: Any, prefix: Sequence[str] = ()) -> Digest:
  """Checksums and finiteness of every array in `tree`, computed where the arrays live.

  One jitted call per set of devices the leaves live on (one, for a trainer's state), then one
  device_get for all. Non-jax leaves (numpy, Python scalars) are put on the default device.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [_leaf_name(prefix, path) for path, _ in flat]
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
  groups: dict[frozenset, list[int]] = {}
  for i, leaf in enumerate(leaves):
    groups.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
  results = jax.device_get([_digest_leaves([leaves[i] for i in index])
                            for index in groups.values()])
  sums: dict[int, int] = {}
  finite: dict[int, bool] = {}
  for index, (group_sums, group_finite) in zip(groups.values(), results):
    for i, s, f in zip(index, group_sums, group_finite):
      sums[i], finite[i] = int(s), bool(f)
  return Digest(checksums={names[i]: sums[i] for i in range(len(names))},
                 dtypes={names[i]: str(leaves[i].dtype) for i in range(len(names))},
                 nonfinite=[names[i] for i in range(len(names)) if not finite[i]])


def state_checksums(tree: Any) -> dict[str, int]:
  """Checksum (see `array_checksum`) of every array in `tree`, by orbax leaf name."""
  return digest(tree).checksums


# ------------------------------------------------------------------------------------------------
# Reading and checking.
# ------------------------------------------------------------------------------------------------


def read_meta(step_dir: epath.Path) -> dict[str, Any] | None:
  """The step's `meta/` item (checksums, extra), or None for checkpoints saved without one."""
  meta_dir = step_dir / layout.META_ITEM
  if not meta_dir.exists():
    return None
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      meta = ckptr.restore(meta_dir, args=ocp.args.JsonRestore())
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise errors.restore_error(step_dir, e) from e
  if not isinstance(meta, dict):
    raise errors.CheckpointIntegrityError(
        f'Checkpoint {step_dir} failed its integrity check: {meta_dir} holds a '
        f'{type(meta).__name__}, not a dict. {errors.fallback_hint(step_dir)}')
  return meta


def verify(step_dir: epath.Path, tree: Any, prefix: Sequence[str] = ()) -> None:
  """Raises errors.CheckpointIntegrityError unless `tree` (restored from `step_dir`) is as saved.

  Checks every leaf against its recorded checksum (when recorded, with the same dtype: a restore
  that casts cannot be compared) and that every floating leaf is finite.
  """
  meta = read_meta(step_dir)
  restored = digest(tree, prefix)
  recorded = (meta or {}).get('checksums')
  if recorded is None:
    if str(step_dir) not in _UNVERIFIED_LOGGED:
      _UNVERIFIED_LOGGED.add(str(step_dir))
      logging.info('Checkpoint %s has no recorded checksums (saved before they existed): its '
                   'arrays are checked for NaN/Inf only.', step_dir)
  else:
    dtypes = meta.get('dtypes', {})
    for name, got in restored.checksums.items():
      want = recorded.get(name)
      if want is None or dtypes.get(name, restored.dtypes[name]) != restored.dtypes[name]:
        continue  # Not recorded, or restored as another dtype: nothing to compare against.
      if int(want) != got:
        raise errors.CheckpointIntegrityError(
            f'Checkpoint {step_dir} failed its integrity check: array {name} has checksum '
            f'{got:#010x} but {int(want):#010x} was recorded when it was saved (its files changed '
            f'after the save). {errors.fallback_hint(step_dir)}')
  if restored.nonfinite:
    raise errors.CheckpointIntegrityError(
        f'Checkpoint {step_dir} failed its integrity check: array {restored.nonfinite[0]} holds NaN '
        f'or Inf (saved from a diverged run; {len(restored.nonfinite)} such array(s)). '
        f'{errors.fallback_hint(step_dir)}')
