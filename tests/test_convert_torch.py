"""Tests of cjepa_jax.convert_torch against an independent torch model with the reference layout.

The torch side is written here from the reference's semantics (facebookresearch/ijepa,
src/models/vision_transformer.py and src/masks/utils.py): conv patch embedding, a fixed sin-cos
position embedding (an independent numpy formula, reference-style: meshgrid with w first), fused
qkv attention written out by hand, erf GELU, LayerNorm eps 1e-6, context tokens gathered after
adding the position embedding, and the predictor's mask tokens, concatenation (mask-major batch
order, as the reference's x.repeat(len(masks), 1, 1)), norm and projection. Every parameter is
randomised (norm scales and biases included) so that a swapped or untransposed tensor shows.
"""

import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

from cjepa_jax.checkpoint import reading as ckpt_reading  # noqa: E402
from cjepa_jax import convert_torch  # noqa: E402
from cjepa_jax.models import predictor as predictor_lib  # noqa: E402
from cjepa_jax.models import vit  # noqa: E402

VARIANT = 'Ti/8'      # width 192, 12 blocks, 3 heads; 32x32 images -> a 4x4 grid.
IMAGE = 32
PATCH = 8
WIDTH, DEPTH, HEADS = 192, 12, 3
PRED_WIDTH, PRED_DEPTH = 48, 2
B, KC, M, KT = 2, 10, 3, 4
TOL = 1e-5


def ref_sincos(side: int, dim: int) -> np.ndarray:
  """[side*side, dim] float64, the reference's formula (meshgrid(w, h): first half = column)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  g = np.stack(np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64)))
  return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


class TorchAttention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                      # [B, H, N, hd]
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1)
    return self.proj((att @ v).transpose(1, 2).reshape(b, n, c))


class TorchMlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))  # Exact erf GELU, torch's default.


class TorchBlock(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = TorchAttention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = TorchMlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TorchPatchEmbed(nn.Module):

  def __init__(self, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


def gather(x, idx):
  """The reference's apply_masks for one mask: x [B, N, D], idx [B, K] -> [B, K, D]."""
  return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


