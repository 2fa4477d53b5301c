"""Tests for the ViT encoder and the predictor: reference shapes and parameter counts, numerics
against an independent float64 numpy forward pass, padding invariance, bf16, scan and remat."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cjepa_jax.models import predictor as predictor_lib
from cjepa_jax.models import vit

# Tiny test models: Ti width/heads, 2 blocks, 32x32 images with patch 8 -> a 4x4 grid.
TINY = 'Ti/8'
DEPTH = 2
IMG = 32
GRID = (IMG // 8, IMG // 8)
N = GRID[0] * GRID[1]


@functools.cache
def jit_apply(model):
  """model.apply, jitted once per model config (eager flax is slow on 2 CPU cores)."""
  return jax.jit(model.apply, static_argnames=('return_intermediates',))


@functools.cache
def jit_init(model):
  return jax.jit(model.init)


def n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def images(seed: int = 0, b: int = 2) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (b, IMG, IMG, 3), jnp.float32)


def tiny_encoder(**kw) -> vit.Encoder:
  return vit.Encoder(TINY, **(dict(depth=DEPTH) | kw))


def tiny_predictor(**kw) -> predictor_lib.Predictor:
  kw = dict(embed_dim=192, num_heads=3, grid=GRID, width=48, depth=DEPTH) | kw
  return predictor_lib.Predictor(**kw)


def predictor_inputs(seed: int = 1):
  """B=2, Kc=6 (last 2 of image 1 padded), M=3 blocks of Kt=4 (some padded slots)."""
  rng = np.random.default_rng(seed)
  ctx = rng.normal(size=(2, 6, 192)).astype(np.float32)
  ctx_idx = np.stack([rng.permutation(N)[:6] for _ in range(2)]).astype(np.int32)
  ctx_valid = np.ones((2, 6), bool)
  ctx_valid[1, 4:] = False
  tgt_idx = rng.integers(0, N, size=(2, 3, 4)).astype(np.int32)
  tgt_valid = np.ones((2, 3, 4), bool)
  tgt_valid[0, 1, 3] = tgt_valid[1, 2, 2:] = False
  return ctx, ctx_idx, ctx_valid, tgt_idx, tgt_valid


# ----------------------------------------------------------------------------------------------
# Independent float64 numpy reference (written from the paper / reference-code description).


def ref_sincos(gh: int, gw: int, dim: int) -> np.ndarray:
  """Per-token loop: first half encodes the column, second half the row; [sin | cos] each."""
  out = np.zeros((gh * gw, dim), np.float64)
  quarter = dim // 4
  for r in range(gh):
    for c in range(gw):
      for k in range(quarter):
        w = 1.0 / 10000 ** (k / quarter)
        t = r * gw + c
        out[t, k] = math.sin(c * w)
        out[t, quarter + k] = math.cos(c * w)
        out[t, 2 * quarter + k] = math.sin(r * w)
        out[t, 3 * quarter + k] = math.cos(r * w)
  return out


def np64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def ref_ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def ref_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def ref_block(x, p, heads, valid):
  """x [B, K, D] float64; valid [B, K] bool (keys)."""
  b, k, d = x.shape
  hd = d // heads
  y = ref_ln(x, p['norm1'])
  qkv = y @ p['attn']['qkv']['kernel'] + p['attn']['qkv']['bias']  # [B, K, 3D]
  # torch: reshape(B, N, 3, H, hd).
  q, kk, v = (qkv[..., i * d:(i + 1) * d].reshape(b, k, heads, hd) for i in range(3))
  att = np.einsum('bqhc,bkhc->bhqk', q, kk) / math.sqrt(hd)
  att = np.where(valid[:, None, None, :], att, -np.inf)
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  o = np.einsum('bhqk,bkhc->bqhc', att, v).reshape(b, k, d)
  x = x + o @ p['attn']['proj']['kernel'] + p['attn']['proj']['bias']
  y = ref_ln(x, p['norm2'])
  y = ref_gelu(y @ p['mlp']['fc1']['kernel'] + p['mlp']['fc1']['bias'])
  return x + y @ p['mlp']['fc2']['kernel'] + p['mlp']['fc2']['bias']


def ref_encoder(params, imgs, indices, valid, patch, heads):
  p = np64(params)
  imgs = np.asarray(imgs, np.float64)
  b, h, w, c = imgs.shape
  gh, gw = h // patch, w // patch
  patches = imgs.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, gh * gw, patch * patch * c)
  kern = p['patch_embed']['kernel']
  x = patches @ kern.reshape(-1, kern.shape[-1]) + p['patch_embed']['bias']
  x = x + ref_sincos(gh, gw, x.shape[-1])[None]
  x = np.stack([x[i, indices[i]] for i in range(b)])
  depth = len([k for k in p if k.startswith('blocks_')])
  for i in range(depth):
    x = ref_block(x, p[f'blocks_{i}'], heads, valid)
  return ref_ln(x, p['norm'])


def ref_predictor(params, ctx, ctx_idx, ctx_valid, tgt_idx, tgt_valid, grid, heads):
  p = np64(params)
  width = p['mask_token'].shape[-1]
  pos = ref_sincos(*grid, width)
  depth = len([k for k in p if k.startswith('blocks_')])
  b, m = tgt_idx.shape[:2]
  kc = ctx.shape[1]
  out = np.zeros(tgt_idx.shape + (ctx.shape[-1],))
  for i in range(b):
    z = np.asarray(ctx[i], np.float64) @ p['predictor_embed']['kernel']
    z = z + p['predictor_embed']['bias'] + pos[ctx_idx[i]]
    for j in range(m):  # Each target block on its own.
      t = p['mask_token'][0] + pos[tgt_idx[i, j]]
      x = np.concatenate([z, t])[None]
      valid = np.concatenate([ctx_valid[i], tgt_valid[i, j]])[None]
      for l in range(depth):
        x = ref_block(x, p[f'blocks_{l}'], heads, valid)
      y = ref_ln(x[0, kc:], p['predictor_norm'])
      out[i, j] = y @ p['predictor_proj']['kernel'] + p['predictor_proj']['bias']
  return out


# ----------------------------------------------------------------------------------------------
# Variants, parameter counts, shapes.


def test_parse_variant():
  v, patch = vit.parse_variant('H/14')
  assert (v['width'], v['depth'], v['num_heads'], patch) == (1280, 32, 16, 14)
  v, patch = vit.parse_variant('g/16')
  assert vit.mlp_dim(v['width'], v['mlp_ratio']) == 6144
  assert vit.parse_variant('Ti/4')[1] == 4
  for bad in ['H', 'X/16', 'H/0', 'h/14', 'H/14/2', 'vit_huge']:
    with pytest.raises(ValueError, match=r'<size>/<patch>.*Ti'):
      vit.parse_variant(bad)


# The reference's trainable parameter counts at 224 px (REFERENCE.md).
REFERENCE_COUNTS = {
    'Ti/16': 5_486_400, 'S/16': 21_589_632, 'B/16': 85_646_592, 'L/16': 303_098_880,
    'H/14': 630_434_560, 'H/16': 630_664_960, 'g/16': 1_011_092_608,
}


@pytest.mark.parametrize('variant', sorted(REFERENCE_COUNTS))
def test_encoder_param_count(variant):
  # Scanned layout for speed; the unscanned one holds the same leaves (checked for the small ones).
  scans = [True] if variant[0] in 'LHg' else [True, False]
  for scan in scans:
    model = vit.Encoder(variant, scan=scan)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert n_params(shapes) == REFERENCE_COUNTS[variant]


def test_predictor_param_count_vith14():
  model = predictor_lib.Predictor(embed_dim=1280, num_heads=16, grid=(16, 16), width=384,
                                  depth=12)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *map(jnp.asarray, (
      np.zeros((1, 8, 1280), np.float32), np.zeros((1, 8), np.int32), np.ones((1, 8), bool),
      np.zeros((1, 4, 5), np.int32), np.ones((1, 4, 5), bool))))
  assert n_params(shapes) == 22_279_424
  p = shapes['params']
  assert p['mask_token'].shape == (1, 1, 384)
  assert p['predictor_embed']['kernel'].shape == (1280, 384)
  assert p['predictor_proj']['kernel'].shape == (384, 1280)
  assert p['blocks_11']['attn']['qkv']['kernel'].shape == (384, 1152)


@pytest.mark.parametrize('size', list(vit.VARIANTS))
@pytest.mark.parametrize('patch', [16, 8])
def test_output_shapes(size, patch):
  v = vit.VARIANTS[size]
  d, depth = v['width'], v['depth']
  # Unscanned (canonical layout) once; scanned elsewhere, which traces one block, for speed.
  model = vit.Encoder(f'{size}/{patch}', scan=(size, patch) != ('Ti', 16))
  b, k, n = 2, 3, (32 // patch) ** 2
  x = jnp.zeros((b, 32, 32, 3))
  idx = jnp.zeros((b, k), jnp.int32)

  def run():
    params = model.init(jax.random.key(0), x)
    full = model.apply(params, x)
    out, inter = model.apply(params, x, idx, jnp.ones((b, k), bool), return_intermediates=True)
    return params, full, out, inter

  params, full, out, inter = jax.eval_shape(run)
  assert full.shape == (b, n, d) and out.shape == (b, k, d) and inter.shape == (depth, b, k, d)
  assert out.dtype == jnp.float32
  assert params['params']['patch_embed']['kernel'].shape == (patch, patch, 3, d)

  pred = predictor_lib.Predictor(embed_dim=d, num_heads=v['num_heads'],
                                 grid=(32 // patch,) * 2, depth=2)
  args = (out, idx, jnp.ones((b, k), bool), jnp.zeros((b, 4, 2), jnp.int32),
          jnp.ones((b, 4, 2), bool))
  y = jax.eval_shape(lambda *a: pred.apply(pred.init(jax.random.key(0), *a), *a), *args)
  assert y.shape == (b, 4, 2, d)


def test_encoder_properties_and_depth_override():
  m = vit.Encoder('g/14', depth=3)
  assert (m.width, m.num_heads, m.num_layers, m.patch_size) == (1408, 16, 3, 14)
  assert m.spec['mlp_dim'] == 6144
  assert vit.Encoder('g/14').num_layers == 40


def test_bad_inputs_raise():
  model = tiny_encoder()
  with pytest.raises(ValueError, match='30x32.*patch size 8'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 30, 32, 3)))
  with pytest.raises(ValueError, match='remat_policy'):
    jax.eval_shape(tiny_encoder(remat_policy='sometimes').init, jax.random.key(0),
                   jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='valid must be'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                   jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), bool))
  with pytest.raises(ValueError, match='divisible by 4'):
    vit.sincos_pos_embed_2d(2, 2, 6)


# ----------------------------------------------------------------------------------------------
# Position embedding and init.


@pytest.mark.parametrize('gh,gw,dim', [(4, 4, 192), (3, 5, 16), (16, 16, 384)])
def test_sincos_matches_float64_formula(gh, gw, dim):
  got = vit.sincos_pos_embed_2d(gh, gw, dim)
  assert got.shape == (gh * gw, dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref_sincos(gh, gw, dim), rtol=0, atol=1e-6)
  # Column-major first half: tokens (0, 1) and (1, 1) share the first half, differ in the second.
  np.testing.assert_array_equal(got[1, :dim // 2], got[gw + 1, :dim // 2])
  assert not np.allclose(got[1, dim // 2:], got[gw + 1, dim // 2:])


def test_init_distribution():
  params = jit_init(tiny_encoder(depth=1))(jax.random.key(0), images(b=1))['params']
  kernels = np.concatenate([np.ravel(params['blocks_0'][a][b]['kernel'])
                            for a, b in [('attn', 'qkv'), ('attn', 'proj'), ('mlp', 'fc1'),
                                         ('mlp', 'fc2')]] +
                           [np.ravel(params['patch_embed']['kernel'])])
  # torch trunc_normal_(std=.02, a=-2, b=2) is a plain N(0, .02^2): std .02, kurtosis 3.
  assert abs(kernels.std() - 0.02) < 3e-4 and abs(kernels.mean()) < 2e-4
  kurt = np.mean((kernels / kernels.std()) ** 4)
  assert abs(kurt - 3.0) < 0.05, kurt  # +-2-std truncation would give ~2.4.
  for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(leaf_path)
    if 'bias' in name:
      np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
    elif 'scale' in name:
      np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
  mask_token = jit_init(tiny_predictor(width=384, num_heads=6, depth=1))(
      jax.random.key(1), *predictor_inputs())['params']['mask_token']
  assert mask_token.shape == (1, 1, 384) and 0.015 < np.std(mask_token) < 0.025


# ----------------------------------------------------------------------------------------------
# Numerics against the float64 reference.


def random_params(model, *args, seed: int = 0):
  """Params with the model's init layout, drawn with numpy (jax's threefry init compiles slowly on
  CPU): kernels N(0, 0.05^2), LayerNorm scales 1 + N(0, 0.05^2), biases and the rest N(0, 0.05^2),
  so every parameter takes part in the reference comparisons."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)['params']
  rng = np.random.default_rng(seed)

  def draw(path, s):
    x = 0.05 * rng.standard_normal(s.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      x += 1.0
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def enc_params():
  return random_params(tiny_encoder(), images(), seed=0)


@pytest.fixture(scope='module')
def pred_params():
  return random_params(tiny_predictor(), *predictor_inputs(), seed=1)


def test_encoder_matches_float64_reference(enc_params):
  params = enc_params
  x = images(5)
  idx = np.array([[0, 5, 15, 3, 9], [2, 2, 7, 11, 0]], np.int32)
  valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  got = jit_apply(tiny_encoder())({'params': params}, x, idx, valid)
  want = ref_encoder(params, x, idx, valid, patch=8, heads=3)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


def test_predictor_matches_float64_reference(pred_params):
  params = pred_params
  inputs = predictor_inputs()
  got = jit_apply(tiny_predictor())({'params': params}, *inputs)
  want = ref_predictor(params, *inputs, grid=GRID, heads=3)
  assert got.shape == (2, 3, 4, 192)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


def test_all_indices_equals_no_indices(enc_params):
  model = tiny_encoder()
  x = images(1)
  full = jit_apply(model)({'params': enc_params}, x)
  idx = jnp.tile(jnp.arange(N)[None], (2, 1))
  np.testing.assert_allclose(jit_apply(model)({'params': enc_params}, x, idx), full, atol=1e-6)
  perm = jnp.asarray(np.random.default_rng(0).permutation(N))
  np.testing.assert_allclose(  # Permutation-equivariant: position comes from pos embed only.
      jit_apply(model)({'params': enc_params}, x, jnp.tile(perm[None], (2, 1))), full[:, perm],
      atol=1e-5)


def test_encoder_padding_invariance(enc_params):
  model = tiny_encoder()
  x = np.asarray(images(2))
  idx = np.array([[1, 4, 6, 0, 0], [3, 8, 9, 12, 0]], np.int32)
  valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
  apply = jit_apply(model)
  base, inter = apply({'params': enc_params}, x, idx, valid, return_intermediates=True)
  # Padded slots point at other patches, and those patches' pixels change.
  idx2 = np.array([[1, 4, 6, 15, 10], [3, 8, 9, 12, 14]], np.int32)
  x2 = x.copy()
  x2[0, 24:32, 24:32] = 7.0   # patch 15 of image 0
  x2[0, 16:24, 16:24] = -3.0  # patch 10
  x2[1, 24:32, 16:24] = 5.0   # patch 14 of image 1
  out, inter2 = apply({'params': enc_params}, x2, idx2, valid, return_intermediates=True)
  np.testing.assert_allclose(out[valid], base[valid], rtol=0, atol=1e-6)
  np.testing.assert_allclose(inter2[:, valid], inter[:, valid], rtol=0, atol=1e-6)
  assert not np.allclose(out[~valid], base[~valid])  # The padded slots did change.
  # Without the mask the padded tokens would leak into the valid ones.
  leak = jit_apply(model)({'params': enc_params}, x2, idx2)
  assert not np.allclose(leak[valid], base[valid], atol=1e-3)
  # Out-of-range padded indices are clipped, not NaN.
  idx3 = idx2.copy()
  idx3[0, 4] = 10_000
  out3 = jit_apply(model)({'params': enc_params}, x2, idx3, valid)
  assert np.isfinite(out3).all()
  np.testing.assert_allclose(out3[valid], base[valid], rtol=0, atol=1e-6)


def test_predictor_padding_invariance(pred_params):
  model = tiny_predictor()
  ctx, ctx_idx, ctx_valid, tgt_idx, tgt_valid = predictor_inputs()
  base = jit_apply(model)({'params': pred_params}, ctx, ctx_idx, ctx_valid, tgt_idx, tgt_valid)
  ctx2, ctx_idx2, tgt_idx2 = ctx.copy(), ctx_idx.copy(), tgt_idx.copy()
  ctx2[~ctx_valid] = 9.0
  ctx_idx2[~ctx_valid] = 0
  tgt_idx2[~tgt_valid] = (tgt_idx[~tgt_valid] + 5) % N
  out = jit_apply(model)({'params': pred_params}, ctx2, ctx_idx2, ctx_valid, tgt_idx2, tgt_valid)
  np.testing.assert_allclose(out[tgt_valid], base[tgt_valid], rtol=0, atol=1e-6)
  assert not np.allclose(out[~tgt_valid], base[~tgt_valid])
  # Target blocks are independent passes: changing block 2 leaves blocks 0 and 1 alone.
  tgt_idx3 = tgt_idx.copy()
  tgt_idx3[:, 2] = (tgt_idx3[:, 2] + 1) % N
  out3 = jit_apply(model)({'params': pred_params}, ctx, ctx_idx, ctx_valid, tgt_idx3, tgt_valid)
  np.testing.assert_allclose(out3[:, :2], base[:, :2], rtol=0, atol=1e-6)
  assert not np.allclose(out3[:, 2], base[:, 2])


# ----------------------------------------------------------------------------------------------
# bfloat16, scan, remat.


def test_bfloat16_close_to_float32(enc_params, pred_params):
  x = images(3)
  out32 = jit_apply(tiny_encoder())({'params': enc_params}, x)
  out16 = jit_apply(tiny_encoder(dtype=jnp.bfloat16))({'params': enc_params}, x)
  assert out16.dtype == jnp.bfloat16
  # Outputs are LayerNormed (unit scale); bf16 has an 8-bit mantissa (rel. step 2^-8 = 0.004).
  err = np.abs(np.asarray(out16, np.float32) - out32)
  # Measured: mean 0.004, max 0.02 (float32 residual stream and LayerNorms).
  assert err.mean() < 0.01 and err.max() < 0.08, (err.mean(), err.max())
  inputs = predictor_inputs()
  p32 = jit_apply(tiny_predictor())({'params': pred_params}, *inputs)
  p16 = jit_apply(tiny_predictor(dtype=jnp.bfloat16))({'params': pred_params}, *inputs)
  assert p16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(p16, np.float32) - p32) / np.abs(p32).mean()
  # Relative to the mean output magnitude; measured: mean 0.004, max 0.03.
  assert err.mean() < 0.01 and err.max() < 0.08, (err.mean(), err.max())


