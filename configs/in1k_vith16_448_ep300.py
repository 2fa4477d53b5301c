r"""I-JEPA ViT-H/16 on ImageNet-1K at 448 px, 300 epochs: the reference in1k_vith16-448_ep300 recipe.

  python -m cjepa_jax.train --config configs/in1k_vith16_448_ep300.py --workdir gs://BUCKET/ijepa_h16_448 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

As in1k_vith14_ep300 but with patch 16 at 448 px (a 28 x 28 grid). Paper: 81.1% linear probe.
At 448 px the sequence is 784 tokens: enable --config.model.remat_policy=full on 80 GB GPUs.
"""

from cjepa_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'H/16'
  c.model.pred_depth = 12
  c.data.image_size = 448
  c.epochs = 300
  c.optim.warmup_epochs = 40
  return c
