r"""CIFAR-10, ViT-Ti/4 at 32 px (an 8 x 8 grid): I-JEPA or C-JEPA in minutes on a CPU.

  python -m cjepa_jax.train --config configs/cifar10_vit_tiny.py --workdir runs/cifar10_ijepa
  python -m cjepa_jax.train --config configs/cifar10_vit_tiny.py:cjepa --workdir runs/cifar10_cjepa
  python -m cjepa_jax.train --config configs/cifar10_vit_tiny.py:cjepa_blocks --workdir runs/cifar10_blocks

The argument is the objective: `ijepa` (default), `cjepa` (VICReg on the pooled context
features) or `cjepa_blocks` (VICReg between the projected target-block predictions).

Data: an image folder at `data/cifar10/{train,test}/<class>/*.jpg` (unpack the shared tarballs
there, see README), or `--config.data.dataset=cifar10` for the tfds build (set
`--config.data.data_dir` to a tfds data_dir that has it), or `--config.data.dataset=synthetic`
for a smoke test.

Sizes are ours (the reference has no small-data recipe): the ViT-Ti width and heads with
`model.depth` blocks, a narrow shallow predictor, masks scaled to the 8 x 8 grid (targets of 9-12
patches; min_keep 4). See RESULTS.md for what was tuned.
"""

from cjepa_jax import config as config_lib

_OBJECTIVES = ('ijepa', 'cjepa', 'cjepa_blocks')


def get_config(arg=None):
  objective = arg or 'ijepa'
  if objective not in _OBJECTIVES:
    raise ValueError(f'cifar10_vit_tiny takes one of {_OBJECTIVES} (e.g. '
                     f'configs/cifar10_vit_tiny.py:cjepa), got {objective!r}.')
  c = config_lib.default_config()
  c.batch_size = 256
  c.epochs = 20
  c.log_every_steps = 20
  c.ckpt_every_steps = 500

  c.data.dataset = 'image_folder'
  c.data.data_dir = 'data/cifar10'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.num_train_examples = 50_000
  c.data.num_classes = 10
  c.data.image_size = 32
  c.data.eval_resize = 224  # Expressed at 224 px: resize to 32 (the native size), no crop.
  c.data.shuffle_buffer = 10_000
  c.data.mean = (0.4914, 0.4822, 0.4465)
  c.data.std = (0.2470, 0.2435, 0.2616)

  c.model.variant = 'Ti/4'
  c.model.depth = 6
  c.model.dtype = 'float32'
  c.model.pred_width = 96
  c.model.pred_depth = 4

  c.mask.min_keep = 4

  c.optim.lr = 1e-3
  c.optim.start_lr = 2e-4
  c.optim.warmup_epochs = 2

  c.evals.knn_every_steps = 0
  c.evals.knn_train_examples = 5_000
  c.evals.knn_eval_examples = 1_000

  if objective != 'ijepa':
    c.vicreg.weight = 0.001
    c.vicreg.mode = 'context' if objective == 'cjepa' else 'blocks'
    c.vicreg.projector = '512-512-512'
  return c
