"""The default config: every key a run reads, with the reference I-JEPA values.

Each recipe in `configs/` calls `default_config()` and overrides what differs, so this is the one
place a reader finds every knob and its meaning. Configs are locked by the trainer, so a misspelled
`--config.key=...` on the command line is an error instead of a silently ignored flag.

Lengths: a run lasts `total_steps` optimizer steps when that is > 0, else
`epochs * steps_per_epoch` with `steps_per_epoch = data.num_train_examples // batch_size`. Every
schedule (lr, weight decay, EMA momentum) is laid over that length times `ipe_scale`, as in the
reference (cjepa_jax/optim.py).
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Returns the base config (ImageNet-1K, ViT-H/14 I-JEPA, reference hyperparameters)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 2048            # Global batch, over all processes and devices.
  c.epochs = 300
  c.total_steps = 0              # > 0: the run's length in steps; replaces `epochs`.
  c.ipe_scale = 1.0              # Reference: stretches the EMA and wd schedules past the run.
  c.log_every_steps = 50
  c.ckpt_every_steps = 1000
  c.keep_ckpts = 3
  c.keep_every_steps = 0         # > 0: also keep every checkpoint at a multiple of this, forever.
  c.init_from = ''               # Checkpoint to start from (e.g. a converted reference one).
  c.peak_tflops = 0.0            # Per-device peak for MFU; 0 means look the device kind up.

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'imagenet2012'  # Any tfds name, 'image_folder' or 'synthetic'.
  c.data.data_dir = ''             # tfds data_dir (local or gs://) or the image-folder root.
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.num_train_examples = 1_281_167  # Defines an epoch; set by the recipe for its dataset.
  c.data.num_classes = 1000
  c.data.image_size = 224
  c.data.crop_scale = (0.3, 1.0)   # RandomResizedCrop, as the reference.
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.interpolation = 'bilinear'
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  # Augmentations for ablations; off in every reference recipe.
  c.data.flip = False
  c.data.color_jitter = 0.0
  c.data.grayscale = 0.0
  c.data.blur = 0.0
  c.data.shuffle_buffer = 10_000
  c.data.prefetch = 2
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
  c.model.pred_depth = 12
  c.model.pred_width = 384

  c.mask = ml_collections.ConfigDict()
  c.mask.npred = 4
  c.mask.nenc = 1
  c.mask.pred_scale = (0.15, 0.2)
  c.mask.pred_aspect = (0.75, 1.5)
  c.mask.enc_scale = (0.85, 1.0)
  c.mask.enc_aspect = (1.0, 1.0)
  c.mask.min_keep = 10
  c.mask.allow_overlap = False
  c.mask.reference_quirks = False
  c.mask.context_tokens = 0        # Fixed context budget Kc; 0 picks the reference-matching default.

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'smooth_l1'        # 'smooth_l1' (reference code) or 'l2' (paper).

  c.vicreg = ml_collections.ConfigDict()
  c.vicreg.weight = 0.0            # 0: plain I-JEPA. C-JEPA: 0.001.
  c.vicreg.mode = 'context'        # 'context' or 'blocks' (see losses.py).
  c.vicreg.sim_coeff = 25.0
  c.vicreg.std_coeff = 25.0
  c.vicreg.cov_coeff = 1.0
  c.vicreg.projector = '2048-2048-2048'  # 'blocks' mode only: hidden-...-output widths.
  c.vicreg.projector_norm = 'batch'      # 'batch' (official VICReg), 'layer' or 'none'.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.start_lr = 2e-4
  c.optim.final_lr = 1e-6
  c.optim.warmup_epochs = 40.0
  c.optim.warmup_steps = 0         # > 0 replaces warmup_epochs.
  c.optim.weight_decay = 0.04
  c.optim.final_weight_decay = 0.4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 0.0          # > 0: clip the global gradient norm; off as in the reference.
  c.optim.ema = (0.996, 1.0)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all devices not used by the other axis.
  c.mesh.fsdp = 1

  c.evals = ml_collections.ConfigDict()
  c.evals.knn_every_steps = 0      # > 0: kNN probe during pretraining (probe.py).
  c.evals.knn_train_examples = 10_000
  c.evals.knn_eval_examples = 2_000
  c.evals.knn_k = 20
  c.evals.knn_temperature = 0.07
  c.evals.knn_batch_size = 0       # 0: the training batch size.
  return c


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
