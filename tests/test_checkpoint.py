"""Tests for cjepa_jax.checkpoint: exact round trips, retention, cut-off saves, resharding."""

import gc
import json
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from cjepa_jax import checkpoint as ckpt_lib
from cjepa_jax.config import default_config


def _make_state(seed: int = 0) -> dict:
  """A small train state like the trainer's: params, EMA target params, an AdamW state, step."""
  rng = np.random.default_rng(seed)
  params = {
      'encoder': {'kernel': rng.standard_normal((8, 4)).astype(np.float32),
                  'bias': rng.standard_normal((4,)).astype(np.float32)},
      'predictor': {'scale': rng.standard_normal((8,)).astype(np.float32)},
  }
  params = jax.device_put(params, jax.devices()[0])
  tx = optax.adamw(1e-2, weight_decay=0.05)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.cos(p) * 0.5, params)
  updates, opt_state = tx.update(grads, opt_state, params)  # Non-zero mu, nu, count = 1.
  params = optax.apply_updates(params, updates)
  target = jax.tree.map(lambda p: p * 0.9, params)
  return {'step': jnp.asarray(7, jnp.int32), 'params': params, 'target_params': target,
          'opt_state': opt_state}


def _numpy_copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_equal(tree, expected):
  assert jax.tree.structure(tree) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), want)


def _abstract(state, sharding_fn):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)),
      jax.eval_shape(lambda: state))


def _single_device(x):
  del x
  return SingleDeviceSharding(jax.devices()[0])


def _warnings(caplog):
  return '\n'.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_round_trip_exact_with_adamw_state(tmp_path):
  state = _make_state()
  expected = _numpy_copy(state)
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, force=True)
    restored = ckpt.restore(None, _abstract(state, _single_device))
  # Same tree structure, namedtuple types included (ScaleByAdamState, EmptyState, ...).
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert type(restored['opt_state'][0]).__name__ == 'ScaleByAdamState'
  assert int(restored['opt_state'][0].count) == 1
  _assert_equal(restored, expected)
  assert (tmp_path / 'checkpoints' / '7' / 'commit_success.txt').exists()


def test_async_save_then_wait_survives_donated_buffers(tmp_path):
  state = _make_state(1)
  expected = _numpy_copy(state)
  abstract = _abstract(state, _single_device)
  with ckpt_lib.Checkpointer(str(tmp_path), save_every_steps=5) as ckpt:
    assert not ckpt.save(3, state)          # Not a multiple of save_every_steps.
    assert ckpt.save(5, state)
    # The trainer donates the state to the next step: the device buffers die right away.
    for leaf in jax.tree.leaves(state):
      leaf.delete()
    ckpt.wait()
    assert ckpt.latest_step() == 5
    assert not ckpt.save(5, expected, force=True)  # Already saved: left alone.
    _assert_equal(ckpt.restore(5, abstract), expected)


def test_retention_keeps_latest_and_permanent(tmp_path):
  state = {'w': jnp.arange(3.0)}
  with ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_every_steps=4, save_every_steps=2,
                             async_save=False) as ckpt:
    saved = [s for s in range(1, 13) if ckpt.save(s, jax.tree.map(lambda x: x + s, state))]
    assert saved == [2, 4, 6, 8, 10, 12]
    assert ckpt.save(13, state, force=True)
    # Latest two (12, 13) plus the permanent multiples of 4 (4, 8, 12).
    assert ckpt.all_steps() == [4, 8, 12, 13]
    assert ckpt.latest_step() == 13
    restored = ckpt.restore(8, _abstract(state, _single_device))
  np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(3.0) + 8)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['12', '13', '4', '8']


def test_keep_two_without_permanent(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path), keep=2, save_every_steps=1, async_save=False) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, {'w': jnp.zeros(2)})
    assert ckpt.all_steps() == [2, 3]


