"""The default config: every key a run reads, with the reference I-JEPA values.

Each recipe in `configs/` calls `default_config()` and overrides what differs, so this is the one
place a reader finds every knob and its meaning. Configs are locked by the trainer, so a misspelled
`--config.key=...` on the command line is an error instead of a silently ignored flag.

Lengths: a run lasts `total_steps` optimizer steps when that is > 0, else
`epochs * steps_per_epoch` with `steps_per_epoch = data.num_train_examples // batch_size`. Every
schedule (lr, weight decay, EMA momentum) is laid over that length times `ipe_scale`, as in the
reference (cjepa_jax/optim.py).

Why this module is longer than 450 lines: it is the config's one home, every key of pretraining
and fine-tuning with its default and meaning, the checks of their values, which keys a resume may
change, and the renamed keys of the last release; each of those is a short table or function read
beside the defaults it refers to, and splitting them apart would make a reader open two files to
learn what one key does.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

# `  c.key.sub = value  # meaning` lines of default_config().
re_key = re.compile(r'^c\.([\w.]+)\s*=')


def default_config() -> ml_collections.ConfigDict:
  """Returns the base config (ImageNet-1K, ViT-H/14 I-JEPA, reference hyperparameters)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                     # Seeds the init, the masks and the data order.
  c.batch_size = 2048            # Global batch, over all processes and devices.
  # Gradient accumulation: each step runs the batch as this many micro-batches (one optimizer
  # and EMA update per step; fits a large batch on fewer chips; see train_step.py).
  c.accum_steps = 1
  c.epochs = 300                 # Run length in epochs (when total_steps is 0).
  c.total_steps = 0              # > 0: the run's length in steps; replaces `epochs`.
  c.stop_at_step = 0             # > 0: this start stops (saved) at that step; schedules unchanged.
  c.ipe_scale = 1.0              # Reference: stretches the EMA and wd schedules past the run.
  c.log_every_steps = 50         # Metrics window: metrics.jsonl, TensorBoard, progress line.
  c.ckpt_every_steps = 1000      # Checkpoint interval (and always the last step).
  c.keep_ckpts = 3               # How many of the latest checkpoints to keep.
  c.keep_every_steps = 0         # > 0: also keep every checkpoint at a multiple of this, forever.
  c.init_from = ''               # Checkpoint to start from (e.g. a converted reference one).
  # Resuming a workdir with a config that changes the run's meaning (batch, objective, schedules,
  # data) is refused unless this is True; the changed keys are then logged one by one.
  c.allow_config_change = False
  # Take the workdir's lock (WORKDIR/trainer.lock) even from a live holder; check it is gone first.
  c.force_unlock = False
  c.peak_tflops = 0.0            # Per-device peak for MFU; 0 means look the device kind up.

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'imagenet2012'  # Any tfds name, 'image_folder' or 'synthetic'.
  c.data.data_dir = ''             # tfds data_dir (local or gs://) or the image-folder root.
  c.data.train_split = 'train'     # Split (tfds) or sub-folder (image_folder) to train on.
  c.data.eval_split = 'validation'  # Split / sub-folder the probes and the kNN monitor test on.
  c.data.num_train_examples = 1_281_167  # Defines an epoch; set by the recipe for its dataset.
  c.data.num_classes = 1000        # Labels of the probes (the train split's class count).
  c.data.image_size = 224          # Training resolution (pixels, square).
  c.data.crop_scale = (0.3, 1.0)   # RandomResizedCrop, as the reference.
  c.data.crop_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range.
  c.data.interpolation = 'bilinear'  # Resize method of the crops.
  c.data.mean = (0.485, 0.456, 0.406)  # Per-channel normalisation mean (ImageNet's).
  c.data.std = (0.229, 0.224, 0.225)   # Per-channel normalisation std (ImageNet's).
  # Augmentations for ablations; off in every reference recipe.
  c.data.flip = False              # Random horizontal flip.
  c.data.color_jitter = 0.0        # Colour-jitter strength in [0, 1].
  c.data.grayscale = 0.0           # Probability of a grayscale image.
  c.data.blur = 0.0                # Probability of a Gaussian blur.
  c.data.shuffle_buffer = 10_000   # tf.data shuffle buffer per host.
  c.data.prefetch = 2              # Batches prefetched by tf.data.
  # Input loader: 'grain' (grain + numpy / PIL, no TensorFlow, a global shuffle; also reads
  # dataset='array_record') or 'tf' (tf.data; needs pip install -e '.[tf]'). They draw different
  # examples for the same seed; each is exact on resume.
  c.data.loader = 'grain'
  c.data.workers = 0               # grain: decoding threads per host; 0 = twice the cores.
  # Evaluation: resize the short side to eval_resize * image_size / 224, centre-crop image_size
  # (256 -> the standard 0.875 crop at any size; 224 -> no crop).
  c.data.eval_resize = 256

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'H/14'         # '<Ti|S|B|L|H|g>/<patch>'.
  c.model.depth = 0                # > 0 overrides the variant's depth (small-data recipes).
  c.model.dtype = 'bfloat16'       # Compute dtype; params stay float32.
  c.model.remat_policy = 'none'    # 'none', 'full' or a jax.checkpoint_policies name.
  c.model.scan = False             # nn.scan over blocks (fast compiles for deep models).
  # jax.nn.dot_product_attention's kernel: 'xla' (every backend) or 'cudnn' (cuDNN flash
  # attention: NVIDIA GPUs, bfloat16 / float16). Same function either way; checkpoints don't care.
  c.model.attention = 'xla'
  c.model.pred_depth = 12          # Predictor blocks.
  c.model.pred_width = 384         # Predictor width (the narrow predictor).

  c.mask = ml_collections.ConfigDict()
  c.mask.npred = 4                 # Target blocks per image (M).
  c.mask.nenc = 1                  # Context blocks per image (only 1 is supported).
  c.mask.pred_scale = (0.15, 0.2)  # Target block area, as a fraction of the image.
  c.mask.pred_aspect = (0.75, 1.5)  # Target block height / width.
  c.mask.enc_scale = (0.85, 1.0)   # Context block area fraction (targets then removed).
  c.mask.enc_aspect = (1.0, 1.0)   # Context block height / width.
  c.mask.min_keep = 10             # A context / target keeps more than this many patches.
  c.mask.allow_overlap = False     # Keep target patches in the context.
  c.mask.reference_quirks = False  # The reference collator's quirks (see masks.py).
  c.mask.context_tokens = 0        # Fixed context budget Kc; 0 picks the reference-matching default.

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'smooth_l1'        # 'smooth_l1' (reference code) or 'l2' (paper).

  c.vicreg = ml_collections.ConfigDict()
  c.vicreg.weight = 0.0            # 0: plain I-JEPA. C-JEPA: 0.001.
  c.vicreg.mode = 'context'        # 'context' or 'blocks' (see losses.py).
  c.vicreg.sim_coeff = 25.0        # VICReg invariance coefficient.
  c.vicreg.std_coeff = 25.0        # VICReg variance coefficient.
  c.vicreg.cov_coeff = 1.0         # VICReg covariance coefficient.
  c.vicreg.projector = '2048-2048-2048'  # 'blocks' mode only: hidden-...-output widths.
  c.vicreg.projector_norm = 'batch'      # 'batch' (official VICReg), 'layer' or 'none'.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3                # Peak learning rate (after warm-up).
  c.optim.start_lr = 2e-4          # Learning rate at step 0 (linear warm-up to lr).
  c.optim.final_lr = 1e-6          # Learning rate at the end of the cosine decay.
  c.optim.warmup_epochs = 40.0     # Linear warm-up length in epochs.
  c.optim.warmup_steps = 0         # > 0 replaces warmup_epochs.
  c.optim.weight_decay = 0.04      # AdamW weight decay at step 0 (cosine to final).
  c.optim.final_weight_decay = 0.4  # Weight decay at the end.
  c.optim.b1 = 0.9                 # Adam beta1, in [0, 1).
  c.optim.b2 = 0.999               # Adam beta2, in [0, 1).
  c.optim.eps = 1e-8               # Adam epsilon.
  c.optim.grad_clip = 0.0          # > 0: clip the global gradient norm; off as in the reference.
  c.optim.ema = (0.996, 1.0)       # Target-encoder EMA momentum, start -> end (linear), in [0, 1].
  # False: no EMA teacher; the targets come from the online (context) encoder under
  # stop-gradient (momentum 0), and the state keeps no second copy of its weights.
  c.use_ema = True

  c.sigreg = ml_collections.ConfigDict()
  # > 0: add weight * SIGReg (LeJEPA) of the pooled context features (losses.py); LeJEPA's
  # lambda is weight / (1 + weight).
  c.sigreg.weight = 0.0
  c.sigreg.num_slices = 256        # Random unit directions per step (LeJEPA's minimal example).
  c.sigreg.t_max = 3.0             # Epps-Pulley quadrature on [-t_max, t_max] (LeJEPA's).
  c.sigreg.knots = 17              # Quadrature points on [0, t_max] (LeJEPA's).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all devices not used by the other axis.
  c.mesh.fsdp = 1                  # FSDP axis size: params and optimizer state sharded over it.

  # Evaluators run during pretraining on the target encoder, one entry each, the shape of every
  # evaluator's entry (evals/base.py): type, every_steps (> 0: every this many steps and at the
  # end), a fixed subset of the train / eval split (0: all), the batch (0: batch_size), its options.
  c.evals = ml_collections.ConfigDict()
  c.evals.knn = ml_collections.ConfigDict()
  c.evals.knn.type = 'knn'            # DINO's weighted kNN vote (evals/knn.py).
  c.evals.knn.every_steps = 0         # > 0: the kNN monitor every this many steps.
  c.evals.knn.train_examples = 10_000  # kNN monitor: train images (the memory bank; 0: all).
  c.evals.knn.eval_examples = 2_000   # kNN monitor: eval images (0: all).
  c.evals.knn.eval_batch_size = 0     # kNN monitor: feature extraction batch (0: batch_size).
  c.evals.knn.k = 20                  # kNN monitor: neighbours.
  c.evals.knn.temperature = 0.07      # kNN monitor: softmax temperature of the votes.
  c.evals.fewshot = ml_collections.ConfigDict()
  c.evals.fewshot.type = 'fewshot'    # Few-shot ridge regression, big_vision's (evals/fewshot.py).
  c.evals.fewshot.every_steps = 0     # > 0: the few-shot monitor every this many steps.
  c.evals.fewshot.train_examples = 5_000  # Few-shot monitor: train images the shots come from.
  c.evals.fewshot.eval_examples = 2_000   # Few-shot monitor: eval images (0: all).
  c.evals.fewshot.eval_batch_size = 0  # Few-shot monitor: feature extraction batch (0: batch_size).
  c.evals.fewshot.shots = (1, 5, 10, 25)  # Few-shot monitor: examples per class (logged each).
  c.evals.fewshot.seeds = 3           # Few-shot monitor: seeds averaged.
  c.evals.fewshot.l2_reg = 1024.0     # Few-shot monitor: ridge l2, big_vision's fixed 2^10.
  return c


