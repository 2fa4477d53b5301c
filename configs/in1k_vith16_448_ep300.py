r"""I-JEPA ViT-H/16 on ImageNet-1K at 448 px, 300 epochs: the reference in1k_vith16-448_ep300 recipe.

  python -m cjepa_jax.train --config configs/in1k_vith16_448_ep300.py --workdir gs://BUCKET/ijepa_h16_448 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

As in1k_vith14_ep300 but with patch 16 at 448 px (a 28 x 28 grid). Paper: 81.1% linear probe.
At 448 px the sequence is 784 tokens: enable --config.model.remat_policy=full on 80 GB GPUs.
On TPU v5p (compiled ahead of time with cjepa-compile, not run; BENCHMARKS.md), by the
compiler's estimate, data parallel and no remat: v5p-128 (64 chips, 32 images each) keeps 35% of
HBM free (62.2 GiB a chip, ~0.39 s a step, MFU ~39%); v5p-64 is the smallest slice it fits at this
batch, with 4% free (91.5 GiB, ~0.78 s, ~39%).

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
  c.model.variant = 'H/16'
  c.model.pred_depth = 12
  c.data.image_size = 448
  c.data.loader = 'tf'  # tfds ImageNet as prepared by default (TFRecord; see the docstring).
  c.epochs = 300
  c.optim.warmup_epochs = 40
  return c
