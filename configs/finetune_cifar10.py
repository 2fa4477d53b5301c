r"""CIFAR-10 fine-tuning of the ViT-Ti/4 (4 blocks) that configs/cifar10_vit_tiny.py pretrains.

  python -m cjepa_jax.finetune --config configs/finetune_cifar10.py --workdir runs/ft_cjepa \
      --config.pretrained=runs/cifar10_cjepa
  python -m cjepa_jax.finetune --config configs/finetune_cifar10.py --workdir runs/ft_random \
      --config.pretrained=random

`pretrained` is a pretraining workdir (its EMA target encoder; `--config.encoder=context` for the
context encoder), a step directory, or `random` (this file's ViT-Ti/4, depth 4: the same
encoder, randomly initialised, the baseline every comparison needs).

MAE / BEiT's recipe (config.default_finetune_config) shrunk for a 2-core CPU; ours where it says so:
  * 1 epoch of batch 128 (390 steps), evaluated on the 10,000 test images every 130 steps and
    at the end (measured: 33-38 minutes a run on this 2-core CPU beside a pretraining run,
    25-36 img/s; RESULTS.md, section F);
  * AdamW (0.9, 0.999), weight decay 0.05, base lr 1e-3 per 256 (peak 5e-4), warm-up 0.2 epoch,
    cosine to 1e-6;
  * layer-wise lr decay 0.75 (4 blocks: the patch embedding gets 0.75^5 = 0.24), drop path 0.1;
  * Mixup 0.8 / CutMix 1.0 (one per batch), label smoothing 0.1, as MAE;
  * ours: RandomResizedCrop scale (0.35, 1) instead of (0.08, 1) (an 8 % crop of a 32 px image is
    ~9 px), bilinear resize, horizontal flip, float32 compute.
See RESULTS.md for what it gives from each pretrained encoder and from random init.
"""

from cjepa_jax import config as config_lib


def get_config():
  c = config_lib.default_finetune_config()
  c.batch_size = 128
  c.epochs = 1
  c.log_every_steps = 39
  c.ckpt_every_steps = 130
  c.evals.classify.update(every_steps=130, eval_batch_size=500)

  config_lib.set_cifar10_image_folder(c.data)
  c.data.crop_scale = (0.35, 1.0)
  c.data.interpolation = 'bilinear'

  c.model.variant = 'Ti/4'
  c.model.depth = 4
  c.model.dtype = 'float32'
  c.model.drop_path_rate = 0.1

  c.optim.base_lr = 1e-3
  c.optim.warmup_epochs = 0.2
  c.optim.layer_decay = 0.75
  return c
