r"""I-JEPA ViT-H/14 on ImageNet-1K at 224 px, 300 epochs: the reference in1k_vith14_ep300 recipe.

  python -m cjepa_jax.train --config configs/in1k_vith14_ep300.py --workdir gs://BUCKET/ijepa_h14 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Reference: batch 2048 (128 x 16 A100), AdamW, lr 2e-4 -> 1e-3 over 40 warmup epochs then cosine
to 1e-6, weight decay 0.04 -> 0.4 (cosine), EMA 0.996 -> 1.0, predictor 384 wide and 12 deep,
bfloat16 compute, masks 4 x (0.15-0.2) targets and one (0.85-1.0) context. Paper: 79.3% linear
probe on ImageNet. Everything is in cjepa_jax/config.py's defaults; only what differs is set here.

On TPU v5p (compiled ahead of time with cjepa-compile, not run; BENCHMARKS.md), by the
compiler's estimate: v5p-16 (8 chips, 256 images each) is the slice to use: 77.0 of 95 GiB per
chip (19% headroom), ~0.68 s a step, ~378 img/s per chip, MFU ~54%. v5p-8 (4 chips) is the
smallest that fits, with 5% headroom (~52%); `--config.accum_steps=2` there keeps 10%. v5p-32
(16 chips, the reference's GPU count) ~49%. The defaults (data parallel, no remat, unrolled
blocks) gave the best estimate of the settings tried; by it the encoder blocks run at ~60% of
peak and the rest of the step (the narrow predictor, the loss, AdamW and the EMA) at ~30%.

Data: tfds `imagenet2012` as tfds prepares it by default (TFRecord), local or on GCS, read by
tf.data (`data.loader='tf'`, set here; needs `pip install -e '.[tf]'`). Without TensorFlow:
prepare it as ArrayRecord once (`tfds build imagenet2012 --file_format=array_record`) on a local
or fuse-mounted disk and add `--config.data.loader=grain --config.data.dataset=array_record
--config.data.data_dir=DIR/imagenet2012/5.1.0` (README, Data).
"""

from cjepa_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'H/14'
  c.model.pred_depth = 12
  c.data.image_size = 224
  c.data.loader = 'tf'  # tfds ImageNet as prepared by default (TFRecord; see the docstring).
  c.epochs = 300
  c.optim.warmup_epochs = 40
  return c
