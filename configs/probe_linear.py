r"""Frozen evaluations of a pretrained encoder (CIFAR-10 or ImageNet): linear, kNN, few-shot,
low-shot and attentive probes, any list of them in one run.

  python -m cjepa_jax.probe --config configs/probe_linear.py \
      --config.pretrained=runs/cifar10_ijepa --workdir runs/cifar10_ijepa/probe
  python -m cjepa_jax.probe --config configs/probe_linear.py \
      --config.pretrained=random --workdir runs/cifar10_random/probe
  python -m cjepa_jax.probe --config configs/probe_linear.py:imagenet \
      --config.pretrained=DIR --config.data.data_dir=TFDS_DIR --workdir DIR/probe
  python -m cjepa_jax.probe --config configs/probe_linear.py --config.pretrained=DIR \
      --config.probes=linear,knn,attentive,fewshot,lowshot --workdir DIR/probe

`probes` is a comma-separated list of the entries of `evals` to run (each an evaluator of
cjepa_jax/evals/registry.py with its options, `--config.evals.knn.k=10`): `linear`, `knn`,
`fewshot` (ridge regression on k examples per class, big_vision's protocol), `lowshot` (the linear
probe on a seeded, class-balanced 1% / 10% of the train labels) and `attentive` (a learned
cross-attention pooler over the final tokens, V-JEPA's protocol; the costly one: 20 minutes for
CIFAR-10's 4 heads x 5 epochs on 2 shared CPU cores). The default runs all but `attentive`.

The argument is the dataset: `cifar10` (default; the image folder `data/cifar10/{train,test}`
that the README unpacks, 32 px, the whole image: no crop) or `imagenet` (tfds `imagenet2012`,
224 px, the `validation` split as the test split).

`pretrained` is a pretraining workdir (its latest checkpoint), one step directory
`DIR/checkpoints/<step>`, or `random` (a randomly initialised encoder of `model.*`, the
baseline). With a checkpoint, `model.*` and `data.image_size` come from the checkpoint's saved
config; `model.*` here is used for `random` only and matches the pretraining recipe of the
dataset (configs/cifar10_vit_tiny.py, configs/in1k_vith14_ep300.py).

Writes DIR/probe_results.json (accuracies in percent, `"unit": "percent"`); see
cjepa_jax/probe.py for the protocol. The (lr, wd) grid and the 'last' / 'last4' choice are made
on `evals.linear.holdout_fraction` of the TRAIN split, never on the test split.

ImageNet data (`:imagenet`): tfds `imagenet2012` as tfds prepares it by default (TFRecord), read by
tf.data (`data.loader='tf'`, set here; needs `pip install -e '.[tf]'`). Without TensorFlow:
prepare it as ArrayRecord once (`tfds build imagenet2012 --file_format=array_record`) on a local
or fuse-mounted disk and add `--config.data.loader=grain --config.data.dataset=array_record
--config.data.data_dir=DIR/imagenet2012/5.1.0` (README, Data).
"""

import ml_collections

from cjepa_jax import config as config_lib

_DATASETS = ('cifar10', 'imagenet')