def default_finetune_config() -> ml_collections.ConfigDict:
  """The fine-tuning base config (cjepa_jax/finetune.py): MAE / BEiT's recipe, ViT-B/16 values.

  The recipes in configs/finetune_*.py override what differs. `data.*` has the pretraining
  config's keys (one input pipeline), with fine-tuning's augmentation.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0                     # Seeds the head init, the data order, mixing and drop path.
  # What the encoder starts from: a pretraining workdir, a step directory, a converted reference
  # checkpoint, or 'random' (the baseline; then model.* below says which encoder).
  c.pretrained = ''
  c.encoder = 'target'           # Of a pretraining checkpoint: 'target' (EMA) or 'context'.
  c.batch_size = 1024            # Global batch, over all processes and devices.
  c.epochs = 100                 # Run length in epochs (when total_steps is 0).
  c.total_steps = 0              # > 0: the run's length in steps; replaces `epochs`.
  c.stop_at_step = 0             # > 0: this start stops (saved) at that step; schedules unchanged.
  c.log_every_steps = 50         # Metrics window: metrics.jsonl, TensorBoard, progress line.
  c.ckpt_every_steps = 1000      # Checkpoint interval (and always the last step).
  c.keep_ckpts = 2               # How many of the latest checkpoints to keep (best/ keeps 1).
  c.keep_every_steps = 0         # > 0: also keep every checkpoint at a multiple of this, forever.
  c.allow_config_change = False  # Resume with a config that changes the run (logged key by key).
  # Take the workdir's lock (WORKDIR/trainer.lock) even from a live holder; check it is gone first.
  c.force_unlock = False
  c.peak_tflops = 0.0            # Per-device peak for MFU; 0 means look the device kind up.

  c.data = default_config().data
  c.data.crop_scale = (0.08, 1.0)  # RandomResizedCrop as MAE's fine-tuning (timm's default).
  c.data.interpolation = 'bicubic'  # MAE's fine-tuning resize.
  c.data.flip = True               # Random horizontal flip.

  c.model = ml_collections.ConfigDict()
  # The encoder of `pretrained=random`; a checkpoint brings its own variant, depth and scan.
  c.model.variant = 'B/16'         # '<Ti|S|B|L|H|g>/<patch>'.
  c.model.depth = 0                # > 0 overrides the variant's depth.
  c.model.scan = False             # nn.scan over blocks; drop_path_rate > 0 needs False.
  c.model.dtype = 'bfloat16'       # Compute dtype; params stay float32.
  c.model.remat_policy = 'none'    # 'none', 'full' or a jax.checkpoint_policies name.
  c.model.attention = 'xla'        # jax.nn.dot_product_attention kernel: 'xla' or 'cudnn'.
  c.model.drop_path_rate = 0.1     # Stochastic depth of the last block (linear over the blocks).

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 5e-4           # Peak lr per 256 images: lr = base_lr * batch_size / 256.
  c.optim.final_lr = 1e-6          # Learning rate at the end of the cosine decay.
  c.optim.warmup_epochs = 5.0      # Linear warm-up from 0, in epochs.
  c.optim.warmup_steps = 0         # > 0 replaces warmup_epochs.
  c.optim.weight_decay = 0.05      # AdamW decoupled weight decay (not on biases, norms, 1-D).
  c.optim.layer_decay = 0.65       # Layer-wise lr decay (BEiT): block i gets decay^(depth - i).
  c.optim.b1 = 0.9                 # Adam beta1, in [0, 1).
  c.optim.b2 = 0.999               # Adam beta2, in [0, 1).
  c.optim.eps = 1e-8               # Adam epsilon.
  c.optim.grad_clip = 0.0          # > 0: clip the global gradient norm (MAE does not).

  c.mix = ml_collections.ConfigDict()
  c.mix.mixup_alpha = 0.8          # Mixup's Beta(alpha, alpha); 0: off.
  c.mix.cutmix_alpha = 1.0         # CutMix's Beta(alpha, alpha); 0: off.
  c.mix.switch_prob = 0.5          # With both on: the share of batches that use CutMix.
  c.mix.label_smoothing = 0.1      # Label smoothing of the (mixed) targets.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all devices not used by the other axis.
  c.mesh.fsdp = 1                  # FSDP axis size: params and optimizer state sharded over it.

  # The classifier's evaluation (evals/classify.py; an entry as pretraining's evals): the eval
  # split's centre crops, top-1 / top-5; the best checkpoint by top-1 is kept in DIR/best.
  c.evals = ml_collections.ConfigDict()
  c.evals.classify = ml_collections.ConfigDict()
  c.evals.classify.type = 'classify'   # Top-1 / top-5 of the fine-tuned classifier.
  c.evals.classify.every_steps = 1000  # Centre-crop evaluation of the eval split (and at the end).
  c.evals.classify.eval_examples = 0   # > 0: evaluate a fixed subset of this many (0: all).
  c.evals.classify.eval_batch_size = 0  # 0: batch_size.
  return c


def validate_finetune(config: ml_collections.ConfigDict) -> None:
  """`validate` for a fine-tuning config: one line naming the key and the valid range."""
  _validate_run(config, every=('log_every_steps', 'ckpt_every_steps', 'keep_ckpts'),
                optional=('keep_every_steps',))
  _check(config.encoder in ('target', 'context'), 'encoder', config.encoder,
         "use 'target' (the EMA encoder) or 'context'")
  _check(isinstance(config.pretrained, str) and config.pretrained != '', 'pretrained',
         config.pretrained, "pass --config.pretrained=<a pretraining workdir or step directory> "
         "or --config.pretrained=random (the baseline)")
  o = config.optim
  _validate_adamw(o, ('base_lr', 'final_lr', 'weight_decay', 'grad_clip', 'warmup_epochs'))
  _check(_is_number(o.layer_decay) and 0 < o.layer_decay <= 1, 'optim.layer_decay',
         o.layer_decay, 'must be in (0, 1] (1: no layer-wise decay)')
  m = config.mix
  for key in ('mixup_alpha', 'cutmix_alpha'):
    _check(_is_number(m[key]) and m[key] >= 0, f'mix.{key}', m[key], 'must be >= 0 (0: off)')
  for key in ('switch_prob', 'label_smoothing'):
    _check(_is_number(m[key]) and 0 <= m[key] <= 1, f'mix.{key}', m[key], 'must be in [0, 1]')
  _check(_is_number(config.model.drop_path_rate) and 0 <= config.model.drop_path_rate < 1,
         'model.drop_path_rate', config.model.drop_path_rate, 'must be in [0, 1)')
  _validate_data(config.data)


# What of `model.*` a pretrained checkpoint fixes for fine-tuning (the rest: dtype, remat,
# attention, drop path, comes from the fine-tuning config).
FINETUNE_FROM_CHECKPOINT = ('variant', 'depth', 'scan')


def resolve_finetune(config: ml_collections.ConfigDict, model: Mapping[str, Any],
                     image_size: int | None = None, checkpoint: str = ''
                     ) -> ml_collections.ConfigDict:
  """A copy of the fine-tuning `config` with the variant, depth and scan of its encoder's
  checkpoint (`model`: the checkpoint's saved `model.*`).

  `image_size`: the resolution the checkpoint (`checkpoint`, for the message) was pretrained at,
  which the config must keep (position embeddings and the patch grid follow it); None: not
  checked.

  Raises:
    ValueError: the image sizes differ (one line naming --config.data.image_size).
  """
  if image_size is not None and image_size != config.data.image_size:
    raise ValueError(
        f'The checkpoint {checkpoint} was pretrained at image size {image_size} '
        f'but config.data.image_size={config.data.image_size}; fine-tune at '
        f'--config.data.image_size={image_size} (position embeddings and patch grid '
        'follow the pretraining resolution).')
  out = copy.deepcopy(config)
  with out.unlocked():
    for key in FINETUNE_FROM_CHECKPOINT:
      if key in model:
        out.model[key] = model[key]
    out.model.depth = int(out.model.depth or 0)
  return out


def set_cifar10_image_folder(data: ml_collections.ConfigDict) -> None:
  """CIFAR-10 as the image folder `data/cifar10/{train,test}/<class>/*.jpg` (shared tarballs).

  Shared by the CIFAR pretraining recipe and the probe config, so both read the same data.
  """
  data.dataset = 'image_folder'
  data.data_dir = 'data/cifar10'
  data.train_split = 'train'
  data.eval_split = 'test'
  data.num_train_examples = 50_000
  data.num_classes = 10
  data.image_size = 32
  # eval_resize is expressed at 224 px (input_pipeline.eval_resize_size): 224 resizes a 32 px
  # image to 32, so the centre crop keeps all of CIFAR's pixels.
  data.eval_resize = 224
  data.mean = (0.4914, 0.4822, 0.4465)
  data.std = (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------------------------
# Validation: values that cannot be meant, refused where the config enters (the trainer and the
# probe), each error naming the key and its valid range.

def _check(ok: bool, key: str, value: Any, valid: str) -> None:
  if not ok:
    raise ValueError(f'config.{key}={value!r} is invalid: {valid}.')


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_run(config: ml_collections.ConfigDict, *, every: tuple[str, ...],
                  optional: tuple[str, ...]) -> None:
  """The run's length, cadences (`every`: integers >= 1; `optional`: >= 0, 0 = off / default)
  and peak_tflops: what both trainers' configs share."""
  _check(isinstance(config.batch_size, int) and config.batch_size > 0, 'batch_size',
         config.batch_size, 'the global batch must be a positive integer')
  _check(_is_number(config.epochs) and config.epochs >= 0, 'epochs', config.epochs,
         'must be >= 0 (0 with total_steps > 0)')
  _check(isinstance(config.total_steps, int) and config.total_steps >= 0, 'total_steps',
         config.total_steps, 'must be an integer >= 0 (0: use epochs)')
  _check(isinstance(config.get('stop_at_step', 0), int) and config.get('stop_at_step', 0) >= 0,
         'stop_at_step', config.get('stop_at_step'), 'must be an integer >= 0 (0: run to the end)')
  for key in every:
    _check(isinstance(config[key], int) and config[key] >= 1, key, config[key],
           'must be an integer >= 1')
  for key in optional:
    _check(isinstance(config[key], int) and config[key] >= 0, key, config[key],
           'must be an integer >= 0 (0: off / the default)')
  _check(_is_number(config.peak_tflops) and config.peak_tflops >= 0, 'peak_tflops',
         config.peak_tflops, 'must be >= 0 (0: look the device up)')


def _validate_adamw(o: ml_collections.ConfigDict, nonnegative: tuple[str, ...]) -> None:
  """`optim.*`: the `nonnegative` keys, the warm-up steps and Adam's b1, b2 and eps."""
  for key in nonnegative:
    _check(_is_number(o[key]) and o[key] >= 0, f'optim.{key}', o[key], 'must be >= 0')
  _check(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0, 'optim.warmup_steps',
         o.warmup_steps, 'must be an integer >= 0 (0: use warmup_epochs)')
  for key in ('b1', 'b2'):
    _check(_is_number(o[key]) and 0 <= o[key] < 1, f'optim.{key}', o[key],
           "Adam's decay rates lie in [0, 1)")
  _check(_is_number(o.eps) and o.eps > 0, 'optim.eps', o.eps, 'must be > 0')


def _validate_data(d: ml_collections.ConfigDict) -> None:
  """`data.*`: classes, examples, crop, normalisation and augmentation strengths."""
  _check(isinstance(d.num_classes, int) and d.num_classes >= 2, 'data.num_classes',
         d.num_classes, 'a labelled dataset has at least 2 classes')
  _check(isinstance(d.num_train_examples, int) and d.num_train_examples >= 1,
         'data.num_train_examples', d.num_train_examples, 'must be a positive integer')
  lo, hi = tuple(d.crop_scale)
  _check(0 < lo <= hi <= 1, 'data.crop_scale', (lo, hi), 'need 0 < lo <= hi <= 1')
  lo, hi = tuple(d.crop_ratio)
  _check(0 < lo <= hi, 'data.crop_ratio', (lo, hi), 'need 0 < lo <= hi')
  _check(len(tuple(d.std)) == 3 and all(_is_number(x) and x > 0 for x in d.std), 'data.std',
         d.std, 'three positive per-channel values')
  for key in ('color_jitter', 'grayscale', 'blur'):
    _check(_is_number(d[key]) and 0 <= d[key] <= 1, f'data.{key}', d[key],
           'a probability / strength in [0, 1]')


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses config values no run can mean (negative lr, EMA outside [0, 1], ...).

  Shapes that need the model (mask blocks against the patch grid, the variant) are checked where
  they are built (`masks.MaskSpec`, `models.vit`); this checks the scalar knobs.

  Raises:
    ValueError: one line naming the key, its value and the valid range.
  """
  _validate_run(config, every=('log_every_steps', 'ckpt_every_steps', 'keep_ckpts'),
                optional=('keep_every_steps',))
  _check(isinstance(config.accum_steps, int) and not isinstance(config.accum_steps, bool)
         and config.accum_steps >= 1, 'accum_steps', config.accum_steps,
         'must be an integer >= 1 (1: no gradient accumulation)')
  _check(_is_number(config.ipe_scale) and config.ipe_scale > 0, 'ipe_scale', config.ipe_scale,
         'must be > 0 (1.0 in every reference recipe)')

  o = config.optim
  for key in ('lr', 'start_lr', 'final_lr'):
    _check(_is_number(o[key]) and o[key] >= 0, f'optim.{key}', o[key],
           'a learning rate must be a finite number >= 0')
  _validate_adamw(o, ('weight_decay', 'final_weight_decay', 'grad_clip', 'warmup_epochs'))
  ema = tuple(o.ema)
  _check(len(ema) == 2 and all(_is_number(m) and 0 <= m <= 1 for m in ema), 'optim.ema', ema,
         'EMA momenta (start, end) must both lie in [0, 1]')

  _validate_data(config.data)

  v = config.vicreg
  _check(_is_number(v.weight) and v.weight >= 0, 'vicreg.weight', v.weight,
         'must be >= 0 (0: plain I-JEPA)')
  _check(v.mode in ('context', 'blocks'), 'vicreg.mode', v.mode, "use 'context' or 'blocks'")
  for key in ('sim_coeff', 'std_coeff', 'cov_coeff'):
    _check(_is_number(v[key]) and v[key] >= 0, f'vicreg.{key}', v[key], 'must be >= 0')
  _check(config.loss.kind in ('smooth_l1', 'l2'), 'loss.kind', config.loss.kind,
         "use 'smooth_l1' or 'l2'")
  g = config.sigreg
  _check(_is_number(g.weight) and g.weight >= 0, 'sigreg.weight', g.weight, 'must be >= 0 (0: off)')
  _check(isinstance(g.num_slices, int) and g.num_slices >= 1, 'sigreg.num_slices',
         g.num_slices, 'must be an integer >= 1')
  _check(_is_number(g.t_max) and g.t_max > 0, 'sigreg.t_max', g.t_max, 'must be > 0')
  _check(isinstance(g.knots, int) and g.knots >= 2, 'sigreg.knots', g.knots,
         'must be an integer >= 2')
  _check(isinstance(config.use_ema, bool), 'use_ema', config.use_ema, 'True or False')

  # config.evals: each evaluator checks its own entry (evals/registry.py `check`), where the
  # trainer builds them.


# ----------------------------------------------------------------------------------------------
# Resume: which keys may change between the starts of one run, and the workdir's config.json.

# Keys whose change changes the train state's shapes or structure: a checkpoint saved with the
# old value cannot be restored. (mesh.* may change: checkpoints restore onto any mesh.)
STATE_SHAPING = ('model.variant', 'model.depth', 'model.pred_depth', 'model.pred_width',
                 'model.scan', 'data.image_size', 'vicreg.projector', 'vicreg.projector_norm',
                 'vicreg.weight>0 and mode', 'optim.grad_clip>0', 'use_ema')
# Keys that change neither shapes nor the run's meaning: free to change on resume.
# (accum_steps: how the batch is split to fit the chips, like the mesh; for I-JEPA the step is
# the same to float rounding, see train_step.py.)
RESUME_FREE = ('stop_at_step', 'log_every_steps', 'ckpt_every_steps', 'keep_ckpts',
               'keep_every_steps', 'peak_tflops', 'init_from', 'allow_config_change', 'mesh.data',
               'mesh.fsdp', 'model.remat_policy', 'model.attention', 'data.data_dir',
               'data.prefetch', 'accum_steps', 'data.workers')
# One start's switch, not part of the run: free to change on resume too.
RESUME_FREE += ('force_unlock',)


def flatten(config: ml_collections.ConfigDict | dict[str, Any], prefix: str = ''
            ) -> dict[str, Any]:
  """{'a.b': value} for every leaf; tuples and lists become lists (as in a saved config.json)."""
  out = {}
  items = config.items() if isinstance(config, dict) else config.items()
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def _state_signature(flat: dict[str, Any]) -> dict[str, Any]:
  """What of a flat config shapes the train state (see STATE_SHAPING)."""
  sig = {k: flat.get(k) for k in STATE_SHAPING if '>' not in k}
  sig['use_ema'] = flat.get('use_ema', True)  # Older configs: always EMA.
  blocks = (flat.get('vicreg.weight') or 0) > 0 and flat.get('vicreg.mode') == 'blocks'
  sig['vicreg projector (vicreg.weight > 0 and vicreg.mode)'] = blocks
  sig['gradient clipping in the optimizer state (optim.grad_clip > 0)'] = (
      (flat.get('optim.grad_clip') or 0) > 0)
  if not blocks:  # Without a projector its widths do not shape anything.
    sig.pop('vicreg.projector'), sig.pop('vicreg.projector_norm')
  return sig


def finetune_state_signature(flat: dict[str, Any]) -> dict[str, Any]:
  """What of a flat fine-tuning config shapes its train state (the classifier and the optimizer
  chain: clipping and layer-wise decay each add a state entry)."""
  sig = {k: flat.get(k) for k in ('model.variant', 'model.depth', 'model.scan',
                                  'data.image_size', 'data.num_classes')}
  sig['gradient clipping (optim.grad_clip > 0)'] = (flat.get('optim.grad_clip') or 0) > 0
  sig['layer-wise lr decay (optim.layer_decay < 1)'] = (flat.get('optim.layer_decay') or 1) < 1
  return sig


def resume_changes(saved: dict[str, Any], new: ml_collections.ConfigDict | dict[str, Any],
                   state_signature: Any = None
                   ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """Compares a checkpoint's saved config with the config of a resuming start (`new`: a config,
  or its `flatten`ed keys).

  `state_signature(flat config) -> dict`: what shapes the state; default: pretraining's
  (`finetune_state_signature` for fine-tuning).

  Returns:
    (shape_changes, meaning_changes): {key: (saved, new)}. Shape changes make the checkpoint
    unrestorable; meaning changes (batch size, objective, schedules, data, ...) are allowed only
    with `allow_config_change`. Keys the saved config lacks (added to the code since) are ignored.
  """
  old, cur = flatten(saved), flatten(new)
  state_signature = state_signature or _state_signature
  old_sig, new_sig = state_signature(old), state_signature(cur)
  free = RESUME_FREE
  shape = {k: (old_sig[k], new_sig[k]) for k in new_sig if old_sig.get(k) != new_sig[k]}
  meaning = {}
  for key, value in cur.items():
    # evals.*: what the run monitors and how often, never what it trains.
    if key in free or key.startswith('evals.') or key in STATE_SHAPING or key not in old:
      continue
    if old[key] != value:
      meaning[key] = (old[key], value)
  return shape, meaning


def save_json(text: str, workdir: str, start_step: int = 0) -> None:
  """Writes `text` (a config's JSON) as `workdir/config.json`; a different earlier one is kept
  as `config.<start_step>.json`.

  The trainers call it once a start has run its first step cleanly, so config.json always
  describes the checkpoints written since; `config.<N>.json` is the config that ran up to step N.
  """
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      if f.read() == text:
        return
    os.replace(path, os.path.join(workdir, f'config.{start_step}.json'))
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


# ----------------------------------------------------------------------------------------------
# Renamed keys: the evaluators' entries took one shape (config.evals.<name>, evals/base.py). The
# old flags still work for one release: `cli.run` rewrites them, with a one-line warning. Each
# old key, or old prefix ending in '.' (`linear.` for `linear.*`), maps to the key(s) it now sets.

RENAMED_PRETRAINING = {
    'evals.knn_batch_size': ('evals.knn.eval_batch_size', 'evals.fewshot.eval_batch_size'),
    **{f'evals.knn_{k}': (f'evals.knn.{k}',)
       for k in ('every_steps', 'train_examples', 'eval_examples')},
    'evals.knn_k': ('evals.knn.k',),
    'evals.knn_temperature': ('evals.knn.temperature',),
    **{f'evals.fewshot_{k}': (f'evals.fewshot.{k}',)
       for k in ('every_steps', 'train_examples', 'eval_examples', 'shots', 'seeds', 'l2_reg')},
}
RENAMED_FINETUNING = {
    'eval_every_steps': ('evals.classify.every_steps',),
    'eval_batch_size': ('evals.classify.eval_batch_size',),
    'eval_examples': ('evals.classify.eval_examples',),
}
RENAMED_PROBE = {
    'evals': ('probes',),
    # The low-shot probe ran the linear probe's grid and protocol: both entries take them.
    'linear.': ('evals.linear.', 'evals.lowshot.'),
    'linear.epochs': ('evals.linear.epochs',),
    **{f'{name}.': (f'evals.{name}.',) for name in ('knn', 'fewshot', 'lowshot', 'attentive')},
}


def renamed_key(key: str, renamed: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
  """The new keys of an old `key` (`a.b.c` of `--config.a.b.c`), or None if it was not renamed.

  An exact old key wins over an old prefix (`linear.epochs` over `linear.`).
  """
  if key in renamed:
    return renamed[key]
  for old, new in renamed.items():
    if old.endswith('.') and key.startswith(old):
      return tuple(n + key[len(old):] for n in new)
  return None


# ----------------------------------------------------------------------------------------------
# Help: every key with its default and meaning, read from this file's comments.

def describe_keys(defaults_fn: Any = None) -> list[tuple[str, Any, str]]:
  """[(key, default, meaning)] for every key of `defaults_fn()` (`default_config` by default),
  in definition order.

  The meaning is the comment on the key's line in `defaults_fn` (or on the lines just above
  it; keys it copies from `default_config`, such as `data.*`, take the comment there), so the
  help text cannot drift from this file.
  """
  defaults_fn = defaults_fn or default_config
  defaults = flatten(defaults_fn())
  meanings: dict[str, str] = {}
  for fn in dict.fromkeys((default_config, defaults_fn)):  # Later sources override earlier ones.
    meanings.update(_comments(fn, defaults))
  return [(k, v, meanings.get(k, '')) for k, v in defaults.items()]


def _comments(fn: Any, defaults: dict[str, Any]) -> dict[str, str]:
  """{key: comment} of the `c.key = value  # comment` lines of `fn`'s source."""
  source = inspect.getsource(fn).splitlines()
  meanings: dict[str, str] = {}
  pending: list[str] = []
  for line in source:
    stripped = line.strip()
    if stripped.startswith('#'):
      pending.append(stripped.lstrip('# ').strip())
      continue
    m = re_key.match(stripped)
    if m:
      key = m.group(1)
      comment = stripped.partition('#')[2].strip() if '#' in stripped else ''
      if key in defaults and (comment or pending):
        meanings[key] = comment or ' '.join(pending)
    pending = []
  return meanings


def help_text(defaults_fn: Any = None) -> str:
  """The config keys as `--config.KEY (default): meaning` lines, for `--help`."""
  lines = ['Config keys (--config.KEY=VALUE; defaults of config.py, before the recipe\'s own):']
  for key, default, meaning in describe_keys(defaults_fn):
    text = f'  --config.{key} (default {default!r})'
    lines.append(text + (f': {meaning}' if meaning else ''))
  return '\n'.join(lines)
