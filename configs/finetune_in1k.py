r"""ImageNet-1K fine-tuning of a pretrained ViT: the MAE / BEiT recipe the I-JEPA and C-JEPA
papers follow, for B/16, L/16 and H/14.

  python -m cjepa_jax.finetune --config configs/finetune_in1k.py:B/16 --workdir gs://.../ft_b16 \
      --config.pretrained=gs://.../cjepa_b16 --config.data.data_dir=gs://.../tfds

The argument is the variant (default B/16); `pretrained` must be an encoder of that variant at
224 px (the checkpoint's saved config fixes variant, depth and scan; another image size is
refused). MAE's settings per size (He et al. 2022, its fine-tuning appendix):

  variant  epochs  base lr  layer decay  drop path
  B/16     100     5e-4     0.65         0.1
  L/16      50     1e-3     0.75         0.2
  H/14      50     1e-3     0.75         0.3

Common: batch 1024, lr = base lr x batch / 256, 5 warm-up epochs then cosine to 1e-6, AdamW
(0.9, 0.999) with weight decay 0.05 (not on biases, norms or 1-D parameters), label smoothing
0.1, Mixup 0.8 / CutMix 1.0 (one per batch, switch 0.5), RandomResizedCrop (0.08, 1) + flip,
bicubic; evaluated on the validation centre crops (resize 256, crop 224) every 2,500 steps.
Absent (MAE has them): RandAugment (9, 0.5) and random erasing (0.25): expect a few tenths of a
point less than the papers' numbers until they are added.

On TPU v5p (compiled ahead of time with cjepa-compile, not run; BENCHMARKS.md), by the
compiler's estimate, data parallel and no remat: every size fits v5p-8 (4 chips, 256 images
each): B/16 28.4 GiB a chip (MFU ~47%), L/16 75.2 GiB (~53%), H/14 90.2 GiB with 5% free (~57%);
v5p-16 leaves H/14 24% free (72.4 GiB, ~60%).

Data: tfds `imagenet2012` as tfds prepares it by default (TFRecord), local or on GCS, read by
tf.data (`data.loader='tf'`, set here; needs `pip install -e '.[tf]'`). Without TensorFlow:
prepare it as ArrayRecord once (`tfds build imagenet2012 --file_format=array_record`) on a local
or fuse-mounted disk and add `--config.data.loader=grain --config.data.dataset=array_record
--config.data.data_dir=DIR/imagenet2012/5.1.0` (README, Data).
"""

from cjepa_jax import config as config_lib

_SIZES = {  # variant: (epochs, base_lr, layer_decay, drop_path)
    'B/16': (100, 5e-4, 0.65, 0.1),
    'L/16': (50, 1e-3, 0.75, 0.2),
    'H/14': (50, 1e-3, 0.75, 0.3),
}


def get_config(arg=None):
  variant = arg or 'B/16'
  if variant not in _SIZES:
    raise ValueError(f'finetune_in1k takes one of {tuple(_SIZES)} (e.g. '
                     f'configs/finetune_in1k.py:L/16), got {variant!r}.')
  epochs, base_lr, layer_decay, drop_path = _SIZES[variant]
  c = config_lib.default_finetune_config()
  c.batch_size = 1024
  c.epochs = epochs
  c.ckpt_every_steps = 2500
  c.evals.classify.update(every_steps=2500, eval_batch_size=1024)
  c.data.dataset = 'imagenet2012'
  c.data.loader = 'tf'  # tfds ImageNet as prepared by default (TFRecord; see the docstring).
  c.data.eval_split = 'validation'
  c.model.variant = variant
  c.model.drop_path_rate = drop_path
  c.optim.base_lr = base_lr
  c.optim.layer_decay = layer_decay
  return c
