"""Tests for cjepa_jax.checkpoint: exact round trips, retention, cut-off saves, resharding."""

import contextlib
import gc
import json
import logging
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from cjepa_jax.checkpoint import errors as ckpt_errors
from cjepa_jax.checkpoint import integrity as ckpt_integrity
from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax.checkpoint import reading as ckpt_reading
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
  with ckpt_manager.Checkpointer(str(tmp_path), async_save=False) as ckpt:
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
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=5) as ckpt:
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
  with ckpt_manager.Checkpointer(str(tmp_path), keep=2, keep_every_steps=4, save_every_steps=2,
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
  with ckpt_manager.Checkpointer(str(tmp_path), keep=2, save_every_steps=1,
                                 async_save=False) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, {'w': jnp.zeros(2)})
    assert ckpt.all_steps() == [2, 3]


def test_cut_off_saves_are_skipped_with_a_warning(tmp_path, caplog):
  state = {'w': jnp.arange(4.0)}
  root = tmp_path / 'checkpoints'
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
    ckpt.save(20, state)
    ckpt.save(30, jax.tree.map(lambda x: x * 3, state))
  # A save cut off before orbax's rename, and a step directory without orbax's commit marker.
  tmp_dir = root / '50.orbax-checkpoint-tmp-123'
  (tmp_dir / 'state').mkdir(parents=True)
  junk_dir = root / '40'
  junk_dir.mkdir()
  (junk_dir / 'junk').write_text('half a checkpoint')
  caplog.set_level(logging.WARNING)
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
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
  assert ckpt_reading.resolve_checkpoint(str(tmp_path)) == (str(root), 30)
  with pytest.raises(ValueError, match='incomplete checkpoint'):
    ckpt_reading.resolve_checkpoint(str(junk_dir))


def test_restore_onto_eight_devices_and_back(tmp_path):
  assert jax.device_count() == 8
  dev0 = jax.devices()[0]
  state = {'emb': jax.device_put(np.arange(8 * 3, dtype=np.float32).reshape(8, 3), dev0),
           'scale': jax.device_put(np.float32([0.5, -2.0]), dev0),
           'step': jax.device_put(np.int32(11), dev0)}
  expected = _numpy_copy(state)
  with ckpt_manager.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(11, state, force=True)

  mesh = jax.make_mesh((8,), ('data',))
  sharded = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  with ckpt_manager.Checkpointer(str(tmp_path)) as ckpt:
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
  with ckpt_manager.Checkpointer(str(tmp_path), async_save=False) as ckpt:
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
  with ckpt_manager.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(3, {'w': jnp.zeros(1)}, config, force=True)
    saved = ckpt.restore_config(3)
  assert saved == ckpt_reading.load_config(str(tmp_path))
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
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
    ckpt.save(10, state)
    ckpt.save(20, state)
  step_dir = tmp_path / 'checkpoints' / '20'
  _corrupt_arrays(step_dir)
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=10) as ckpt:
    assert ckpt.latest_step() == 20  # Committed, so still the latest: only reading finds it.
    with pytest.raises(ckpt_errors.CheckpointRestoreError) as info:
      ckpt.restore(None, _abstract(state, _single_device))
    message = str(info.value)
    assert f'Could not restore checkpoint {step_dir}' in message
    assert f'delete {step_dir}' in message and 'previous complete checkpoint (step 10)' in message
    assert step_dir.exists()  # Never deleted automatically.
    _assert_equal(ckpt.restore(10, _abstract(state, _single_device)), _numpy_copy(state))
  with pytest.raises(ckpt_errors.CheckpointRestoreError, match='step 10'):
    ckpt_reading.restore_subtree(str(tmp_path), ('params',))
  gc.collect()  # Reports the orbax noise above here, under this test's filter.


def test_resolve_checkpoint(tmp_path):
  with pytest.raises(ValueError, match='No complete checkpoint under'):
    ckpt_reading.resolve_checkpoint(str(tmp_path))
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=5, async_save=False) as ckpt:
    ckpt.save(5, {'w': jnp.zeros(1)})
    ckpt.save(10, {'w': jnp.zeros(1)})
  root = str(tmp_path / 'checkpoints')
  assert ckpt_reading.resolve_checkpoint(str(tmp_path)) == (root, 10)
  assert ckpt_reading.resolve_checkpoint(root) == (root, 10)
  assert ckpt_reading.resolve_checkpoint(str(tmp_path / 'checkpoints' / '5')) == (root, 5)


