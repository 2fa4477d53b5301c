"""Hugging Face interop (cjepa_jax/hf.py, `cjepa-convert-hf`, `cjepa-export`) against transformers.

The HF side is transformers' own `IJepaModel`: built from an `IJepaConfig`, written with
`save_pretrained`, read with `from_pretrained`, and its forward is what the features are compared
with (float32, within 1e-5). Tiny models: the ViT-Ti width (192, 3 heads) with 2 blocks, 32 px
images with patch 8 (16 tokens). Every HF tensor is randomised (norm scales and biases too), so
that a swapped, untransposed or mis-split tensor shows.

Without the `hf` extra (`pip install -e '.[hf]'`: safetensors, transformers; transformers needs
torch, `pip install torch==2.13.0`) the tests skip, saying which package is missing; the bad-input
tests need safetensors only.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('safetensors', reason="safetensors is not installed: pip install -e '.[hf]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from safetensors import numpy as st_numpy  # noqa: E402

from multiprocess_utils import xla_flags  # noqa: E402
import pretrained_utils  # noqa: E402
from cjepa_jax import config as config_lib  # noqa: E402
from cjepa_jax import convert_hf  # noqa: E402
from cjepa_jax import export  # noqa: E402
from cjepa_jax import hf  # noqa: E402
from cjepa_jax import hf_card  # noqa: E402
from cjepa_jax import reference_layout  # noqa: E402
from cjepa_jax.checkpoint import reading as ckpt_reading  # noqa: E402
from cjepa_jax.evals import features as features_lib  # noqa: E402
from cjepa_jax.models import predictor as predictor_lib  # noqa: E402
from cjepa_jax.models import vit  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANT, DEPTH, IMAGE, PATCH = 'Ti/8', 2, 32, 8
WIDTH, HEADS, MLP = 192, 3, 768
GRID = IMAGE // PATCH
TOL = 1e-5


def need_transformers():
  """(torch, transformers), or skip the test saying what is missing."""
  torch = pytest.importorskip('torch', reason='torch is not installed: pip install torch==2.13.0 '
                                              '(the CPU wheel), for transformers')
  transformers = pytest.importorskip(
      'transformers', reason="transformers is not installed: pip install -e '.[hf]'")
  if not hasattr(transformers, 'IJepaModel'):
    pytest.skip(f'transformers {transformers.__version__} has no IJepaModel (4.47 or later)')
  return torch, transformers


def hf_model(seed: int, *, sincos: bool = True):
  """A random transformers IJepaModel of the test size; `sincos`: the fixed position embedding
  (as the official weights hold), else the random one HF initialises."""
  torch, transformers = need_transformers()
  config = transformers.IJepaConfig(
      hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6)
  torch.manual_seed(seed)
  model = transformers.IJepaModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != 'embeddings.position_embeddings':
        scale_one = 'layernorm' in name and name.endswith('weight')
        p.copy_(0.1 * torch.randn_like(p) + (1.0 if scale_one else 0.0))
    if sincos:
      pos = vit.sincos_pos_embed_2d(GRID, GRID, WIDTH)[None]
      model.embeddings.position_embeddings.copy_(torch.from_numpy(pos))
  return model


def sample_images(n: int = 3, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def hf_features(model, images: np.ndarray) -> np.ndarray:
  """transformers' last_hidden_state [B, N, D] of NHWC images."""
  torch, _ = need_transformers()
  with torch.no_grad():
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return model(pixel_values=pixels).last_hidden_state.numpy()


def our_features(params, images: np.ndarray, scan: bool = False) -> np.ndarray:
  """The project's encoder output [B, N, D] in float32 (the encoder the probes use)."""
  encoder = vit.Encoder(VARIANT, depth=DEPTH, scan=scan)
  return np.asarray(jax.jit(encoder.apply)({'params': params}, images))


def tiny_pretrain_config(scan: bool = False, dtype: str = 'float32'):
  c = config_lib.default_config()
  c.batch_size = 8
  c.total_steps = 4
  c.data.dataset = 'synthetic'
  c.data.image_size = IMAGE
  c.data.num_train_examples = 64
  c.data.mean = (0.5, 0.4, 0.3)   # Not the defaults: the export must carry the run's own.
  c.data.std = (0.2, 0.25, 0.3)
  c.model.variant = VARIANT
  c.model.depth = DEPTH
  c.model.dtype = dtype
  c.model.scan = scan
  c.model.pred_width = 48
  c.model.pred_depth = 1
  c.mask.min_keep = 0
  c.optim.warmup_steps = 1
  return c