def test_scan_equals_unscanned(enc_params, pred_params):
  scanned = vit.unscanned_to_scan(enc_params)
  assert 'blocks' in scanned and 'blocks_0' not in scanned
  assert scanned['blocks']['attn']['qkv']['kernel'].shape == (DEPTH, 192, 576)
  # The scanned model's own init has exactly this layout.
  init_shapes = jax.eval_shape(tiny_encoder(scan=True).init, jax.random.key(0), images())
  assert (jax.tree.structure(init_shapes['params']) == jax.tree.structure(scanned))
  assert jax.tree.map(jnp.shape, init_shapes['params']) == jax.tree.map(jnp.shape, scanned)
  back = vit.scan_to_unscanned(scanned)
  jax.tree.map(np.testing.assert_array_equal, back, enc_params)

  x = images(4)
  idx = jnp.array([[0, 3, 5, 9, 9], [1, 2, 15, 4, 6]])
  valid = jnp.array([[True, True, True, False, False], [True] * 5])
  a, ia = jit_apply(tiny_encoder())({'params': enc_params}, x, idx, valid,
                                    return_intermediates=True)
  b, ib = jit_apply(tiny_encoder(scan=True))({'params': scanned}, x, idx, valid,
                                        return_intermediates=True)
  # Two float32 programs that fuse differently: outputs of order 1 agree to a few ulps.
  np.testing.assert_allclose(b, a, rtol=0, atol=2e-6)
  np.testing.assert_allclose(ib, ia, rtol=0, atol=2e-6)
  assert ia.shape == (DEPTH, 2, 5, 192)
  # The last intermediate, normed by the final LayerNorm, is the output.
  np.testing.assert_allclose(ref_ln(np.asarray(ia[-1], np.float64), np64(enc_params['norm'])),
                             a, atol=1e-5)

  inputs = predictor_inputs()
  pa = jit_apply(tiny_predictor())({'params': pred_params}, *inputs)
  pb = jit_apply(tiny_predictor(scan=True))({'params': vit.unscanned_to_scan(pred_params)},
                                            *inputs)
  np.testing.assert_allclose(pb, pa, rtol=0, atol=1e-6)