def test_restore_subtree_reads_only_the_requested_part(tmp_path):
  state = _make_state(3)
  expected = _numpy_copy(state)
  with ckpt_manager.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(4, state, force=True)
  encoder = ckpt_reading.restore_subtree(str(tmp_path), ('target_params', 'encoder'))
  _assert_equal(encoder, expected['target_params']['encoder'])
  assert encoder['kernel'].sharding == SingleDeviceSharding(jax.local_devices()[0])
  mesh = jax.make_mesh((8,), ('data',))
  params = ckpt_reading.restore_subtree(str(tmp_path / 'checkpoints' / '4'), ('params',),
                                        sharding=NamedSharding(mesh, P()))
  _assert_equal(params, expected['params'])
  assert params['predictor']['scale'].sharding == NamedSharding(mesh, P())
  with pytest.raises(ValueError, match=r"No key 'decoder' in state\['params'\].*encoder"):
    ckpt_reading.restore_subtree(str(tmp_path), ('params', 'decoder'))


def test_relative_workdir_is_taken_from_the_current_directory(tmp_path, monkeypatch):
  """`--workdir runs/x` (as in the README) works: orbax itself only accepts absolute paths."""
  monkeypatch.chdir(tmp_path)
  state = {'w': jnp.arange(4.0)}
  with ckpt_manager.Checkpointer('runs/rel', async_save=False) as c:
    assert c.save(3, state, force=True)
  assert (tmp_path / 'runs' / 'rel' / 'checkpoints' / '3').is_dir()
  root, step = ckpt_reading.resolve_checkpoint('runs/rel')
  assert step == 3 and root == str(tmp_path / 'runs' / 'rel' / 'checkpoints')
  np.testing.assert_array_equal(np.asarray(ckpt_reading.restore_subtree('runs/rel', ('w',))),
                                np.arange(4.0))


# Writable check at start-up ----------------------------------------------------------------------


def test_unwritable_workdir_fails_at_start_with_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(ckpt_errors.CheckpointWriteError) as info:
    ckpt_manager.Checkpointer(str(blocker / 'run'))
  message = str(info.value)
  assert '\n' not in message
  assert f'Checkpoint directory {blocker / "run" / "checkpoints"} is not writable' in message
  assert 'Not a directory' in message and 'pass a --workdir on a writable disk' in message
  assert isinstance(info.value, ValueError)  # The trainer's one-line handling catches it.


def _mount_tmpfs(path: pathlib.Path, options: str) -> None:
  """Mounts a tmpfs at `path`, or skips the test where mounting is not allowed."""
  path.mkdir(parents=True, exist_ok=True)
  try:
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                            capture_output=True, check=False)
  except OSError as e:  # No mount binary.
    pytest.skip(f'cannot mount a tmpfs here: {e}')
  if result.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {result.stderr.decode().strip()}')


def test_read_only_workdir_fails_at_start(tmp_path):
  mount = tmp_path / 'ro'
  _mount_tmpfs(mount, 'ro,size=64k')
  try:
    with pytest.raises(ckpt_errors.CheckpointWriteError, match=r'ro/checkpoints is not writable: '
                       r'\[Errno 30\] Read-only file system'):
      ckpt_manager.Checkpointer(str(mount))
  finally:
    subprocess.run(['umount', str(mount)], check=True)


# Failed saves ------------------------------------------------------------------------------------