def save_checkpoint(workdir: pathlib.Path, scan: bool = False, dtype: str = 'float32') -> dict:
  """A trainer-shaped checkpoint at step 2 whose context encoder differs from its EMA target."""
  rng = np.random.default_rng(1)

  def move(state):
    state['params']['encoder'] = jax.tree.map(
        lambda p: (p + 0.05 * rng.normal(size=p.shape)).astype(p.dtype),
        state['params']['encoder'])
    return state

  return pretrained_utils.save_pretraining_checkpoint(
      workdir, tiny_pretrain_config(scan, dtype), 2, move)


def cli_error(module, argv, monkeypatch, capsys) -> str:
  """Runs `module.run()` as its console script; asserts exit 1 and returns its one stderr line."""
  monkeypatch.setattr(sys, 'argv', [module._PROG, *argv])
  capsys.readouterr()   # Drop what came before (transformers' progress bars).
  with pytest.raises(SystemExit) as e:
    module.run()
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f'{module._PROG}: error: '), err
  return err


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
  """transformers' own save_pretrained folder of a random sin-cos IJepaModel, and the model."""
  model = hf_model(0)
  path = tmp_path_factory.mktemp('hf') / 'ijepa'
  model.save_pretrained(str(path))
  return path, model


@pytest.fixture(scope='module')
def imported(hf_folder, tmp_path_factory):
  """`cjepa-convert-hf` of `hf_folder` (float32 compute), as a checkpoint directory."""
  out = tmp_path_factory.mktemp('imported') / 'ckpt'
  convert_hf.main(['--hf', str(hf_folder[0]), '--out', str(out), '--dtype', 'float32'])
  return out


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A trainer-shaped checkpoint (unscanned, float32) and its saved state."""
  workdir = tmp_path_factory.mktemp('run')
  return workdir, save_checkpoint(workdir)


def good_folder(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """An IJepaModel folder written without torch (random encoder -> the HF layout)."""
  encoder = vit.Encoder(VARIANT, depth=DEPTH)
  params = jax.jit(encoder.init)(jax.random.key(seed), jnp.zeros((1, IMAGE, IMAGE, 3)))['params']
  ref = reference_layout.encoder_to_reference(jax.device_get(params), VARIANT, depth=DEPTH,
                                              grid=GRID)
  path.mkdir(parents=True)
  st_numpy.save_file(hf.reference_to_hf(ref, DEPTH), str(path / hf.WEIGHTS_FILE),
                     metadata={'format': 'pt'})
  (path / hf.CONFIG_FILE).write_text(json.dumps(hf.hf_model_config(VARIANT, DEPTH, IMAGE)))
  return path


# ------------------------------------------------------------------------------------------------
# Import: transformers' file -> cjepa_jax.
# ------------------------------------------------------------------------------------------------


def test_import_gives_transformers_features(hf_folder, imported):
  _, model = hf_folder
  saved = ckpt_reading.load_config(str(imported))
  assert (saved['model']['variant'], saved['model']['depth'], saved['data']['image_size'],
          saved['model']['dtype'], saved['model']['scan']) == (VARIANT, DEPTH, IMAGE, 'float32',
                                                                False)
  target = ckpt_reading.restore_subtree(str(imported), ('target_params',))
  # The HF file holds one encoder: both slots get it, and there is no predictor.
  assert_trees_equal(target, ckpt_reading.restore_subtree(str(imported), ('params', 'encoder')))
  with pytest.raises(ValueError, match="No key 'predictor'"):
    ckpt_reading.restore_subtree(str(imported), ('params', 'predictor'))
  assert 'Hugging Face folder' in ckpt_reading.load_extra(str(imported))['source']
  images = sample_images()
  diff = np.abs(our_features(target, images) - hf_features(model, images)).max()
  print(f'import: max |cjepa_jax - transformers| = {diff:.3g}')
  assert diff < TOL


def test_import_reads_the_weights_file_and_a_config_elsewhere(hf_folder, tmp_path):
  path, _ = hf_folder
  config = tmp_path / 'elsewhere.json'
  config.write_text((path / hf.CONFIG_FILE).read_text())
  by_folder, _ = hf.import_hf(str(path))
  by_files, cfg = hf.import_hf(str(path / hf.WEIGHTS_FILE), config_path=str(config))
  assert_trees_equal(by_folder, by_files)
  assert cfg.model.dtype == config_lib.default_config().model.dtype  # No --dtype: the default.


def test_learned_position_embeddings_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
  """A freshly initialised HF model holds random position embeddings: refused, nothing written."""
  path = tmp_path / 'random_pos'
  hf_model(1, sincos=False).save_pretrained(str(path))
  out = tmp_path / 'out'
  err = cli_error(convert_hf, ['--hf', str(path), '--out', str(out)], monkeypatch, capsys)
  assert 'embeddings.position_embeddings is not the fixed 2-D sin-cos embedding' in err
  assert 'learned' in err and not out.exists()


def test_bfloat16_file_with_rounded_sincos_is_accepted(tmp_path):
  """A 16-bit file stores the sin-cos constant rounded: accepted to that precision, and the
  weights come back as the exact float32 of the stored bfloat16 values."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
  path = good_folder(tmp_path / 'f32')
  tensors = st_numpy.load_file(str(path / hf.WEIGHTS_FILE))
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  (tmp_path / 'bf16').mkdir()
  st_numpy.save_file(bf16, str(tmp_path / 'bf16' / hf.WEIGHTS_FILE), metadata={'format': 'pt'})
  (tmp_path / 'bf16' / hf.CONFIG_FILE).write_text((path / hf.CONFIG_FILE).read_text())
  state, _ = hf.import_hf(str(tmp_path / 'bf16'))
  np.testing.assert_array_equal(
      state['target_params']['norm']['scale'],
      bf16['layernorm.weight'].astype(np.float32))


