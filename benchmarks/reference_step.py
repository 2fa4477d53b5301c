r"""Times the reference PyTorch I-JEPA train step and this project's step side by side on a CPU.

  python benchmarks/reference_step.py --reference_dir /path/to/ijepa --shape depth12 --json
  python benchmarks/reference_step.py --reference_dir /path/to/ijepa --shape cifar --rounds 3

The reference is a checkout of github.com/facebookresearch/ijepa (its `src/` package), which the
user points to with `--reference_dir`; nothing of it is copied here. It needs a CPU torch wheel:
`pip install -e '.[torch]'` (or `pip install torch --index-url https://download.pytorch.org/whl/cpu`).

The reference step is its training loop's `train_step` (src/train.py) on its own modules: the
ViT and predictor of `src/models/vision_transformer.py` built and initialised by
`src/helper.init_model`, AdamW with its weight-decay groups and lr / wd schedulers from
`src/helper.init_opt`, the target forward (layer norm, `apply_masks`, `repeat_interleave_batch`),
the context forward and predictor, smooth-L1, backward, `optimizer.step`, its gradient logger
(`src/utils/logging.grad_logger`), `zero_grad` and the EMA update; float32, no autocast. Its masks
come from its `MaskCollator` (`src/masks/multiblock.py`) with this project's mask settings
(scales, aspect ratios, nenc 1, npred 4, min_keep), collated before the timing as its DataLoader
workers would (the collation time is reported separately, `collate_ms`). The project's step is
`benchmarks/step.py`'s (the jitted `train_step.setup` step, masks drawn inside it).

Each measurement is its own process, pinned to the same CPUs (`--cpus`, default all of this
process's) with the same thread count (`torch.set_num_threads`; XLA:CPU sizes its pool from the
affinity mask), and the two alternate (project, reference, reference, project, ...) for
`--rounds` rounds so that load drift hits both alike. Reported: each side's median img/s over
its runs, `ratio` = project / reference of those medians, and the ratio of each round's pair
(`ratios`). `--which reference|project` runs one side in this process (what the driver calls).

Shapes (`--shape`): `depth12` = ViT-Ti/4 depth 12 at 32 px, batch 128, predictor 6 x 192;
`cifar` = configs/cifar10_vit_tiny.py's model: depth 4, batch 64, predictor 3 x 96. Both on the
8 x 8 grid with min_keep 4 and the project's default context budget (11 tokens); the flags after
`--shape` override single sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)

SHAPES = {
    'depth12': dict(depth=12, batch_size=128, pred_depth=6, pred_width=192),
    'cifar': dict(depth=4, batch_size=64, pred_depth=3, pred_width=96),
}
# The ViT-Ti width and heads (REFERENCE.md); patch 4 at 32 px is the 8 x 8 grid.
WIDTH, HEADS, PATCH, IMAGE_SIZE = 192, 3, 4, 32


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='benchmarks/reference_step.py', description=__doc__.split('\n')[0])
  p.add_argument('--reference_dir', default=os.environ.get('IJEPA_REFERENCE_DIR', ''),
                 help='A checkout of facebookresearch/ijepa (the folder that holds src/).')
  p.add_argument('--shape', default='depth12', choices=sorted(SHAPES))
  p.add_argument('--depth', type=int, default=0, help='> 0 overrides the shape.')
  p.add_argument('--batch_size', type=int, default=0, help='> 0 overrides the shape.')
  p.add_argument('--pred_depth', type=int, default=0, help='> 0 overrides the shape.')
  p.add_argument('--pred_width', type=int, default=0, help='> 0 overrides the shape.')
  p.add_argument('--min_keep', type=int, default=4)
  p.add_argument('--steps', type=int, default=10, help='Timed steps per run (median reported).')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--rounds', type=int, default=2, help='Alternating rounds of the two sides.')
  p.add_argument('--threads', type=int, default=0, help='0: the number of --cpus.')
  p.add_argument('--cpus', default='', help="CPU list, e.g. '0,1'; '': this process's affinity.")
  p.add_argument('--which', default='both',
                 choices=('both', 'reference', 'project', 'profile_reference', 'profile_project',
                          'project_ab'))
  p.add_argument('--xla_options', default='xla_cpu_experimental_ynn_fusion_type=',
                 help="project_ab: B's XLA compiler options, 'opt=value;opt2=value2'.")
  p.add_argument('--profile_steps', type=int, default=2, help='Steps the profile modes trace.')
  p.add_argument('--project_args', default='',
                 help="Extra flags for benchmarks/step.py, e.g. '--dtype bfloat16'.")
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', action='store_true', help='Print one JSON object as the last line.')
  args = p.parse_args(argv)
  for k, v in SHAPES[args.shape].items():
    if not getattr(args, k):
      setattr(args, k, v)
  if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 0:
    p.error('--steps and --rounds must be >= 1, --warmup and --threads >= 0.')
  cpus = parse_cpus(args.cpus)
  args.cpu_list = cpus
  args.threads = args.threads or len(cpus)
  if args.which in ('both', 'reference', 'profile_reference') and not args.reference_dir:
    p.error('--reference_dir (or $IJEPA_REFERENCE_DIR) is needed to time the reference.')
  return args


def parse_cpus(spec: str) -> list[int]:
  """'0,1' or '0-3' -> sorted CPU ids; '' -> this process's affinity."""
  if not spec:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else list(
        range(os.cpu_count() or 1))
  out = set()
  for part in spec.split(','):
    if '-' in part:
      lo, hi = part.split('-')
      out.update(range(int(lo), int(hi) + 1))
    elif part:
      out.add(int(part))
  return sorted(out)