def _new_threads_finish(before: set[threading.Thread], timeout: float = 15.0) -> list[str]:
  """Names of threads started since `before` that are still alive after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  for thread in set(threading.enumerate()) - before:
    if not thread.daemon:
      thread.join(max(0.0, deadline - time.monotonic()))
  return [t.name for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]


def _assert_save_error(error: Exception, step_dir: pathlib.Path, last: int, os_text: str):
  message = str(error)
  assert isinstance(error, ckpt_errors.CheckpointSaveError) and isinstance(error, ValueError)
  assert '\n' not in message and len(message) < 700, message
  assert f'Saving checkpoint {step_dir} failed' in message and os_text in message
  assert f'the last complete checkpoint (step {last}) is untouched' in message
  assert 'Traceback' not in message and 'File "' not in message and 'tensorstore' not in message


def test_save_into_a_vanished_directory_fails_at_once(tmp_path):
  """The checkpoints dir is replaced by a file: the save fails in `save`, with no 300 s hang."""
  state = {'w': jnp.arange(1000.0)}
  root = tmp_path / 'checkpoints'
  ckpt = ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=1)
  assert ckpt.save(1, state)
  ckpt.wait()
  moved = tmp_path / 'moved'
  root.rename(moved)
  root.write_text('in the way')
  before = set(threading.enumerate())
  start = time.monotonic()
  with pytest.raises(ckpt_errors.CheckpointSaveError) as info:
    ckpt.save(2, state)
  ckpt.check()  # Nothing more to report.
  ckpt.close()
  assert time.monotonic() - start < 30
  _assert_save_error(info.value, root / '2', 1, 'Not a directory')
  # orbax's writer threads used to wait 300 s here for a directory-creation signal.
  assert not _new_threads_finish(before)
  root.unlink()
  moved.rename(root)
  with ckpt_manager.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.all_steps() == [1]
    np.testing.assert_array_equal(
        np.asarray(ckpt.restore(1, _abstract(state, _single_device))['w']), np.arange(1000.0))


@contextlib.contextmanager
def _file_size_limit(limit: int):
  """Writes past `limit` bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored meanwhile)."""
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize('surfaced_by', ['check', 'wait', 'save'])
def test_background_write_failure_is_raised_promptly(tmp_path, surfaced_by):
  rng = np.random.default_rng(0)
  state = {'w': jnp.asarray(rng.standard_normal(256 * 1024).astype(np.float32))}  # 1 MiB.
  root = tmp_path / 'checkpoints'
  ckpt = ckpt_manager.Checkpointer(str(tmp_path), keep=1, save_every_steps=1)
  assert ckpt.save(1, state)
  ckpt.wait()
  before = set(threading.enumerate())
  start = time.monotonic()
  # Far above what this test logs meanwhile (pytest captures output in files), far below 1 MiB.
  with _file_size_limit(256 * 1024):
    assert ckpt.save(2, state)  # The directories are made; the array write fails later.
    with pytest.raises(ckpt_errors.CheckpointSaveError) as info:
      if surfaced_by == 'check':
        while time.monotonic() - start < 30:  # What the trainer does every step.
          ckpt.check()
          time.sleep(0.05)
      elif surfaced_by == 'wait':
        ckpt.wait()
      else:
        ckpt.save(3, state)
  assert time.monotonic() - start < 30
  _assert_save_error(info.value, root / '2', 1, 'File too large')
  ckpt.check()  # Reported once.
  ckpt.close()
  assert not _new_threads_finish(before)
  # keep=1, yet the failed save removed nothing: step 1 is complete and restores.
  with ckpt_manager.Checkpointer(str(tmp_path), keep=1, save_every_steps=1) as ckpt:
    assert ckpt.all_steps() == [1]
    _assert_equal(ckpt.restore(1, _abstract(state, _single_device)), _numpy_copy(state))
    assert [pathlib.Path(p).name.split('.')[0] for p in ckpt.report_incomplete()] == ['2']
    assert ckpt.save(2, state)  # With space again, the same step saves.
  assert ckpt_reading.resolve_checkpoint(str(tmp_path)) == (str(root), 2)


# Integrity ---------------------------------------------------------------------------------------


def _np_checksum(x: np.ndarray) -> int:
  """Independent reference: uint64 arithmetic, reduced mod 2**32."""
  x = np.asarray(x)
  words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
  words = words.astype(np.uint64).ravel()
  i = np.arange(words.size, dtype=np.uint64)
  mult = ((i * np.uint64(2654435761) + np.uint64(1)) % np.uint64(2**32)) | np.uint64(1)
  return int(((words * mult) % np.uint64(2**32)).sum() % np.uint64(2**32))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint32, jnp.float16,
                                   jnp.int8, jnp.bool_])
def test_checksum_matches_numpy_and_any_sharding(dtype):
  rng = np.random.default_rng(1)
  host = np.asarray(jnp.asarray(rng.standard_normal((16, 24)) * 100, dtype=dtype))
  if dtype == jnp.uint32:
    host = rng.integers(0, 2**32, (16, 24), dtype=np.uint64).astype(np.uint32)
  want = _np_checksum(host)
  single = jax.device_put(host, jax.devices()[0])
  assert ckpt_integrity.state_checksums({'x': single}) == {'x': want}
  mesh = jax.make_mesh((8,), ('data',))
  mesh2d = jax.make_mesh((4, 2), ('a', 'b'))
  for sharding in (NamedSharding(mesh, P('data')), NamedSharding(mesh, P(None, 'data')),
                   NamedSharding(mesh, P()), NamedSharding(mesh2d, P('a', 'b')),
                   NamedSharding(mesh2d, P('b', 'a'))):
    sharded = jax.device_put(host, sharding)
    assert int(jax.jit(ckpt_integrity.array_checksum)(sharded)) == want, sharding
  # Position-dependent: swapping two different elements changes it.
  swapped = host.copy()
  swapped[0, 0], swapped[3, 5] = host[3, 5], host[0, 0]
  if host[0, 0] != host[3, 5]:
    assert _np_checksum(swapped) != want
    assert ckpt_integrity.state_checksums({'x': jnp.asarray(swapped)})['x'] != want


def test_checksum_of_a_state_saved_sharded_verifies_on_one_device(tmp_path):
  mesh = jax.make_mesh((8,), ('data',))
  state = {'emb': jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8),
                                 NamedSharding(mesh, P('data'))),
           'half': jax.device_put(jnp.linspace(0, 1, 16, dtype=jnp.bfloat16),
                                  NamedSharding(mesh, P('data')))}
  with ckpt_manager.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state, force=True)
    restored = ckpt.restore(1, _abstract(state, _single_device))  # Verified on the way.
  assert ckpt_integrity.state_checksums(restored) == ckpt_integrity.state_checksums(state)


def _flip_middle_of_largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [f for f in (step_dir / 'state').rglob('*') if f.is_file() and f.parent.name == 'd']
  largest = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(largest.read_bytes())
  for i in range(len(data) // 2 - 4, len(data) // 2 + 4):
    data[i] ^= 0xFF
  largest.write_bytes(bytes(data))  # Same size.
  return largest


def _edit_checksum(step_dir: pathlib.Path, name: str, delta: int = 1) -> None:
  """Changes one recorded checksum (JSON) by `delta`: the arrays' own files stay intact."""
  meta_file = step_dir / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  meta['checksums'][name] = (meta['checksums'][name] + delta) % 2**32
  meta_file.write_text(json.dumps(meta))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupted_data_file_fails_and_restore_latest_falls_back(tmp_path, caplog):
  state = _make_state(4)
  # A 16 KiB leaf: its data file is the largest, so the flipped bytes land in array data.
  state['params']['embed'] = jnp.asarray(
      np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32))
  abstract = _abstract(state, _single_device)
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
    ckpt.save(10, state)
    ckpt.save(20, jax.tree.map(lambda x: x + 1, state))
  step_dir = tmp_path / 'checkpoints' / '20'
  before = sorted(str(p) for p in (tmp_path / 'checkpoints').rglob('*'))
  _flip_middle_of_largest_file(step_dir)
  caplog.set_level(logging.WARNING)
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=10) as ckpt:
    # The decompressor may notice first (a read error); otherwise the checksums do.
    with pytest.raises(ckpt_errors.CheckpointRestoreError,
                       match=f'(?i)checkpoint {step_dir}') as info:
      ckpt.restore(20, abstract)
    if isinstance(info.value, ckpt_errors.CheckpointIntegrityError):
      assert 'array params.embed has checksum' in str(info.value)
    step, restored = ckpt.restore_latest(abstract)
  assert step == 10
  _assert_equal(restored, _numpy_copy(state))
  assert f'Not resuming from {step_dir}' in _warnings(caplog)
  # The damaged step is moved aside (so the run can save step 20 again), never deleted.
  moved, = (tmp_path / 'checkpoints').glob('20.damaged-*')
  assert f'moved aside to {moved}' in _warnings(caplog)
  after = sorted(str(p).replace(str(moved), str(step_dir))
                 for p in (tmp_path / 'checkpoints').rglob('*'))
  assert after == before
  gc.collect()