def test_sharded_safetensors_with_an_index_are_read(tmp_path):
  """Big models come as model-0000i-of-0000n.safetensors shards and model.safetensors.index.json."""
  path = good_folder(tmp_path / 'hf')
  tensors = st_numpy.load_file(str(path / hf.WEIGHTS_FILE))
  whole, _ = hf.import_hf(str(path))
  (path / hf.WEIGHTS_FILE).unlink()
  names = ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
  weight_map = {k: names[int(k.startswith('encoder.layer.1.'))] for k in tensors}
  for name in names:
    st_numpy.save_file({k: v for k, v in tensors.items() if weight_map[k] == name},
                       str(path / name), metadata={'format': 'pt'})
  (path / hf.WEIGHTS_INDEX_FILE).write_text(json.dumps({'weight_map': weight_map}))
  sharded, _ = hf.import_hf(str(path))
  assert_trees_equal(sharded, whole)


# ------------------------------------------------------------------------------------------------
# Export: cjepa_jax -> a folder transformers loads.
# ------------------------------------------------------------------------------------------------


def test_export_loads_in_transformers_with_the_same_features(pretrained, tmp_path):
  _, transformers = need_transformers()
  workdir, state = pretrained
  out = tmp_path / 'hf'
  export.main(['--checkpoint', str(workdir), '--out', str(out)])
  assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors',
                                     'preprocessor_config.json']
  model, info = transformers.IJepaModel.from_pretrained(str(out), output_loading_info=True)
  assert all(not v for v in info.values()), info   # No missing / unexpected / mismatched keys.
  images = sample_images()
  diff = np.abs(our_features(state['target_params'], images)
                - hf_features(model.eval(), images)).max()
  print(f'export: max |cjepa_jax - transformers| = {diff:.3g}')
  assert diff < TOL
  processor = transformers.AutoImageProcessor.from_pretrained(str(out))
  np.testing.assert_allclose(processor.image_mean, (0.5, 0.4, 0.3))
  np.testing.assert_allclose(processor.image_std, (0.2, 0.25, 0.3))
  assert (processor.size['height'], processor.size['width']) == (IMAGE, IMAGE)


@pytest.mark.parametrize('scan,dtype,encoder', [(False, 'float32', 'target'),
                                                (True, 'bfloat16', 'context')])
def test_export_then_import_is_the_identity(scan, dtype, encoder, tmp_path):
  """A scanned, bfloat16-compute checkpoint too: the weights are float32 in every checkpoint."""
  state = save_checkpoint(tmp_path / 'run', scan=scan, dtype=dtype)
  want = state['target_params'] if encoder == 'target' else state['params']['encoder']
  export.main(['--checkpoint', str(tmp_path / 'run'), '--out', str(tmp_path / 'hf'),
               '--encoder', encoder])
  argv = ['--hf', str(tmp_path / 'hf'), '--out', str(tmp_path / 'back'), '--dtype', dtype]
  convert_hf.main(argv + (['--scan'] if scan else []))
  saved = ckpt_reading.load_config(str(tmp_path / 'back'))
  assert (saved['model']['scan'], saved['model']['dtype']) == (scan, dtype)
  assert_trees_equal(ckpt_reading.restore_subtree(str(tmp_path / 'back'), ('target_params',)), want)
  if scan:   # The exported file is the same model: transformers' features match the encoder's.
    _, transformers = need_transformers()
    model = transformers.IJepaModel.from_pretrained(str(tmp_path / 'hf')).eval()
    images = sample_images()
    diff = np.abs(our_features(want, images, scan=True) - hf_features(model, images)).max()
    print(f'scan export: max |cjepa_jax - transformers| = {diff:.3g}')
    assert diff < TOL


