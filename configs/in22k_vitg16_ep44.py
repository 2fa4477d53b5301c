r"""I-JEPA ViT-g/16 on ImageNet-22K at 224 px, 44 epochs: the reference in22k_vitg16_ep44 recipe.

  python -m cjepa_jax.train --config configs/in22k_vitg16_ep44.py --workdir gs://BUCKET/ijepa_g16_in22k \
      --config.data.data_dir=/data/imagenet22k --config.mesh.fsdp=8

ViT-g (1408 wide, 40 deep, MLP ratio 48/11) with a 16-deep predictor. At 1.0B encoder parameters
(x2 with the EMA target, + Adam moments) shard the state with FSDP; scan over blocks keeps the
compile short. Reads an image folder, as in22k_vith14_ep66.
"""

from cjepa_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'g/16'
  c.model.pred_depth = 16
  c.model.scan = True
  c.data.dataset = 'image_folder'
  c.data.num_train_examples = 14_197_122
  c.data.num_classes = 21_841
  c.data.eval_split = ''
  c.epochs = 44
  c.optim.warmup_epochs = 3
  return c