def mask_settings(min_keep: int) -> dict[str, Any]:
  """The project's mask settings (config.default_config().mask, min_keep as the recipe) as the
  reference MaskCollator's keyword arguments."""
  from cjepa_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  m = config_lib.default_config().mask
  return dict(input_size=IMAGE_SIZE, patch_size=PATCH, pred_mask_scale=tuple(m.pred_scale),
              enc_mask_scale=tuple(m.enc_scale), aspect_ratio=tuple(m.pred_aspect),
              nenc=int(m.nenc), npred=int(m.npred), allow_overlap=bool(m.allow_overlap),
              min_keep=int(min_keep))


def project_argv(args: argparse.Namespace) -> list[str]:
  """benchmarks/step.py's flags for the same shape."""
  argv = ['--variant', f'Ti/{PATCH}', '--depth', str(args.depth), '--image_size', str(IMAGE_SIZE),
          '--batch_size', str(args.batch_size), '--dtype', 'float32', '--pred_depth',
          str(args.pred_depth), '--pred_width', str(args.pred_width), '--min_keep',
          str(args.min_keep), '--steps', str(args.steps), '--warmup', str(args.warmup),
          '--seed', str(args.seed), '--json']
  return argv + args.project_args.split()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Median img/s of each side, their ratio (project / reference) and each round's ratio."""
  side = {w: [r['images_per_s'] for r in runs if r['which'] == w] for w in ('project', 'reference')}
  out: dict[str, Any] = {f'{w}_images_per_s': (statistics.median(v) if v else None)
                         for w, v in side.items()}
  out.update({f'{w}_runs': v for w, v in side.items()})
  p, r = out['project_images_per_s'], out['reference_images_per_s']
  out['ratio'] = p / r if p and r else None
  rounds: dict[int, dict[str, float]] = {}
  for run in runs:
    rounds.setdefault(run['round'], {})[run['which']] = run['images_per_s']
  out['ratios'] = [d['project'] / d['reference'] for _, d in sorted(rounds.items())
                   if d.get('project') and d.get('reference')]
  return out


# ------------------------------------------------------------------------------------------------
# The reference side (torch), run in its own process.