def test_changed_checksum_gives_an_integrity_error(tmp_path, caplog):
  state = _make_state(5)
  abstract = _abstract(state, _single_device)
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
    ckpt.save(10, state)
    ckpt.save(20, state)
  step_dir = tmp_path / 'checkpoints' / '20'
  _edit_checksum(step_dir, 'params.encoder.kernel')
  caplog.set_level(logging.WARNING)
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=10) as ckpt:
    with pytest.raises(ckpt_errors.CheckpointIntegrityError) as info:
      ckpt.restore(20, abstract)
    message = str(info.value)
    assert '\n' not in message
    assert (f'Checkpoint {step_dir} failed its integrity check: array params.encoder.kernel '
            'has checksum') in message
    assert 'previous complete checkpoint (step 10)' in message
  # Probes restoring the damaged part are stopped too; an intact part still restores.
  with pytest.raises(ckpt_errors.CheckpointIntegrityError, match='params.encoder.kernel'):
    ckpt_reading.restore_subtree(str(tmp_path), ('params',))
  _assert_equal(ckpt_reading.restore_subtree(str(tmp_path), ('target_params',)),
                _numpy_copy(state['target_params']))
  # An optax namedtuple leaf is named the same whether restored as a namedtuple (`restore`) or as
  # a dict (`restore_subtree`).
  _edit_checksum(step_dir, 'params.encoder.kernel', -1)  # Back as it was.
  _edit_checksum(step_dir, 'opt_state.0.mu.encoder.bias')
  with pytest.raises(ckpt_errors.CheckpointIntegrityError,
                     match=r'opt_state\.0\.mu\.encoder\.bias'):
    ckpt_reading.restore_subtree(str(tmp_path), ('opt_state',))
  with ckpt_manager.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(ckpt_errors.CheckpointIntegrityError,
                       match=r'opt_state\.0\.mu\.encoder\.bias'):
      ckpt.restore(20, abstract)
  _assert_equal(ckpt_reading.restore_subtree(str(tmp_path), ('params',)),
                _numpy_copy(state['params']))
  with ckpt_manager.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.restore_latest(abstract)[0] == 10
  assert 'opt_state.0.mu.encoder.bias' in _warnings(caplog)