def test_cut_off_saves_are_skipped_with_a_warning(tmp_path, caplog):
  state = {'w': jnp.arange(4.0)}
  root = tmp_path / 'checkpoints'
  with ckpt_lib.Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
    ckpt.save(20, state)
    ckpt.save(30, jax.tree.map(lambda x: x * 3, state))
  # A save cut off before orbax's rename, and a step directory without orbax's commit marker.
  tmp_dir = root / '50.orbax-checkpoint-tmp-123'
  (tmp_dir / 'state').mkdir(parents=True)
  junk_dir = root / '40'
  junk_dir.mkdir()
  (junk_dir / 'junk').write_text('half a checkpoint')
  caplog.set_level(logging.WARNING)
  with ckpt_lib.Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
    assert ckpt.latest_step() == 30
    assert ckpt.all_steps() == [20, 30]
    text = _warnings(caplog)
    assert str(tmp_dir) in text and str(junk_dir) in text and 'step 30' in text
    restored = ckpt.restore(None, _abstract(state, _single_device))
    np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(4.0) * 3)
    # Saving over the cut-off step directory is refused with the fix; nothing is deleted.
    with pytest.raises(ValueError, match=r'40.*not a complete checkpoint.*delete'):
      ckpt.save(40, state)
    assert (junk_dir / 'junk').exists() and tmp_dir.exists()
  assert ckpt_lib.resolve_checkpoint(str(tmp_path)) == (str(root), 30)
  with pytest.raises(ValueError, match='incomplete checkpoint'):
    ckpt_lib.resolve_checkpoint(str(junk_dir))


def test_restore_onto_eight_devices_and_back(tmp_path):
  assert jax.device_count() == 8
  dev0 = jax.devices()[0]
  state = {'emb': jax.device_put(np.arange(8 * 3, dtype=np.float32).reshape(8, 3), dev0),
           'scale': jax.device_put(np.float32([0.5, -2.0]), dev0),
           'step': jax.device_put(np.int32(11), dev0)}
  expected = _numpy_copy(state)
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(11, state, force=True)

  mesh = jax.make_mesh((8,), ('data',))
  sharded = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    abstract = _abstract(state, lambda x: sharded if x.ndim and x.shape[0] == 8 else replicated)
    restored = ckpt.restore(None, abstract)
    _assert_equal(restored, expected)
    assert restored['emb'].sharding == sharded
    assert restored['scale'].sharding == replicated
    shards = sorted(restored['emb'].addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8
    for i, shard in enumerate(shards):  # Row i lives on the i-th device of the mesh.
      np.testing.assert_array_equal(np.asarray(shard.data), expected['emb'][i:i + 1])
    # Save from the 8-device placement, then restore onto a single device again.
    ckpt.save(12, restored, force=True)
    ckpt.wait()
    back = ckpt.restore(12, _abstract(state, _single_device))
  _assert_equal(back, expected)
  assert back['emb'].sharding == SingleDeviceSharding(dev0)


def test_abstract_state_needs_shardings(tmp_path):
  state = {'w': jnp.ones(2)}
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state, force=True)
    with pytest.raises(ValueError, match=r"\['w'\] has no sharding"):
      ckpt.restore(1, jax.eval_shape(lambda: state))
    # Live arrays are a valid target: their shapes and placements are used.
    np.testing.assert_array_equal(np.asarray(ckpt.restore(1, {'w': jnp.zeros(2)})['w']), [1, 1])
    with pytest.raises(ValueError, match='No complete checkpoint for step 2'):
      ckpt.restore(2, state)


def test_config_json_round_trip(tmp_path):
  config = default_config()
  config.model.variant = 'Ti/16'
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(3, {'w': jnp.zeros(1)}, config, force=True)
    saved = ckpt.restore_config(3)
  assert saved == ckpt_lib.load_config(str(tmp_path))
  assert saved['model']['variant'] == 'Ti/16'
  assert saved['optim']['lr'] == 1e-3 and saved['batch_size'] == 2048
  assert saved['data']['crop_scale'] == [0.3, 1.0]  # JSON: tuples come back as lists.
  assert json.loads(config.to_json()) == saved
  # Rebuilds a ConfigDict with every key the run had.
  rebuilt = ml_collections.ConfigDict(saved)
  assert sorted(rebuilt.keys()) == sorted(config.keys())
  assert rebuilt.mask.npred == config.mask.npred


