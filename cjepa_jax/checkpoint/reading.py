"""Reading a checkpoint by its path, without a manager: its config, its `extra`, a subtree of its
state (the probes' encoder), and `config.init_from`.

A path is a workdir, its `checkpoints/` dir or one step directory (`resolve_checkpoint`). Every
restored array is checked against the checksums recorded at save time (`integrity`). Nothing
here writes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cjepa_jax.checkpoint import errors
from cjepa_jax.checkpoint import integrity
from cjepa_jax.checkpoint import layout
from cjepa_jax.models import jepa


def resolve_checkpoint(path: str) -> tuple[str, int]:
  """Resolves a workdir, its `checkpoints/` dir or one step dir to `(checkpoints_dir, step)`.

  A workdir (or `checkpoints/` dir) resolves to its latest complete step, skipping (with a warning)
  saves that were cut off; a step directory resolves to itself and must be complete.
  """
  p = layout.absolute(path)
  if layout.STEP_RE.match(p.name) and p.is_dir():
    if not layout.is_committed(p):
      raise ValueError(f'{p} is an incomplete checkpoint (no {layout.COMMIT_MARKER}; a save that '
                       'was cut off). Pass its workdir to use the latest complete step instead.')
    return str(p.parent), int(p.name)
  root = p if p.name == layout.CHECKPOINTS_DIR else p / layout.CHECKPOINTS_DIR
  steps = layout.complete_steps(root)
  latest = steps[-1] if steps else None
  for skipped in layout.incomplete_step_dirs(root):
    layout.warn_incomplete(skipped, latest)
  if latest is None:
    raise ValueError(f'No complete checkpoint under {root}; pass a workdir that has '
                     f'{layout.CHECKPOINTS_DIR}/<step>/ (with {layout.COMMIT_MARKER}), or one such '
                     'step directory.')
  return str(root), latest


def load_config(path: str) -> dict[str, Any]:
  """The config saved with a checkpoint (workdir or step dir, as `resolve_checkpoint`) as a dict."""
  root, step = resolve_checkpoint(path)
  config_dir = epath.Path(root) / str(step) / layout.CONFIG_ITEM
  if not config_dir.exists():
    raise ValueError(f'Checkpoint {epath.Path(root) / str(step)} has no {layout.CONFIG_ITEM}/ '
                     'item: it was saved without a config. Pass the config explicitly.')
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    return ckptr.restore(config_dir, args=ocp.args.JsonRestore())


def load_extra(path: str) -> dict[str, Any]:
  """The `extra` dict saved with a checkpoint (workdir or step dir, as `resolve_checkpoint`);
  {} when it has none. Reads only the small meta/ item, and opens no Checkpointer (no writes)."""
  root, step = resolve_checkpoint(path)
  meta = integrity.read_meta(epath.Path(root) / str(step))
  return dict((meta or {}).get('extra') or {})


def restore_subtree(path: str, keys: Sequence[str] = (), *,
                    sharding: jax.sharding.Sharding | None = None) -> Any:
  """Restores only `state[keys[0]][keys[1]]...` of a checkpoint, e.g. the target encoder.

  Reads nothing else (no optimizer state), via orbax's partial restore. For the probes:
  `restore_subtree(workdir, ('target_params',))`.

  Args:
    path: A workdir, its `checkpoints/` dir, or one step directory (see `resolve_checkpoint`).
    keys: Dict keys leading to the subtree; () restores the whole state.
    sharding: Placement of every restored leaf (e.g. replicated over a mesh); default: this
      process's first local device.

  Returns:
    The subtree as nested dicts of jax.Arrays (sequences, e.g. optax states, come back as lists).

  Raises:
    errors.CheckpointIntegrityError: a restored array differs from its recorded checksum, or is not
      finite.
    errors.CheckpointRestoreError: the checkpoint could not be read.
  """
  root, step = resolve_checkpoint(path)
  state_dir = epath.Path(root) / str(step) / layout.STATE_ITEM
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  handler = ocp.PyTreeCheckpointHandler()
  try:
    node = handler.metadata(state_dir).tree
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise errors.restore_error(state_dir.parent, e) from e
  for i, key in enumerate(keys):
    if not isinstance(node, dict) or key not in node:
      where = 'state' + ''.join(f'[{k!r}]' for k in keys[:i])
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise ValueError(f'No key {key!r} in {where} of {state_dir}; available: {have}.')
    node = node[key]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), node)
  for key in reversed(tuple(keys)):
    target = {key: target}
  args = ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)
  try:
    with ocp.Checkpointer(handler) as ckptr:
      restored = ckptr.restore(state_dir, args=args)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise errors.restore_error(state_dir.parent, e) from e
  for key in keys:
    restored = restored[key]
  integrity.verify(state_dir.parent, restored, prefix=keys)
  return restored


def load_init_from(path: str, state: dict[str, Any], shardings: dict[str, Any]
                   ) -> dict[str, Any]:
  """`config.init_from`: another run's (or a converted reference) weights, at step 0.

  Takes `params` (encoder, predictor, and projector when the checkpoint has one) and
  `target_params` from the checkpoint at `path` (a workdir or a step directory); everything else
  in `state` (step, optimizer moments, rng) stays fresh. Shapes must match the current config's
  models; the result is placed with `shardings` (the state's).
  """
  loaded_params = restore_subtree(path, ('params',))
  params = dict(state['params'])
  for name, tree in loaded_params.items():
    if name not in params:
      raise ValueError(f'config.init_from={path!r} has params[{name!r}], which this config does '
                       f'not build (it has {sorted(params)}).')
    params[name] = _place_like(tree, params[name], shardings['params'][name], f'params/{name}')
  out = dict(state, params=params)
  if 'target_params' in state:   # A run without EMA (use_ema=False) keeps no target copy.
    root, step = resolve_checkpoint(path)
    has_target = 'target_params' in ocp.PyTreeCheckpointHandler().metadata(
        epath.Path(root) / str(step) / layout.STATE_ITEM).tree
    # From a run without EMA, the target starts as the online encoder (as a fresh run's does).
    loaded_target = (restore_subtree(path, ('target_params',)) if has_target
                     else loaded_params['encoder'])
    out['target_params'] = _place_like(loaded_target, state['target_params'],
                                       shardings['target_params'], 'target_params')
  logging.info('Initialised %s%s from %s.', sorted(loaded_params),
               ' and target_params' if 'target_params' in state else '', path)
  return out


def _place_like(tree: Any, like: Any, shardings: Any, name: str) -> Any:
  """`tree` placed with `shardings`, after checking it has `like`'s structure and shapes."""
  mismatch = jepa.tree_mismatch(tree, like)
  if mismatch is not None and mismatch.path is None:
    raise ValueError(f'The init_from checkpoint\'s {name} does not have the structure of this '
                     "config's model: check model.variant, model.depth, model.pred_depth and "
                     'model.scan against the checkpoint (its config.json).')
  if mismatch is not None:
    raise ValueError(f'init_from: {name}{mismatch.path} has shape {mismatch.got} in the '
                     f'checkpoint but {mismatch.want} in this model.')
  return jax.tree.map(lambda x, ref, s: jax.device_put(jnp.asarray(x, ref.dtype), s),
                      tree, like, shardings)