def test_remat_same_gradients(enc_params):
  """'full' remat (unscanned) and a jax.checkpoint_policies policy (scanned) vs no remat."""
  x = images(6)
  idx = jnp.array([[0, 3, 5, 8], [1, 2, 15, 4]])
  valid = jnp.array([[True, True, True, False], [True, True, True, True]])

  def grads(model, params):
    def loss(p):
      return jnp.sum(jnp.sin(model.apply({'params': p}, x, idx, valid)))
    return jax.jit(jax.value_and_grad(loss))(params)

  l0, g0 = grads(tiny_encoder(), enc_params)
  assert np.abs(g0['patch_embed']['kernel']).max() > 0  # Real gradients, not zeros.
  scanned = vit.unscanned_to_scan(enc_params)
  for model, params in [(tiny_encoder(remat_policy='full'), enc_params),
                        (tiny_encoder(remat_policy='dots_with_no_batch_dims_saveable', scan=True),
                         scanned)]:
    l1, g1 = grads(model, params)
    # The loss sums 1,536 terms of order 1 down to about 1: float32 rounding of that sum.
    np.testing.assert_allclose(l1, l0, rtol=0, atol=3e-5)
    g1 = vit.scan_to_unscanned(g1) if model.scan else g1
    assert jax.tree.structure(g1) == jax.tree.structure(g0)
    # Recomputation may fuse differently: compare each leaf relative to its own scale.
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize('scan', [False, True])
def test_attention_impl_reaches_every_attention_call(monkeypatch, enc_params, pred_params, scan):
  """`attention_impl` is handed to jax.nn.dot_product_attention by every block of both models.

  The kernel itself is jax's; cuDNN's needs a GPU, so on CPU a spy records the requested
  implementation while tracing and answers with the XLA kernel: the outputs must be unchanged.
  """
  seen = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kw):
    seen.append(implementation)
    return real(*args, implementation='xla', **kw)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  enc_p = vit.unscanned_to_scan(enc_params) if scan else enc_params
  pred_p = vit.unscanned_to_scan(pred_params) if scan else pred_params
  x = images(7)
  want_enc = jit_apply(tiny_encoder(scan=scan))({'params': enc_p}, x)
  want_pred = jit_apply(tiny_predictor(scan=scan))({'params': pred_p}, *predictor_inputs())
  seen.clear()  # The jitted references above may trace through the spy too.

  enc = tiny_encoder(scan=scan, attention_impl='cudnn')
  got_enc = jax.jit(enc.apply)({'params': enc_p}, x)
  pred = tiny_predictor(scan=scan, attention_impl='cudnn')
  got_pred = jax.jit(pred.apply)({'params': pred_p}, *predictor_inputs())
  # The unrolled models trace each of their DEPTH blocks once; nn.scan traces its one body more
  # than once (shape inference), so only 'every call asked for cudnn' is exact there.
  assert set(seen) == {'cudnn'} and (len(seen) >= 2 if scan else len(seen) == 2 * DEPTH), seen
  np.testing.assert_array_equal(got_enc, want_enc)
  np.testing.assert_array_equal(got_pred, want_pred)