def test_model_card_describes_the_run_and_its_probe_in_percent(pretrained, tmp_path):
  workdir, _ = pretrained
  probe = {'step': 2, 'encoder': 'target', 'dataset': 'synthetic', 'train_split': 'train',
           'eval_split': 'test', 'num_train': 64, 'num_test': 32, 'image_size': IMAGE,
           'accuracy_units': 'fraction', 'complete': True,
           'linear': {'top1': 0.561, 'top5': 0.95, 'best_lr': 0.01, 'best_wd': 0.001,
                      'features': 'last'},
           'knn': {'top1': 0.428, 'top5': 0.9, 'k': 20, 'temperature': 0.07,
                   'features': 'last'}}
  (workdir / 'probe').mkdir(exist_ok=True)
  (workdir / 'probe' / 'probe_results.json').write_text(json.dumps(probe))
  export.main(['--checkpoint', str(workdir), '--out', str(tmp_path / 'hf')])
  card = (tmp_path / 'hf' / 'README.md').read_text()
  for text in ('library_name: transformers', 'I-JEPA', 'synthetic', 'step 2 of 4',
               'AdamW', '| linear | last | 56.1 | 95.0 |', 'kNN (k=20, T=0.07)', '42.8',
               'held-out part of the train split', 'IJepaModel.from_pretrained'):
    assert text in card, text
  # The same numbers in percent (the newer probe_results.json) print the same.
  percent = dict(probe, unit='percent', linear=dict(probe['linear'], top1=56.1, top5=95.0),
                 knn=dict(probe['knn'], top1=42.8, top5=90.0))
  saved = ckpt_reading.load_config(str(workdir))
  info = dict(checkpoint=str(workdir), step=2, encoder='target', variant=VARIANT, depth=DEPTH,
              image_size=IMAGE)
  assert hf_card.model_card(saved, info, percent) == hf_card.model_card(saved, info, probe)
  # Probe results of another encoder are left out (a log line), or refused when named.
  export.main(['--checkpoint', str(workdir), '--out', str(tmp_path / 'ctx'),
               '--encoder', 'context'])
  assert 'No `probe_results.json`' in (tmp_path / 'ctx' / 'README.md').read_text()
  with pytest.raises(ValueError, match='not the exported step 2 / encoder context'):
    export.main(['--checkpoint', str(workdir), '--out', str(tmp_path / 'ctx2'),
                 '--encoder', 'context', '--probe_results', str(workdir / 'probe')])
  assert not (tmp_path / 'ctx2').exists()


# ------------------------------------------------------------------------------------------------
# What reads an imported checkpoint: the probes, fine-tuning, init_from.
# ------------------------------------------------------------------------------------------------


def test_imported_checkpoint_feeds_probe_finetune_and_init_from(imported):
  hf_params = ckpt_reading.restore_subtree(str(imported), ('target_params',))
  for which in ('target', 'context'):   # The probes' and fine-tuning's restore.
    config = ml_collections.ConfigDict(dict(pretrained=str(imported), encoder=which, seed=0))
    encoder, info = features_lib.resolve_encoder(features_lib.EncoderSource.from_config(config))
    assert (encoder.variant, encoder.num_layers, info['image_size']) == (VARIANT, DEPTH, IMAGE)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert_trees_equal(features_lib.load_encoder_params(config.seed, encoder, info, dev), hf_params)
  # init_from: both encoders from the file, the predictor stays as the run initialised it.
  images = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32)
  enc = jax.eval_shape(vit.Encoder(VARIANT, depth=DEPTH).init, jax.random.key(0),
                       images)['params']
  predictor = predictor_lib.Predictor(embed_dim=WIDTH, num_heads=HEADS, grid=(GRID, GRID),
                                      width=48, depth=1)
  pred = jax.eval_shape(lambda: predictor.init(
      jax.random.key(0), jnp.zeros((1, 1, WIDTH)), jnp.zeros((1, 1), jnp.int32),
      jnp.ones((1, 1), bool), jnp.zeros((1, 1, 1), jnp.int32),
      jnp.ones((1, 1, 1), bool)))['params']
  ones = lambda t: jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), t)  # noqa: E731
  state = {'step': jnp.int32(0), 'params': {'encoder': ones(enc), 'predictor': ones(pred)},
           'target_params': ones(enc)}
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded = ckpt_reading.load_init_from(str(imported), state, jax.tree.map(lambda _: dev, state))
  assert_trees_equal(loaded['params']['encoder'], hf_params)
  assert_trees_equal(loaded['target_params'], hf_params)
  assert_trees_equal(loaded['params']['predictor'], ones(pred))