def _corrupt_arrays(step_dir: pathlib.Path):
  """Garbles the second half of every OCDBT data file of the state item."""
  files = [f for f in (step_dir / 'state').rglob('*') if f.is_file() and f.parent.name == 'd']
  assert files
  for f in files:
    data = bytearray(f.read_bytes())
    data[len(data) // 2:] = bytes(255 - b for b in data[len(data) // 2:])
    f.write_bytes(bytes(data))


# A failed tensorstore read leaves callbacks aimed at orbax's closed per-call event loop (noise from
# orbax internals, not from this module).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
  state = _make_state(2)
  with ckpt_lib.Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
    ckpt.save(10, state)
    ckpt.save(20, state)
  step_dir = tmp_path / 'checkpoints' / '20'
  _corrupt_arrays(step_dir)
  with ckpt_lib.Checkpointer(str(tmp_path), save_every_steps=10) as ckpt:
    assert ckpt.latest_step() == 20  # Committed, so still the latest: only reading finds it.
    with pytest.raises(ckpt_lib.CheckpointRestoreError) as info:
      ckpt.restore(None, _abstract(state, _single_device))
    message = str(info.value)
    assert f'Could not restore checkpoint {step_dir}' in message
    assert f'delete {step_dir}' in message and 'previous complete checkpoint (step 10)' in message
    assert step_dir.exists()  # Never deleted automatically.
    _assert_equal(ckpt.restore(10, _abstract(state, _single_device)), _numpy_copy(state))
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match='step 10'):
    ckpt_lib.restore_subtree(str(tmp_path), ('params',))
  gc.collect()  # Reports the orbax noise above here, under this test's filter.


def test_resolve_checkpoint(tmp_path):
  with pytest.raises(ValueError, match='No complete checkpoint under'):
    ckpt_lib.resolve_checkpoint(str(tmp_path))
  with ckpt_lib.Checkpointer(str(tmp_path), save_every_steps=5, async_save=False) as ckpt:
    ckpt.save(5, {'w': jnp.zeros(1)})
    ckpt.save(10, {'w': jnp.zeros(1)})
  root = str(tmp_path / 'checkpoints')
  assert ckpt_lib.resolve_checkpoint(str(tmp_path)) == (root, 10)
  assert ckpt_lib.resolve_checkpoint(root) == (root, 10)
  assert ckpt_lib.resolve_checkpoint(str(tmp_path / 'checkpoints' / '5')) == (root, 5)


def test_restore_subtree_reads_only_the_requested_part(tmp_path):
  state = _make_state(3)
  expected = _numpy_copy(state)
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(4, state, force=True)
  encoder = ckpt_lib.restore_subtree(str(tmp_path), ('target_params', 'encoder'))
  _assert_equal(encoder, expected['target_params']['encoder'])
  assert encoder['kernel'].sharding == SingleDeviceSharding(jax.local_devices()[0])
  mesh = jax.make_mesh((8,), ('data',))
  params = ckpt_lib.restore_subtree(str(tmp_path / 'checkpoints' / '4'), ('params',),
                                    sharding=NamedSharding(mesh, P()))
  _assert_equal(params, expected['params'])
  assert params['predictor']['scale'].sharding == NamedSharding(mesh, P())
  with pytest.raises(ValueError, match=r"No key 'decoder' in state\['params'\].*encoder"):
    ckpt_lib.restore_subtree(str(tmp_path), ('params', 'decoder'))


def test_relative_workdir_is_taken_from_the_current_directory(tmp_path, monkeypatch):
  """`--workdir runs/x` (as in the README) works: orbax itself only accepts absolute paths."""
  monkeypatch.chdir(tmp_path)
  state = {'w': jnp.arange(4.0)}
  with ckpt_lib.Checkpointer('runs/rel', async_save=False) as c:
    assert c.save(3, state, force=True)
  assert (tmp_path / 'runs' / 'rel' / 'checkpoints' / '3').is_dir()
  root, step = ckpt_lib.resolve_checkpoint('runs/rel')
  assert step == 3 and root == str(tmp_path / 'runs' / 'rel' / 'checkpoints')
  np.testing.assert_array_equal(np.asarray(ckpt_lib.restore_subtree('runs/rel', ('w',))),
                                np.arange(4.0))