def get_config(arg=None):
  dataset = arg or 'cifar10'
  if dataset not in _DATASETS:
    raise ValueError(f'probe_linear takes one of {_DATASETS} (e.g. '
                     f'configs/probe_linear.py:imagenet), got {dataset!r}.')
  base = config_lib.default_config()
  c = ml_collections.ConfigDict()
  c.pretrained = ''              # Workdir, checkpoint step dir, or 'random'. Required.
  c.probes = 'linear,knn,fewshot,lowshot'  # The entries of `evals` to run (+ 'attentive').
  c.encoder = 'target'           # 'target' (EMA target_params, as the paper) or 'context'.
  c.features = 'both'            # 'last', 'last4' or 'both' (report the better on the holdout).
  c.seed = 0
  c.batch_size = 512             # Global batch of the feature extraction.
  c.train_examples = 0           # 0: the whole train split; > 0: a fixed subset (quick runs).
  c.eval_examples = 0            # 0: the whole eval split.

  c.data = base.data             # The pretraining data keys; the probe reads the eval ones.
  c.model = base.model           # For `random` only; a checkpoint brings its own.
  c.mesh = base.mesh

  # The evaluators, one entry each (the shape of every evaluator's entry, cjepa_jax/evals/base.py):
  # `type` and its options. A probe run extracts the features once for all of them, from
  # `train_examples` / `eval_examples` / `batch_size` above; `every_steps` is for trainers.
  c.evals = ml_collections.ConfigDict()
  lin = c.evals.linear = ml_collections.ConfigDict()
  lin.type = 'linear'
  lin.epochs = 100
  lin.batch_size = 1024          # 0: full batch.
  # The grid (every lr with every wd, 28 classifiers trained at once). Adam, cosine-decayed to 0;
  # wd is the L2 strength on the kernel: loss + wd/2 |W|^2. Wide on purpose: the probe is convex
  # but slow to converge. On CIFAR-10 the old grid's largest lr (0.1) won for every encoder, an
  # edge; it now reaches 1.0 so that the choice can be interior (RESULTS.md says where it fell).
  lin.lrs = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
  lin.wds = (0.0, 1e-5, 1e-4, 1e-3)
  lin.holdout_fraction = 0.1
  lin.retrain = True             # Retrain the chosen (lr, wd) on the whole train split.

  c.evals.knn = ml_collections.ConfigDict(dict(type='knn', k=20, temperature=0.07))

  # Few-shot ridge regression, big_vision's protocol (cjepa_jax/evals/fewshot.py): its fixed
  # l2 = 2^10, k examples per class, 3 seeds.
  c.evals.fewshot = ml_collections.ConfigDict(dict(
      type='fewshot', shots=(1, 5, 10, 25), seeds=3, l2_reg=2.0 ** 10))

  # Low-shot linear: the linear probe (the same grid and holdout) on a seeded, class-balanced
  # fraction of the train labels; the test split whole. 1%: the I-JEPA paper's ImageNet protocol.
  c.evals.lowshot = ml_collections.ConfigDict(lin.to_dict())
  c.evals.lowshot.type = 'lowshot'
  c.evals.lowshot.fractions = (0.01, 0.1)

  # Attentive probe (cjepa_jax/evals/attentive.py), V-JEPA's: one query, the encoder's head count,
  # AdamW + warm-up + cosine; (lr, wd) chosen on the same held-out train fraction as the linear
  # probe, the chosen head tested (not retrained). Trains on stored centre-crop tokens. Sized for
  # a CPU: 4 heads x 5 epochs over CIFAR-10's 45,000 fitting rows took 20 min on 2 shared cores.
  att = c.evals.attentive = ml_collections.ConfigDict()
  att.type = 'attentive'
  att.lrs = (5e-4, 2e-3)
  att.wds = (0.01, 0.1)
  att.epochs = 5
  att.warmup_epochs = 1.0
  att.batch_size = 256
  att.holdout_fraction = 0.1
  att.num_queries = 1
  att.num_heads = 0              # 0: the encoder's head count.
  att.mlp_ratio = 4.0

  if dataset == 'cifar10':
    config_lib.set_cifar10_image_folder(c.data)
    c.model.variant = 'Ti/4'
    c.model.depth = 4   # configs/cifar10_vit_tiny.py's encoder, for the random baseline.
    c.model.dtype = 'float32'
  else:
    c.data.dataset = 'imagenet2012'
    c.data.loader = 'tf'  # tfds ImageNet as prepared by default (TFRecord; see the docstring).
    c.data.train_split = 'train'
    c.data.eval_split = 'validation'
    c.data.num_classes = 1000
    c.data.image_size = 224
    c.data.eval_resize = 256
    c.batch_size = 1024
    c.evals.linear.update(epochs=50, batch_size=4096)
    c.evals.lowshot.batch_size = 4096   # Its 1% / 10% subsets: still 100 epochs.
    # Tokens of all 1.28M images do not fit a host (cjepa_jax/evals/attentive.py): a subset.
    c.evals.attentive.update(epochs=20, batch_size=1024)
    c.model.variant = 'H/14'
    c.model.dtype = 'bfloat16'
  return c