def test_non_finite_state_is_reported_on_restore(tmp_path, caplog):
  state = {'w': jnp.asarray([1.0, jnp.nan, 3.0]), 'n': jnp.arange(3)}
  caplog.set_level(logging.WARNING)
  with ckpt_manager.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state, force=True)
    assert 'NaN/Inf in w' in _warnings(caplog)
    with pytest.raises(ckpt_errors.CheckpointIntegrityError, match=r'array w holds NaN or Inf'):
      ckpt.restore(1, _abstract(state, _single_device))
    with pytest.raises(ckpt_errors.CheckpointRestoreError, match=r'could be restored \(step 1: .*'
                       r'array w holds NaN'):
      ckpt.restore_latest(_abstract(state, _single_device))


def test_extra_round_trip_and_old_checkpoints_without_meta(tmp_path, caplog):
  state = {'w': jnp.arange(4.0)}
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=1, async_save=False) as ckpt:
    assert ckpt.restore_latest(_abstract(state, _single_device)) == (None, None)
    ckpt.save(1, state, extra={'data_skipped': 3})
    ckpt.save(2, state)
    assert ckpt.restore_extra(1) == {'data_skipped': 3}
    assert ckpt.restore_extra() == {}
  # A checkpoint saved before checksums existed: no meta/ item.
  shutil.rmtree(tmp_path / 'checkpoints' / '2' / 'meta')
  caplog.set_level(logging.INFO)
  with ckpt_manager.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.restore_extra(2) == {}
    step, restored = ckpt.restore_latest(_abstract(state, _single_device))
  assert step == 2
  np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(4.0))
  assert any('has no recorded checksums' in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(np.asarray(ckpt_reading.restore_subtree(str(tmp_path), ('w',))),
                                np.arange(4.0))


# Incomplete step directories ---------------------------------------------------------------------


def test_report_incomplete_moves_cut_off_saves_aside(tmp_path, caplog):
  state = {'w': jnp.arange(4.0)}
  root = tmp_path / 'checkpoints'
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=1, async_save=False) as ckpt:
    ckpt.save(5, state)
  cut = root / '7'
  cut.mkdir()
  (cut / 'junk').write_text('half a checkpoint')
  tmp_dir = root / '9.orbax-checkpoint-tmp-123'
  (tmp_dir / 'state').mkdir(parents=True)
  caplog.set_level(logging.WARNING)
  with ckpt_manager.Checkpointer(str(tmp_path), save_every_steps=1, async_save=False) as ckpt:
    moved = [pathlib.Path(p) for p in ckpt.report_incomplete()]
    assert [p.parent for p in moved] == [root, root]
    assert re.fullmatch(r'7\.incomplete-\d{8}T\d{6}Z', moved[0].name), moved
    assert re.fullmatch(r'9\.incomplete-\d{8}T\d{6}Z', moved[1].name)
    assert (moved[0] / 'junk').read_text() == 'half a checkpoint'  # Renamed, not deleted.
    assert (moved[1] / 'state').is_dir() and not cut.exists() and not tmp_dir.exists()
    records = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 2
    assert (f'Incomplete checkpoint directory {cut} (a save of step 7 that was cut off' in
            records[0])
    assert f'moved aside to {moved[0]}' in records[0] and 'resumes from step 5' in records[0]
    assert ckpt.report_incomplete() == []
    assert ckpt.latest_step() == 5
    assert ckpt.save(7, state)  # Used to fail here: the cut-off 7/ was in the way.
    assert ckpt.all_steps() == [5, 7]
    assert ckpt.save(9, state)
    assert ckpt.all_steps() == [5, 7, 9]
  assert sorted(os.listdir(root)) == sorted(['5', '7', '9', moved[0].name, moved[1].name])