# ------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written.
# ------------------------------------------------------------------------------------------------


def _edit_config(path, **changes):
  config = json.loads((path / hf.CONFIG_FILE).read_text())
  config.update(changes)
  (path / hf.CONFIG_FILE).write_text(json.dumps(config))


def _drop_tensor(path, key):
  tensors = st_numpy.load_file(str(path / hf.WEIGHTS_FILE))
  del tensors[key]
  st_numpy.save_file(tensors, str(path / hf.WEIGHTS_FILE))


def _truncate(path):
  weights = path / hf.WEIGHTS_FILE
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) * 2 // 3])


def _pickle_only(path):
  (path / hf.WEIGHTS_FILE).rename(path / 'pytorch_model.bin')


BAD_INPUTS = {
    'vit_mae': (lambda p: _edit_config(p, model_type='vit_mae'), "a 'vit_mae' model"),
    'dino': (lambda p: _edit_config(p, model_type='dinov2'), "a 'dinov2' model"),
    'truncated': (_truncate, 'is not a readable safetensors file'),
    'pickle_only': (_pickle_only, "has no model.safetensors"),
    'missing_tensor': (lambda p: _drop_tensor(p, 'encoder.layer.1.output.dense.bias'),
                       "has no tensor 'encoder.layer.1.output.dense.bias'"),
    'config_depth': (lambda p: _edit_config(p, num_hidden_layers=3),
                     'num_hidden_layers=3, but the tensors have 2 layers'),
    'config_width': (lambda p: _edit_config(p, hidden_size=384, num_attention_heads=6,
                                            intermediate_size=1536),
                     'config.json and the weights disagree'),
    'config_image_size': (lambda p: _edit_config(p, image_size=64),
                          "'embeddings.position_embeddings' has shape (1, 16, 192)"),
    'layer_norm_eps': (lambda p: _edit_config(p, layer_norm_eps=1e-12), 'layer_norm_eps=1e-12'),
    'gelu_tanh': (lambda p: _edit_config(p, hidden_act='gelu_pytorch_tanh'), "hidden_act="),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
  spoil, expected = BAD_INPUTS[case]
  path = good_folder(tmp_path / 'hf')
  spoil(path)
  out = tmp_path / 'out'
  err = cli_error(convert_hf, ['--hf', str(path), '--out', str(out)], monkeypatch, capsys)
  assert expected in err, err
  assert not out.exists()


@pytest.mark.parametrize('name,model_type', [('ViTMAE', 'vit_mae'), ('ViT', 'vit'),
                                             ('Dinov2', 'dinov2')])
def test_other_transformers_models_are_refused(name, model_type, tmp_path, monkeypatch, capsys):
  """Real save_pretrained folders of ViT-MAE, ViT (DINO's hub checkpoints) and DINOv2."""
  _, transformers = need_transformers()
  config = getattr(transformers, f'{name}Config')(
      hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH)
  getattr(transformers, f'{name}Model')(config).save_pretrained(str(tmp_path / 'hf'))
  err = cli_error(convert_hf, ['--hf', str(tmp_path / 'hf'), '--out', str(tmp_path / 'out')],
                  monkeypatch, capsys)
  assert f'describes a {model_type!r} model (model_type), not an I-JEPA one' in err
  assert not (tmp_path / 'out').exists()


def test_export_bad_input_is_one_line_and_writes_nothing(pretrained, tmp_path, monkeypatch,
                                                         capsys):
  workdir, _ = pretrained
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'x').write_text('')
  err = cli_error(export, ['--checkpoint', str(workdir), '--out', str(tmp_path / 'taken')],
                  monkeypatch, capsys)
  assert 'already exists and is not empty' in err
  err = cli_error(export, ['--checkpoint', str(tmp_path / 'nothing'), '--out',
                           str(tmp_path / 'new')], monkeypatch, capsys)
  assert 'No complete checkpoint' in err
  assert sorted(os.listdir(tmp_path)) == ['taken']   # No output, no temporary folder left.