class TorchEncoder(nn.Module):

  def __init__(self, dim=WIDTH, depth=DEPTH, heads=HEADS, patch=PATCH, side=IMAGE // PATCH):
    super().__init__()
    self.patch_embed = TorchPatchEmbed(dim, patch)
    self.pos_embed = nn.Parameter(torch.from_numpy(ref_sincos(side, dim)).float()[None],
                                  requires_grad=False)
    self.blocks = nn.ModuleList([TorchBlock(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, images, idx=None):
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed
    if idx is not None:
      x = gather(x, idx)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)


class TorchPredictor(nn.Module):

  def __init__(self, embed_dim=WIDTH, dim=PRED_WIDTH, depth=PRED_DEPTH, heads=HEADS,
               side=IMAGE // PATCH):
    super().__init__()
    self.predictor_embed = nn.Linear(embed_dim, dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.predictor_pos_embed = nn.Parameter(torch.from_numpy(ref_sincos(side, dim)).float()[None],
                                            requires_grad=False)
    self.predictor_blocks = nn.ModuleList([TorchBlock(dim, heads) for _ in range(depth)])
    self.predictor_norm = nn.LayerNorm(dim, eps=1e-6)
    self.predictor_proj = nn.Linear(dim, embed_dim)

  def forward(self, z, ctx_idx, tgt_idx):
    """z [B, Kc, D]; ctx_idx [B, Kc]; tgt_idx: M tensors [B, Kt] -> [M * B, Kt, D] (mask-major)."""
    pos = self.predictor_pos_embed.repeat(z.shape[0], 1, 1)
    x = self.predictor_embed(z) + gather(pos, ctx_idx)
    kc = x.shape[1]
    t = torch.cat([gather(pos, m) for m in tgt_idx], 0) + self.mask_token
    x = torch.cat([x.repeat(len(tgt_idx), 1, 1), t], 1)
    for blk in self.predictor_blocks:
      x = blk(x)
    return self.predictor_proj(self.predictor_norm(x)[:, kc:])


def randomise(module: nn.Module, seed: int) -> None:
  """Every trainable tensor random and non-trivial (the fixed pos embeddings stay)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if not p.requires_grad:
        continue
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.3 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      elif name == 'mask_token':
        p.copy_(noise)
      else:
        p.copy_(noise / math.sqrt(p[0].numel()))  # Unit-variance outputs: [out, fan_in...].


def numpy_sd(module: nn.Module) -> dict[str, np.ndarray]:
  return {'module.' + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Torch models, their outputs on fixed inputs, and the converted checkpoint (via the CLI)."""
  torch.manual_seed(0)
  enc, tgt, pred = TorchEncoder(), TorchEncoder(), TorchPredictor()
  for i, mod in enumerate((enc, tgt, pred)):
    randomise(mod, seed=i + 1)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((B, 3, IMAGE, IMAGE)).astype(np.float32)
  n = (IMAGE // PATCH) ** 2
  ctx_idx = np.stack([np.sort(rng.choice(n, KC, replace=False)) for _ in range(B)])
  tgt_idx = np.stack([np.stack([np.sort(rng.choice(n, KT, replace=False)) for _ in range(M)])
                      for _ in range(B)])                       # [B, M, Kt]
  with torch.no_grad():
    t_images, t_ctx = torch.from_numpy(images), torch.from_numpy(ctx_idx)
    z = enc(t_images, t_ctx)
    preds = pred(z, t_ctx, [torch.from_numpy(tgt_idx[:, m]) for m in range(M)])
    h = tgt(t_images)
  checkpoint = {'encoder': enc.state_dict(), 'target_encoder': tgt.state_dict(),
                'predictor': pred.state_dict(), 'epoch': 300, 'lr': 1e-6,
                'opt': {'state': {}, 'param_groups': [{'lr': 1e-6, 'betas': (0.9, 0.999)}]}}
  checkpoint = {k: ({'module.' + kk: vv for kk, vv in v.items()}
                    if k in convert_torch.REFERENCE_KEYS else v) for k, v in checkpoint.items()}
  tmp = tmp_path_factory.mktemp('convert')
  pth = tmp / 'IN1K-vit.ti.8-test.pth.tar'
  torch.save(checkpoint, pth)
  out = tmp / 'converted'
  # No --pred_depth / --pred_width / --image_size: all three are read from the checkpoint.
  step_dir = convert_torch.main(['--checkpoint', str(pth), '--variant', VARIANT,
                                 '--out', str(out)])
  return dict(
      out=str(out), step_dir=step_dir, pth=str(pth), images=images, ctx_idx=ctx_idx,
      tgt_idx=tgt_idx, z=z.numpy(), h=h.numpy(),
      preds=preds.numpy().reshape(M, B, KT, WIDTH).transpose(1, 0, 2, 3),   # [B, M, Kt, D]
      sds={'encoder': numpy_sd(enc), 'target_encoder': numpy_sd(tgt),
           'predictor': numpy_sd(pred)})


def test_sincos_matches_the_reference_formula():
  np.testing.assert_allclose(vit.sincos_pos_embed_2d(4, 4, 48), ref_sincos(4, 48), atol=1e-7)


def test_encoder_output_matches_torch(reference):
  params = ckpt_reading.restore_subtree(reference['out'], ('params', 'encoder'))
  images = jnp.asarray(reference['images'].transpose(0, 2, 3, 1))       # NCHW -> NHWC.
  z = jax.jit(vit.Encoder(VARIANT).apply)({'params': params}, images,
                                          jnp.asarray(reference['ctx_idx']))
  assert z.shape == (B, KC, WIDTH)
  assert np.abs(np.asarray(z) - reference['z']).max() <= TOL


def test_target_encoder_output_matches_torch(reference):
  """The probes' path: restore only target_params, encode full images."""
  params = ckpt_reading.restore_subtree(reference['out'], ('target_params',))
  images = jnp.asarray(reference['images'].transpose(0, 2, 3, 1))
  h = jax.jit(vit.Encoder(VARIANT).apply)({'params': params}, images)
  assert h.shape == (B, (IMAGE // PATCH) ** 2, WIDTH)
  assert np.abs(np.asarray(h) - reference['h']).max() <= TOL
  # target_params come from 'target_encoder', not from 'encoder' (the two differ here).
  assert np.abs(reference['h'] - np.asarray(jax.jit(vit.Encoder(VARIANT).apply)(
      {'params': ckpt_reading.restore_subtree(reference['out'], ('params', 'encoder'))},
      images))).max() > 0.1


def test_predictor_output_matches_torch(reference):
  params = ckpt_reading.restore_subtree(reference['out'], ('params', 'predictor'))
  model = predictor_lib.Predictor(embed_dim=WIDTH, num_heads=HEADS, grid=(4, 4),
                                  width=PRED_WIDTH, depth=PRED_DEPTH)
  out = jax.jit(model.apply)({'params': params}, jnp.asarray(reference['z']),
                    jnp.asarray(reference['ctx_idx']), jnp.ones((B, KC), bool),
                    jnp.asarray(reference['tgt_idx']), jnp.ones((B, M, KT), bool))
  assert out.shape == (B, M, KT, WIDTH)
  assert np.abs(np.asarray(out) - reference['preds']).max() <= TOL


def test_checkpoint_contract(reference):
  out = reference['out']
  root, step = ckpt_reading.resolve_checkpoint(out)
  assert step == 0 and reference['step_dir'] == f'{root}/0'
  config = ckpt_reading.load_config(out)
  assert config['model']['variant'] == VARIANT and config['model']['depth'] == 0
  assert config['model']['pred_depth'] == PRED_DEPTH      # Inferred from the keys.
  assert config['model']['pred_width'] == PRED_WIDTH      # Inferred from the shapes.
  assert config['data']['image_size'] == IMAGE            # From pos_embed: 4x4 grid x patch 8.
  assert config['model']['scan'] is False
  state = ckpt_reading.restore_subtree(out)
  assert int(state['step']) == 0 and state['step'].dtype == jnp.int32
  # Exactly the trees (and shapes) the flax models' init makes: what init_from and probes need.
  images = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32)
  enc = jax.eval_shape(vit.Encoder(VARIANT).init, jax.random.key(0), images)['params']
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
  assert shapes(state['target_params']) == shapes(enc)
  assert shapes(state['params']['encoder']) == shapes(enc)
  ints = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  pred = jax.eval_shape(
      predictor_lib.Predictor(WIDTH, HEADS, (4, 4), PRED_WIDTH, PRED_DEPTH).init,
      jax.random.key(0), jax.ShapeDtypeStruct((1, 1, WIDTH), jnp.float32), ints,
      jax.ShapeDtypeStruct((1, 1), bool), jax.ShapeDtypeStruct((1, 1, 1), jnp.int32),
      jax.ShapeDtypeStruct((1, 1, 1), bool))['params']
  assert shapes(state['params']['predictor']) == shapes(pred)
  # Values: an independent per-tensor check of the layout rules on a few leaves.
  sd = reference['sds']['target_encoder']
  np.testing.assert_array_equal(state['target_params']['patch_embed']['kernel'],
                                sd['module.patch_embed.proj.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state['target_params']['blocks_7']['attn']['qkv']['kernel'],
                                sd['module.blocks.7.attn.qkv.weight'].T)
  np.testing.assert_array_equal(state['target_params']['blocks_11']['norm2']['scale'],
                                sd['module.blocks.11.norm2.weight'])
  np.testing.assert_array_equal(state['params']['predictor']['mask_token'],
                                reference['sds']['predictor']['module.mask_token'])


def test_training_can_start_from_it(reference):
  """checkpoint.reading.load_init_from (config.init_from) accepts the converted checkpoint as is."""
  images = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32)
  enc = jax.eval_shape(vit.Encoder(VARIANT).init, jax.random.key(0), images)['params']
  pred = ckpt_reading.restore_subtree(reference['out'], ('params', 'predictor'))
  zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), t)  # noqa: E731
  state = {'step': jnp.int32(0), 'params': {'encoder': zeros(enc), 'predictor': zeros(pred)},
           'target_params': zeros(enc)}
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: dev, state)
  loaded = ckpt_reading.load_init_from(reference['out'], state, shardings)
  np.testing.assert_array_equal(
      loaded['params']['encoder']['norm']['scale'],
      reference['sds']['encoder']['module.norm.weight'])


def test_scan_layout_matches_unscanned(reference):
  ckpt = {k: dict(v) for k, v in reference['sds'].items()}
  plain, _ = convert_torch.convert_reference(ckpt, VARIANT)
  scanned, config = convert_torch.convert_reference(ckpt, VARIANT, scan=True)
  assert config.model.scan
  assert scanned['params']['encoder']['blocks']['attn']['qkv']['kernel'].shape == (
      DEPTH, WIDTH, 3 * WIDTH)
  back = vit.scan_to_unscanned(scanned['target_params'])
  jax.tree.map(np.testing.assert_array_equal, back, plain['target_params'])


@pytest.mark.parametrize('variant,expected,found', [
    ('S/8', (384, 3, 8, 8), (192, 3, 8, 8)),
    ('Ti/16', (192, 3, 16, 16), (192, 3, 8, 8)),
])
def test_wrong_variant_names_key_shapes_and_the_right_variant(reference, tmp_path, variant,
                                                              expected, found):
  with pytest.raises(ValueError) as e:
    convert_torch.main(['--checkpoint', reference['pth'], '--variant', variant,
                        '--out', str(tmp_path / 'x')])
  msg = str(e.value)
  assert "'patch_embed.proj.weight'" in msg and str(expected) in msg and str(found) in msg
  assert '--variant Ti/8' in msg
  assert not (tmp_path / 'x').exists()  # Nothing written on failure.


def test_unexpected_key_is_rejected_by_name(reference):
  sd = dict(reference['sds']['encoder'])
  sd['module.blocks.3.attn.q_norm.weight'] = np.ones(WIDTH, np.float32)
  with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.3\.attn\.q_norm\.weight'\]"):
    convert_torch.convert_encoder(sd, VARIANT)


def test_missing_key_and_wrong_depths_are_named(reference):
  sd = dict(reference['sds']['encoder'])
  del sd['module.blocks.5.mlp.fc2.bias']
  with pytest.raises(ValueError, match=r"no key 'blocks\.5\.mlp\.fc2\.bias'.*\(192,\)"):
    convert_torch.convert_encoder(sd, VARIANT)
  with pytest.raises(ValueError, match=r'has 12 blocks.*has 6.*--variant Ti/8\.'):
    convert_torch.convert_encoder(reference['sds']['encoder'], VARIANT, depth=6)
  with pytest.raises(ValueError, match=r'has 2 blocks.*--pred_width 48 --pred_depth 2'):
    convert_torch.convert_predictor(reference['sds']['predictor'], VARIANT, pred_depth=12)
  with pytest.raises(ValueError, match=r"'predictor_embed\.weight'.*\(48, 192\).*\(384, 192\)"):
    convert_torch.convert_predictor(reference['sds']['predictor'], VARIANT, pred_width=384)
  with pytest.raises(ValueError, match=r"'predictor_embed\.weight'.*\(48, 192\).*\(48, 384\)"
                     r'.*encoder of width 192 \(--variant Ti/<patch>\)'):
    convert_torch.convert_predictor(reference['sds']['predictor'], 'S/8')


def test_learned_position_embedding_is_refused(reference):
  sd = dict(reference['sds']['target_encoder'])
  sd['module.pos_embed'] = sd['module.pos_embed'] + 0.01
  with pytest.raises(ValueError, match='sin-cos position embedding'):
    convert_torch.convert_encoder(sd, VARIANT)


def test_existing_output_is_not_overwritten(reference):
  with pytest.raises(ValueError, match='already holds checkpoints'):
    convert_torch.main(['--checkpoint', reference['pth'], '--variant', VARIANT,
                        '--out', reference['out']])


def test_torch_free_core_strips_prefix_and_accepts_plain_keys(reference):
  plain = {k[len('module.'):]: v for k, v in reference['sds']['predictor'].items()}
  a = convert_torch.convert_predictor(plain, VARIANT)
  b = convert_torch.convert_predictor(reference['sds']['predictor'], VARIANT)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert convert_torch.infer_encoder_variant(reference['sds']['encoder']) == (VARIANT, DEPTH)


class _NotAWeight:
  """Pickled by reference: torch.load(weights_only=True) must refuse it."""


def test_unsafe_pickle_needs_trust_pickle(reference, tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  raw = torch.load(reference['pth'], weights_only=True)
  raw['extra'] = _NotAWeight()
  pth = tmp_path / 'unsafe.pth.tar'
  torch.save(raw, pth)
  with pytest.raises(ValueError, match='rerun with --trust_pickle.*arbitrary code'):
    convert_torch.load_torch_checkpoint(str(pth))
  try:
    loaded = convert_torch.load_torch_checkpoint(str(pth), trust_pickle=True)
  except ValueError as e:
    if not isinstance(e.__cause__, (pickle.UnpicklingError, AttributeError, ModuleNotFoundError)):
      raise
    pytest.skip('the test module is not importable by name here')
  assert sorted(loaded) == sorted(convert_torch.REFERENCE_KEYS)


def test_cli_reports_bad_input_without_traceback(reference, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr('sys.argv', ['convert_torch', '--checkpoint', reference['pth'],
                                   '--variant', 'B/8', '--out', str(tmp_path / 'x')])
  with pytest.raises(SystemExit) as e:
    convert_torch.run()
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith('cjepa-convert-torch: error: ') and '(768, 3, 8, 8)' in err
  assert 'Ti/8' in err


def run_cli(monkeypatch, capsys, *args: str) -> str:
  """`cjepa-convert-torch ARGS` (its console entry point): asserts exit 1; returns stderr."""
  monkeypatch.setattr('sys.argv', ['cjepa-convert-torch', *args])
  with pytest.raises(SystemExit) as e:
    convert_torch.run()
  assert e.value.code == 1
  return capsys.readouterr().err


@pytest.mark.parametrize('trust', [False, True])
@pytest.mark.parametrize('kind', ['text', 'empty', 'png'])
def test_non_torch_file_is_refused_in_one_line(tmp_path, monkeypatch, capsys, kind, trust):
  """A text / empty / image file: one line naming it, no traceback, no --trust_pickle advice.

  (An image makes the safe unpickler fail on its first byte as on a disallowed object; advising
  --trust_pickle there would only lead to another failure.)
  """
  path = tmp_path / {'text': 'notes.txt', 'empty': 'empty.pth.tar', 'png': 'image.png'}[kind]
  if kind == 'text':
    path.write_text('hello, not a checkpoint\n')
  elif kind == 'empty':
    path.write_bytes(b'')
  else:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.new('RGB', (4, 4)).save(path)
  err = run_cli(monkeypatch, capsys, '--checkpoint', str(path), '--variant', VARIANT, '--out',
                str(tmp_path / 'out'), *(['--trust_pickle'] if trust else []))
  lines = [line for line in err.splitlines() if line.startswith('cjepa-convert-torch')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert lines[0].startswith(f'cjepa-convert-torch: error: {path} is not a PyTorch checkpoint '
                             '(torch.load failed: ')
  assert lines[0].endswith('; pass the .pth.tar file the reference code saved.')
  assert '--trust_pickle' not in err
  assert not (tmp_path / 'out').exists()


def test_trust_pickle_advice_only_without_the_flag(tmp_path, monkeypatch, capsys):
  """A real torch file of an unimportable class: advice (and why it is unsafe) only without it."""
  module_dir = tmp_path / 'modules'
  module_dir.mkdir()
  (module_dir / 'cjepa_gone_module.py').write_text('class Thing:\n  pass\n')
  sys.path.insert(0, str(module_dir))
  try:
    import cjepa_gone_module  # pylint: disable=g-import-not-at-top,import-error
    pth = tmp_path / 'odd.pth.tar'
    torch.save({'encoder': {}, 'thing': cjepa_gone_module.Thing()}, pth)
  finally:
    sys.path.remove(str(module_dir))
    sys.modules.pop('cjepa_gone_module', None)
  args = ('--checkpoint', str(pth), '--variant', VARIANT, '--out', str(tmp_path / 'out'))
  err = run_cli(monkeypatch, capsys, *args)
  assert err.startswith(f'cjepa-convert-torch: error: {pth} holds objects that '
                        'torch.load(weights_only=True) refuses'), err
  assert 'cjepa_gone_module.Thing' in err and 'rerun with --trust_pickle' in err
  assert 'can run arbitrary code' in err and len(err.strip().splitlines()) == 1
  err = run_cli(monkeypatch, capsys, *args, '--trust_pickle')
  assert err.startswith(f'cjepa-convert-torch: error: {pth} could not be loaded as a PyTorch '
                        'checkpoint (torch.load failed: ModuleNotFoundError: '), err
  assert '--trust_pickle' not in err and len(err.strip().splitlines()) == 1
