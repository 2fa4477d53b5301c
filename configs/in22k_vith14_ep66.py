r"""I-JEPA ViT-H/14 on ImageNet-22K at 224 px, 66 epochs: the reference in22k_vith14_ep66 recipe.

  python -m cjepa_jax.train --config configs/in22k_vith14_ep66.py --workdir gs://BUCKET/ijepa_h14_in22k \
      --config.data.data_dir=/data/imagenet22k

ImageNet-22K has no tfds builder, so this reads an image folder (`data_dir/train/<label>/<image>`,
the layout of the full fall-2011 release); set num_train_examples to your copy's count. Warmup is 3
epochs; everything else as in1k_vith14_ep300, whose train step this is (the same program on a
TPU slice: see its docstring and BENCHMARKS.md for the slice to use).
"""

from cjepa_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'H/14'
  c.model.pred_depth = 12
  c.data.dataset = 'image_folder'
  c.data.num_train_examples = 14_197_122  # ImageNet-22K (fall 2011), all classes.
  c.data.num_classes = 21_841
  c.data.eval_split = ''
  c.epochs = 66
  c.optim.warmup_epochs = 3
  return c
