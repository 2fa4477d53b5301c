r"""C-JEPA on ImageNet-1K at 224 px, 600 epochs (Mo and Tong 2024); the argument picks the model.

  python -m cjepa_jax.train --config configs/cjepa_in1k_ep600.py:B/16 --workdir gs://BUCKET/cjepa_b16 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets [--config.vicreg.mode=blocks]
  python -m cjepa_jax.train --config configs/cjepa_in1k_ep600.py:L/16 --workdir gs://BUCKET/cjepa_l16 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

I-JEPA plus VICReg with weight 0.001 and coefficients 25 / 25 / 1; batch 2048, warmup 1e-4 ->
1e-3 over 15 epochs, cosine to 1e-6, weight decay 0.04 -> 0.4, EMA 0.996 -> 1.0. The paper reports
linear probes of 73.7% (B/16; I-JEPA 72.9%) and 78.1% (L/16; I-JEPA 77.5%). No official code
exists: `vicreg.mode` picks one of the two readings of where VICReg applies (cjepa_jax/losses.py).
The paper gives no predictor size; we use I-JEPA's (384 wide, 12 deep).

On TPU v5p (compiled ahead of time with cjepa-compile, not run; BENCHMARKS.md), by the
compiler's estimate, data parallel and no remat: B/16 fits v5p-8 (64.6 GiB a chip, MFU ~38%);
L/16 fits v5p-8 with 1% of HBM free, so use v5p-16 (50.7 GiB a chip, ~0.34 s a step, MFU ~44%).

Data: tfds `imagenet2012` as tfds prepares it by default (TFRecord), local or on GCS, read by
tf.data (`data.loader='tf'`, set here; needs `pip install -e '.[tf]'`). Without TensorFlow:
prepare it as ArrayRecord once (`tfds build imagenet2012 --file_format=array_record`) on a local
or fuse-mounted disk and add `--config.data.loader=grain --config.data.dataset=array_record
--config.data.data_dir=DIR/imagenet2012/5.1.0` (README, Data).
"""

from cjepa_jax import config as config_lib


def get_config(arg=None):
  variant = arg or 'B/16'
  if variant not in ('B/16', 'L/16'):
    raise ValueError(f'cjepa_in1k_ep600 takes B/16 or L/16 (configs/cjepa_in1k_ep600.py:B/16), '
                     f'got {variant!r}.')
  c = config_lib.default_config()
  c.model.variant = variant
  c.model.pred_depth = 12
  c.epochs = 600
  c.data.loader = 'tf'  # tfds ImageNet as prepared by default (TFRecord; see the docstring).
  c.optim.start_lr = 1e-4
  c.optim.warmup_epochs = 15
  c.vicreg.weight = 0.001
  c.vicreg.mode = 'context'
  return c
