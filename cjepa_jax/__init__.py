"""cjepa_jax: I-JEPA and C-JEPA self-supervised pretraining in JAX/Flax.

Modules, one per concept:
  models/vit.py        ViT encoder (context and EMA target encoder).
  models/predictor.py  The narrow JEPA predictor.
  masks.py             Multi-block masks with static shapes.
  losses.py            The JEPA loss and the VICReg (C-JEPA) terms.
  optim.py             AdamW, the lr / weight-decay / EMA schedules, the EMA update.
  config.py            The default config every recipe in configs/ starts from.
  sharding.py          Device mesh and FSDP shardings.
  train_step.py        The pure, jitted train step.
  train.py             The `cjepa-train` entry point.
  input_pipeline.py    tf.data input (imported only by the trainer, never by the step).
  checkpoint.py        Orbax checkpointing with exact resume.
"""

__version__ = "0.1.0"