# ------------------------------------------------------------------------------------------------
# The command lines end to end: a short training run, export, a fresh transformers process;
# an imported checkpoint through cjepa-probe and cjepa-finetune.
# ------------------------------------------------------------------------------------------------


def _run(args, timeout=600):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


_FRESH_LOAD = '''
import sys, numpy as np, torch
from transformers import IJepaModel
model = IJepaModel.from_pretrained(sys.argv[1]).eval()
images = np.load(sys.argv[2])
with torch.no_grad():
  out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
np.save(sys.argv[3], out.last_hidden_state.numpy())
'''


@pytest.mark.slow
def test_trained_cifar10_recipe_exports_and_loads_in_a_fresh_process(tmp_path):
  """The CIFAR-10 quick-start recipe (its model, synthetic images) trained a few steps, exported
  with the CLI, loaded by `IJepaModel.from_pretrained` in a fresh Python process: no key
  warnings, the project's features within 1e-5."""
  need_transformers()
  workdir = tmp_path / 'run'
  result = _run(['-m', 'cjepa_jax.train', '--config', 'configs/cifar10_vit_tiny.py',
                 '--workdir', str(workdir), '--config.data.dataset=synthetic',
                 '--config.total_steps=3', '--config.batch_size=8',
                 '--config.model.dtype=float32', '--config.log_every_steps=1',
                 '--config.evals.knn.every_steps=0', '--config.evals.fewshot.every_steps=0'])
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / 'hf'
  result = _run(['-m', 'cjepa_jax.export', '--checkpoint', str(workdir), '--out', str(out)])
  assert result.returncode == 0, result.stderr[-3000:]
  saved = ckpt_reading.load_config(str(workdir))
  size = saved['data']['image_size']
  images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  np.save(tmp_path / 'images.npy', images)
  result = _run(['-c', _FRESH_LOAD, str(out), str(tmp_path / 'images.npy'),
                 str(tmp_path / 'hf_out.npy')])
  assert result.returncode == 0, result.stderr[-3000:]
  log = (result.stdout + result.stderr).lower()
  for word in ('missing', 'unexpected', 'newly initialized', 'not used', 'mismatch'):
    assert word not in log, result.stderr
  encoder = vit.Encoder(saved['model']['variant'], depth=saved['model']['depth'] or None)
  params = ckpt_reading.restore_subtree(str(workdir), ('target_params',))
  ours = np.asarray(encoder.apply({'params': params}, images))
  diff = np.abs(ours - np.load(tmp_path / 'hf_out.npy')).max()
  print(f'CIFAR-10 recipe export, fresh process: max |cjepa_jax - transformers| = {diff:.3g}')
  assert diff < TOL


@pytest.mark.slow
def test_imported_checkpoint_runs_through_probe_and_finetune_clis(imported, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top  (the test extra)
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
      (tmp_path / 'data' / split / f'c{c}').mkdir(parents=True)
      for i in range(8):
        pixels = np.clip(np.asarray(colour) + rng.normal(0, 40, (IMAGE, IMAGE, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / 'data' / split / f'c{c}' /
                                                      f'{i}.png')
  result = _run(['-m', 'cjepa_jax.probe', '--config', 'configs/probe_linear.py:cifar10',
                 f'--config.pretrained={imported}', f'--config.data.data_dir={tmp_path / "data"}',
                 '--config.data.num_classes=3', '--config.probes=knn', '--config.batch_size=8',
                 '--config.evals.knn.k=3', '--workdir', str(tmp_path / 'probe')])
  assert result.returncode == 0, result.stderr[-3000:]
  probe = json.loads((tmp_path / 'probe' / 'probe_results.json').read_text())
  assert probe['model']['variant'] == VARIANT and probe['knn']['top1'] > 0.5
  result = _run(['-m', 'cjepa_jax.finetune', '--config', 'configs/finetune_cifar10.py',
                 f'--config.pretrained={imported}', '--config.data.dataset=synthetic',
                 '--config.batch_size=8', '--config.total_steps=2', '--config.eval_every_steps=2',
                 '--config.eval_batch_size=8', '--config.eval_examples=16',
                 '--config.optim.warmup_steps=1', '--config.log_every_steps=1',
                 '--workdir', str(tmp_path / 'ft')])
  assert result.returncode == 0, result.stderr[-3000:]