# Two processes -----------------------------------------------------------------------------------

_TWO_PROCESS_WORKER = r'''
import json, pathlib, sys
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from cjepa_jax.checkpoint import errors as ckpt_errors
from cjepa_jax.checkpoint import integrity as ckpt_integrity
from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax.checkpoint import reading as ckpt_reading
sharding = NamedSharding(jax.make_mesh((4,), ('fsdp',)), P('fsdp'))  # Split across processes.
host = {'w': np.arange(16 * 6, dtype=np.float32).reshape(16, 6) * 0.37,
        'b': np.linspace(-1, 1, 8).astype(np.float32)}
state = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
         for k, v in host.items()}
ckpt = ckpt_manager.Checkpointer(workdir, save_every_steps=1)
if pid == 0:
  (pathlib.Path(workdir) / 'checkpoints' / '3').mkdir()
multihost_utils.sync_global_devices('cut_off_made')
moved = ckpt.report_incomplete()
ckpt.save(1, state, extra={'data_skipped': 2})
ckpt.check()
ckpt.wait()
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
step, _ = ckpt.restore_latest(abstract)
print(json.dumps({'moved': moved, 'checksums': ckpt_integrity.state_checksums(state), 'step': step,
                  'extra': ckpt.restore_extra(1), 'steps': ckpt.all_steps()}), flush=True)
ckpt.close()
'''


@pytest.mark.slow
def test_two_processes_save_the_checksums_of_one(tmp_path):
  """A state split across 2 processes: both record the single-process checksums and agree on
  what `report_incomplete` moved; one process restores (and verifies) the checkpoint."""
  from multiprocess_utils import cpu_env, free_port, gloo_unavailable_reason, run_processes
  if gloo_unavailable_reason():
    pytest.skip(gloo_unavailable_reason())
  worker = tmp_path / 'worker.py'
  worker.write_text(_TWO_PROCESS_WORKER)
  workdir, port = tmp_path / 'run', str(free_port())
  results, _ = run_processes(
      [[sys.executable, str(worker), str(i), port, str(workdir)] for i in range(2)],
      [cpu_env(2) for _ in range(2)], timeout=180)
  outputs = []
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
    outputs.append(json.loads([l for l in result.stdout.splitlines() if l.startswith('{')][-1]))
  assert outputs[0] == outputs[1]
  host = {'w': np.arange(16 * 6, dtype=np.float32).reshape(16, 6) * 0.37,
          'b': np.linspace(-1, 1, 8).astype(np.float32)}
  assert outputs[0]['checksums'] == {k: _np_checksum(v) for k, v in host.items()}
  assert outputs[0]['step'] == 1 and outputs[0]['steps'] == [1]
  assert outputs[0]['extra'] == {'data_skipped': 2}
  [moved] = outputs[0]['moved']
  assert pathlib.Path(moved).name.startswith('3.incomplete-') and pathlib.Path(moved).is_dir()
  _assert_equal(ckpt_reading.restore_subtree(str(workdir), ()), host)