def _reference_step_fn(args: argparse.Namespace, phases: bool = False):
  """Builds the reference models, optimizer and masks; returns (step, batches, info).

  `phases` labels the step's parts for torch.profiler (record_function 'ref/<part>')."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  ref = os.path.abspath(args.reference_dir)
  if not os.path.isfile(os.path.join(ref, 'src', 'models', 'vision_transformer.py')):
    raise FileNotFoundError(f'{ref} is not an ijepa checkout (no src/models/vision_transformer.py)')
  sys.path.insert(0, ref)
  import logging  # pylint: disable=g-import-not-at-top
  import src.helper as helper  # pylint: disable=g-import-not-at-top
  import src.models.vision_transformer as vit  # pylint: disable=g-import-not-at-top
  from src.masks.multiblock import MaskCollator  # pylint: disable=g-import-not-at-top
  from src.masks.utils import apply_masks  # pylint: disable=g-import-not-at-top
  from src.utils.logging import grad_logger  # pylint: disable=g-import-not-at-top
  from src.utils.tensors import repeat_interleave_batch  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.WARNING)  # helper logs the whole model at INFO.

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  # vit_tiny fixes depth 12: the same constructor call with the benchmark's depth.
  name = f'_bench_vit_tiny_depth{args.depth}'
  vit.__dict__[name] = functools.partial(
      vit.VisionTransformer, embed_dim=WIDTH, depth=args.depth, num_heads=HEADS, mlp_ratio=4,
      qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
  device = torch.device('cpu')
  encoder, predictor = helper.init_model(device=device, patch_size=PATCH, crop_size=IMAGE_SIZE,
                                         pred_depth=args.pred_depth,
                                         pred_emb_dim=args.pred_width, model_name=name)
  import copy  # pylint: disable=g-import-not-at-top
  target_encoder = copy.deepcopy(encoder)
  for p in target_encoder.parameters():
    p.requires_grad = False
  ipe, epochs = 1000, 100
  optimizer, _, scheduler, wd_scheduler = helper.init_opt(
      encoder=encoder, predictor=predictor, wd=0.04, final_wd=0.4, start_lr=2e-4, ref_lr=1e-3,
      final_lr=1e-6, iterations_per_epoch=ipe, warmup=1, num_epochs=epochs, ipe_scale=1.0,
      use_bfloat16=False)
  momentum = iter([0.996 + i * (1.0 - 0.996) / (ipe * epochs) for i in range(ipe * epochs + 1)])

  collator = MaskCollator(**mask_settings(args.min_keep))
  g = torch.Generator().manual_seed(args.seed + 1)
  batches, collate_s = [], []
  for _ in range(3):
    items = [(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g), 0)
             for _ in range(args.batch_size)]
    t = time.perf_counter()
    (imgs, _), masks_enc, masks_pred = collator(items)
    collate_s.append(time.perf_counter() - t)
    batches.append((imgs, masks_enc, masks_pred))

  part = ((lambda name: torch.profiler.record_function(f'ref/{name}')) if phases else
          (lambda name: contextlib.nullcontext()))

  def train_step(imgs, masks_enc, masks_pred):  # src/train.py's, in its order.
    with part('schedulers'):
      scheduler.step()
      wd_scheduler.step()
    with part('target forward'), torch.no_grad():
      h = target_encoder(imgs)
      h = torch.nn.functional.layer_norm(h, (h.size(-1),))
      b = len(h)
      h = apply_masks(h, masks_pred)
      h = repeat_interleave_batch(h, b, repeat=len(masks_enc))
    with part('context encoder forward'):
      z = encoder(imgs, masks_enc)
    with part('predictor forward'):
      z = predictor(z, masks_enc, masks_pred)
    with part('loss'):
      loss = torch.nn.functional.smooth_l1_loss(z, h)
    with part('backward'):
      loss.backward()
    with part('optimizer (AdamW)'):
      optimizer.step()
    with part('monitoring (grad_logger)'):
      grad_logger(encoder.named_parameters())
    with part('zero_grad'):
      optimizer.zero_grad()
    with part('EMA'), torch.no_grad():
      m = next(momentum)
      for q, k in zip(encoder.parameters(), target_encoder.parameters()):
        k.data.mul_(m).add_((1. - m) * q.detach().data)
    return float(loss.detach())

  info = dict(
      context_tokens=[int(b[1][0].shape[1]) for b in batches],
      target_tokens=[int(b[2][0].shape[1]) for b in batches],
      collate_ms=1e3 * statistics.median(collate_s), torch_version=torch.__version__,
      torch_threads=torch.get_num_threads())
  return train_step, batches, info


def time_reference(args: argparse.Namespace) -> dict[str, Any]:
  step, batches, info = _reference_step_fn(args)
  for i in range(args.warmup):
    step(*batches[i % len(batches)])
  times, loss = [], None
  for i in range(args.steps):
    t = time.perf_counter()
    loss = step(*batches[(args.warmup + i) % len(batches)])
    times.append(time.perf_counter() - t)
  st = statistics.median(times)
  return dict(info, which='reference', images_per_s=args.batch_size / st, step_time_s=st,
              step_time_min_s=min(times), step_time_max_s=max(times), loss=loss)


def time_project(args: argparse.Namespace) -> dict[str, Any]:
  sys.path.insert(0, _HERE)
  sys.path.insert(0, _REPO)
  import step as step_bench  # pylint: disable=g-import-not-at-top
  from cjepa_jax import cpu_flags  # pylint: disable=g-import-not-at-top
  cpu_flags.apply()  # As benchmarks/step.py and training do.
  sargs = step_bench.parse_args(project_argv(args))
  config = step_bench.build_config(sargs)
  r = step_bench.run_benchmark(config, steps=sargs.steps, warmup=sargs.warmup,
                               log=lambda s: print(s, file=sys.stderr))
  return dict(which='project', images_per_s=r['images_per_s'], step_time_s=r['step_time_s'],
              step_time_min_s=r['step_time_min_s'], step_time_max_s=r['step_time_max_s'],
              context_tokens=r['context_tokens'], target_tokens=r['target_tokens'],
              compile_s=r['compile_s'], xla_flags=r['xla_flags'], jax_version=r['jax_version'],
              finite=r['finite'])


# ------------------------------------------------------------------------------------------------
# Profiles: where each step's time goes.

# (category, regex on the op's name stack), first match wins. The step names its phases with
# jax.named_scope (masks, target, optimizer, ema, monitoring); flax adds the module path.
PROJECT_CATEGORIES = (
    ('masks', r'(^|/)masks/'),
    ('optimizer (AdamW)', r'(^|/)optimizer/'),
    ('EMA', r'(^|/)ema/'),
    ('monitoring outputs', r'(^|/)monitoring/'),
    ('attention: qkv / proj GEMMs', r'/attn/(qkv|proj)/'),
    ('attention: scores, softmax, values', r'/attn/'),
    ('MLP: fc1, GELU, fc2', r'/mlp/'),
    ('layer norms', r'norm'),
    ('token gathers / scatters', r'gather|scatter|take_along_axis|dynamic_slice|dynamic_update'),
    ('patch embedding', r'patch_embed|conv_general'),
    ('loss', r'loss|huber|smooth_l1|abs|where'),
)


def parse_hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Optimised HLO text -> {instruction name: op_name metadata}; an instruction without one
  (a fusion, often) takes the first op_name inside the computation it calls."""
  import re  # pylint: disable=g-import-not-at-top
  instr = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
  comp = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*[({].*\{\s*$')
  own, calls, first_in = {}, {}, {}
  current = None
  for line in hlo_text.splitlines():
    m = comp.match(line)
    if m and '=' not in line.split('{')[0]:
      current = m.group(1)
      continue
    m = instr.match(line)
    if not m:
      continue
    name, rest = m.groups()
    op = re.search(r'op_name="([^"]*)"', rest)
    if op:
      own[name] = op.group(1)
      if current and current not in first_in:
        first_in[current] = op.group(1)
    c = re.search(r'calls=%?([\w.\-]+)', rest)
    if c:
      calls[name] = c.group(1)
  for name, callee in calls.items():
    if name not in own and callee in first_in:
      own[name] = first_in[callee]
  return own


def classify_op(op_name: str, categories=PROJECT_CATEGORIES) -> tuple[str, str]:
  """(category, phase) of an op's name stack; phase: target forward / forward / backward / -."""
  import re  # pylint: disable=g-import-not-at-top
  cat = next((c for c, rx in categories if re.search(rx, op_name)), 'other (copies, transposes, '
             'reshapes, elementwise)')
  if '/target/' in op_name or op_name.startswith('target/'):
    phase = 'target forward'
  elif 'transpose(' in op_name:
    phase = 'backward'
  elif 'jvp(' in op_name:
    phase = 'forward'
  else:
    phase = '-'
  return cat, phase


def tabulate(durations: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
  """[{category, phase, ms, share}] sorted by time; share of the summed op time."""
  total = sum(durations.values()) or 1.0
  rows = [dict(category=c, phase=p, ms=v, share=v / total) for (c, p), v in durations.items()]
  return sorted(rows, key=lambda r: -r['ms'])


def profile_project(args: argparse.Namespace, steps: int) -> dict[str, Any]:
  """Per-op times of `steps` traced project steps (XLA:CPU's per-thunk TraceMe), by category."""
  flag = '--xla_cpu_enable_xprof_traceme=true'
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _HERE)
  sys.path.insert(0, _REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import step as step_bench  # pylint: disable=g-import-not-at-top
  from cjepa_jax import sharding  # pylint: disable=g-import-not-at-top
  from cjepa_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top
  from cjepa_jax import cpu_flags  # pylint: disable=g-import-not-at-top
  cpu_flags.apply()
  config = step_bench.build_config(step_bench.parse_args(project_argv(args)))
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  compiled = run.jitted_step.lower(
      step_bench._abstract(run.abstract_state, run.state_shardings),  # pylint: disable=protected-access
      sharding.abstract_batch(config.batch_size, config.data.image_size, mesh)).compile()
  names = parse_hlo_op_names(compiled.as_text())
  state = run.init_fn()
  batches = step_bench.synthetic_batches(config, mesh)
  for i in range(max(1, args.warmup)):
    state, metrics, _ = compiled(state, batches[i % len(batches)])
  jax.block_until_ready((state, metrics))
  trace_dir = tempfile.mkdtemp(prefix='project_profile_')
  t = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(steps):
      state, metrics, _ = compiled(state, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
  wall = (time.perf_counter() - t) / steps
  path = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  durations: dict[tuple[str, str], float] = {}
  per_op: dict[str, float] = {}
  for e in events:
    if e.get('ph') != 'X' or e.get('name') not in names:
      continue
    key = classify_op(names[e['name']])
    ms = e.get('dur', 0) / 1e3 / steps
    durations[key] = durations.get(key, 0.0) + ms
    per_op[e['name']] = per_op.get(e['name'], 0.0) + ms
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
  return dict(which='project_profile', step_wall_ms=wall * 1e3, op_ms=sum(durations.values()),
              table=tabulate(durations), trace_dir=trace_dir,
              top_ops=[dict(op=k, ms=v, op_name=names[k], category=classify_op(names[k])[0])
                       for k, v in top])


def profile_reference(args: argparse.Namespace, steps: int) -> dict[str, Any]:
  """torch.profiler over `steps` reference steps: the step's phases and the top aten ops."""
  import torch  # pylint: disable=g-import-not-at-top
  step, batches, _ = _reference_step_fn(args, phases=True)
  for i in range(max(1, args.warmup)):
    step(*batches[i % len(batches)])
  t = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for i in range(steps):
      step(*batches[i % len(batches)])
  wall = (time.perf_counter() - t) / steps
  rows = []
  for e in prof.key_averages():
    rows.append(dict(op=e.key, self_ms=e.self_cpu_time_total / 1e3 / steps,
                     total_ms=e.cpu_time_total / 1e3 / steps, calls=e.count // steps))
  phases = [r for r in rows if r['op'].startswith('ref/')]
  ops = sorted((r for r in rows if not r['op'].startswith('ref/')), key=lambda r: -r['self_ms'])
  return dict(which='reference_profile', step_wall_ms=wall * 1e3,
              phases=sorted(phases, key=lambda r: -r['total_ms']), top_ops=ops[:25])


def parse_xla_options(spec: str) -> dict[str, str]:
  """'opt=value;opt2=value2' (values may be empty) -> {opt: value}; leading dashes dropped."""
  out = {}
  for item in filter(None, (x.strip() for x in spec.split(';'))):
    key, _, value = item.partition('=')
    out[key.strip().lstrip('-')] = value
  return out


def project_ab(args: argparse.Namespace) -> dict[str, Any]:
  """The project's step compiled twice in this process: A with XLA_FLAGS as the process has them
  (the project's own CPU options are NOT added), B with `--xla_options` on top (as compiler
  options); the two executables then alternate step by step (A B B A ...), each on its own copy
  of the same initial state, so that load drift hits both alike. Ratio = A's median step time /
  B's (> 1: B is faster), and the median of the per-pair ratios."""
  sys.path.insert(0, _HERE)
  sys.path.insert(0, _REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import step as step_bench  # pylint: disable=g-import-not-at-top
  from cjepa_jax import sharding  # pylint: disable=g-import-not-at-top
  from cjepa_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top
  options = parse_xla_options(args.xla_options)
  config = step_bench.build_config(step_bench.parse_args(project_argv(args)))
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  lowered = run.jitted_step.lower(
      step_bench._abstract(run.abstract_state, run.state_shardings),  # pylint: disable=protected-access
      sharding.abstract_batch(config.batch_size, config.data.image_size, mesh))
  t = time.perf_counter()
  exe = {'A': lowered.compile()}
  compile_a = time.perf_counter() - t
  t = time.perf_counter()
  exe['B'] = lowered.compile(compiler_options=options)
  compile_b = time.perf_counter() - t
  batches = step_bench.synthetic_batches(config, mesh)
  states = {k: run.init_fn() for k in exe}
  times: dict[str, list[float]] = {'A': [], 'B': []}
  losses: dict[str, list[float]] = {'A': [], 'B': []}
  for i in range(args.warmup + args.steps):
    order = ('A', 'B') if i % 2 == 0 else ('B', 'A')
    for k in order:
      t = time.perf_counter()
      states[k], metrics, _ = exe[k](states[k], batches[i % len(batches)])
      jax.block_until_ready((states[k], metrics))
      if i >= args.warmup:
        times[k].append(time.perf_counter() - t)
      losses[k].append(float(metrics['loss']))
  med = {k: statistics.median(v) for k, v in times.items()}
  pairs = [a / b for a, b in zip(times['A'], times['B'])]
  return dict(
      which='project_ab', xla_flags=os.environ.get('XLA_FLAGS', ''), xla_options_b=options,
      images_per_s_a=args.batch_size / med['A'], images_per_s_b=args.batch_size / med['B'],
      step_time_a_s=med['A'], step_time_b_s=med['B'], speedup_b=med['A'] / med['B'],
      pair_speedup_median=statistics.median(pairs), pair_speedups=pairs,
      compile_a_s=compile_a, compile_b_s=compile_b, losses_a=losses['A'], losses_b=losses['B'],
      max_loss_rel_diff=max(abs(a - b) / max(abs(a), 1e-12)
                            for a, b in zip(losses['A'], losses['B'])),
      shape=args.shape, depth=args.depth, batch_size=args.batch_size, load=load_average(),
      cpu_model=cpu_model(),
      date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))


# ------------------------------------------------------------------------------------------------
# The driver: alternating child processes.

def child_command(args: argparse.Namespace, which: str, argv: Sequence[str]) -> list[str]:
  """This script with `argv`, one side, JSON; the driver's own --which and --rounds dropped."""
  keep, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a in ('--which', '--rounds'):
      skip = True
      continue
    if a.startswith(('--which=', '--rounds=', '--json')):
      continue
    keep.append(a)
  return [sys.executable, os.path.abspath(__file__), *keep, '--which', which, '--json']


def _run_child(cmd: list[str], cpus: list[int], threads: int) -> dict[str, Any]:
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
             JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  preexec = (lambda: os.sched_setaffinity(0, cpus)) if hasattr(os, 'sched_setaffinity') else None
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=preexec,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1])


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top
  return platform.processor() or platform.machine()


def drive(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
  runs = []
  load_start = load_average()
  for r in range(args.rounds):
    order = ('project', 'reference') if r % 2 == 0 else ('reference', 'project')
    for which in order:
      res = _run_child(child_command(args, which, argv), args.cpu_list, args.threads)
      res.update(round=r, load=load_average())
      runs.append(res)
      print(f'round {r} {which}: {res["images_per_s"]:.1f} img/s '
            f'(step {res["step_time_s"] * 1e3:.0f} ms, load {res["load"]})', file=sys.stderr)
  out = summarise(runs)
  ref = next(r for r in runs if r['which'] == 'reference')
  proj = next(r for r in runs if r['which'] == 'project')
  out.update(
      shape=args.shape, depth=args.depth, batch_size=args.batch_size,
      pred_depth=args.pred_depth, pred_width=args.pred_width, image_size=IMAGE_SIZE, patch=PATCH,
      min_keep=args.min_keep, threads=args.threads, cpus=args.cpu_list, steps=args.steps,
      rounds=args.rounds, cpu_model=cpu_model(), load_start=load_start, load_end=load_average(),
      date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      project_context_tokens=proj['context_tokens'], project_target_tokens=proj['target_tokens'],
      reference_context_tokens=ref['context_tokens'], reference_target_tokens=ref['target_tokens'],
      reference_collate_ms=ref['collate_ms'], torch_version=ref['torch_version'],
      jax_version=proj['jax_version'], xla_flags=proj['xla_flags'],
      project_args=args.project_args, runs=runs)
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.which == 'reference':
    out = time_reference(args)
  elif args.which == 'project':
    out = time_project(args)
  elif args.which == 'profile_reference':
    out = profile_reference(args, args.profile_steps)
  elif args.which == 'profile_project':
    out = profile_project(args, args.profile_steps)
  elif args.which == 'project_ab':
    out = project_ab(args)
  else:
    out = drive(args, argv)
    print(f'{out["cpu_model"]}, {args.threads} threads on CPUs {args.cpu_list}, shape '
          f'{args.shape}: project {out["project_images_per_s"]:.1f} img/s, reference '
          f'{out["reference_images_per_s"]:.1f} img/s, ratio {out["ratio"]:.2f} (rounds: '
          + ', '.join(f'{x:.2f}' for x in out['ratios']) + ')', file=sys.stderr)
  if args.json or args.which != 'both':
    print(json.dumps(out, sort_keys=True), flush=True)
  return out


if __name__ == '__main__':
  main()
