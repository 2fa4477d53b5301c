r"""I-JEPA ViT-g/16 on ImageNet-22K at 224 px, 44 epochs: the reference in22k_vitg16_ep44 recipe.

  python -m cjepa_jax.train --config configs/in22k_vitg16_ep44.py --workdir gs://BUCKET/ijepa_g16_in22k \
      --config.data.data_dir=/data/imagenet22k

ViT-g (1408 wide, 40 deep, MLP ratio 48/11) with a 16-deep predictor; scan over blocks keeps the
compile short. Reads an image folder, as in22k_vith14_ep66. On TPU v5p-64 (32 chips, 64 images
each; compiled ahead of time with cjepa-compile, not run; BENCHMARKS.md) plain data parallelism
fits, 58.0 of 95 GiB per chip with the 1.0B-parameter encoder, its EMA copy and Adam moments
replicated, and the compiler estimates ~0.28 s a step (MFU ~39%); FSDP over 8 chips
(`--config.mesh.fsdp=8`, this recipe's earlier advice) cuts that memory to 44.5 GiB but gathers
~94 GiB of weights per chip and step: ~0.40 s, ~27%. Keep fsdp for chips with less HBM, or for
the smallest slice: on v5p-32 data parallelism needs 100.0 GiB and does not fit, while
`--config.mesh.fsdp=8` fits (87.6 GiB; estimated ~0.63 s a step, ~35%); with
`--config.accum_steps=2` as well it fits v5p-16 (89.1 GiB).
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