def test_unknown_attention_impl_is_refused():
  with pytest.raises(ValueError, match="'flash'.*'xla', 'cudnn'"):
    jax.eval_shape(tiny_encoder(attention_impl='flash').init, jax.random.key(0), images())


def test_drop_path_at_rate_zero_and_at_evaluation_leaves_outputs_bitwise_unchanged():
  """Drop path (for fine-tuning) never touches pretraining or evaluation: rate 0, or train=False."""
  images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  plain = vit.Encoder('Ti/4', depth=3)
  params = plain.init(jax.random.key(0), images)['params']
  want = np.asarray(jax.jit(plain.apply)({'params': params}, images))
  dropping = vit.Encoder('Ti/4', depth=3, drop_path_rate=0.3)
  at_eval = jax.jit(dropping.apply)({'params': params}, images)
  zero = jax.jit(lambda p, x: vit.Encoder('Ti/4', depth=3).apply(
      {'params': p}, x, train=True, rngs={'dropout': jax.random.key(1)}))(params, images)
  np.testing.assert_array_equal(np.asarray(at_eval), want)
  np.testing.assert_array_equal(np.asarray(zero), want)
  # In training it acts: per example, with the block's own rate (0 for the first block).
  trained = jax.jit(lambda p, x, k: dropping.apply({'params': p}, x, train=True,
                                                   rngs={'dropout': k}))
  outs = [np.asarray(trained(params, images, jax.random.key(s))) for s in range(4)]
  assert any(not np.array_equal(o, want) for o in outs)
  with pytest.raises(ValueError, match='needs model.scan=False'):
    vit.Encoder('Ti/4', depth=3, drop_path_rate=0.1, scan=True).init(jax.random.key(0), images)


def test_drop_path_keeps_the_expected_value_of_each_branch():
  """A Block's branch is zeroed with probability p and the rest scaled by 1/(1-p): mean kept."""
  block = vit.Block(num_heads=3, mlp_dim=16, drop_path=0.25, deterministic=False)
  y = jnp.ones((4000, 2, 12))
  kept = jax.jit(lambda k: block.apply({}, y, method=vit.Block._drop_path,  # pylint: disable=protected-access
                                       rngs={'dropout': k}))(jax.random.key(2))
  kept = np.asarray(kept)
  per_example = kept[:, 0, 0]
  assert set(np.unique(per_example)) == {0.0, np.float32(1 / 0.75)}
  assert abs((per_example == 0).mean() - 0.25) < 0.03
  assert (kept == kept[:, :1, :1]).all()   # One draw per example.
