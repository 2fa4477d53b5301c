"""cjepa_jax: I-JEPA and C-JEPA self-supervised pretraining in JAX/Flax, evaluation and fine-tuning.

Modules, one per concept (data flows down this list's library part; no library module imports an
entry point):

Models
  models/vit.py         ViT encoder (context and EMA target encoder).
  models/predictor.py   The narrow JEPA predictor.
  models/projector.py   The VICReg projector (C-JEPA 'blocks' mode).
  models/classifier.py  The fine-tuning classifier: encoder, mean pool, LayerNorm, linear head.
  models/jepa.py        The model bundle: every module of a run from a config or a saved model
                        config, abstract params, and the one "does this tree fit" check.
Objective and step
  masks.py              Multi-block masks with static shapes (and a mask-statistics CLI).
  losses.py             The JEPA loss and the VICReg terms (`VICRegSpec`).
  optim.py              The optimizers: pretraining's schedules (built once), AdamW and EMA
                        update; fine-tuning's AdamW with layer-wise lr decay.
  train_step.py         The train state, the pure step, and `setup` (models, optimizer,
                        shardings, the jitted step) without absl or TensorFlow.
  mixup.py              Mixup / CutMix and label smoothing for fine-tuning (in the step).
  finetune_step.py      The fine-tuning state, the pure step, and `setup`, without absl or
                        TensorFlow.
  sharding.py           Device mesh, FSDP shardings, and a train state and step laid out on
                        the mesh (`jit_train`, both `setup`s).
  flops.py              Analytic FLOP count and device peaks for MFU.
  aot.py                Ahead-of-time compiles for a TPU slice from any host: slice names,
                        HBM table, memory / cost / collectives of a compiled program.
Run machinery
  config.py             Every config key with its default and meaning; validation; resume rules.
  checkpoint.py         Orbax checkpoints: exact resume, checksums, failed saves, init_from.
  input_pipeline.py     The input API: tf.data / tfds (the only TensorFlow user, imported on
                        first use) or, with data.loader='grain', grain_pipeline.
  grain_pipeline.py     grain over random-access sources, numpy / PIL, a global shuffle.
  array_record.py       Image folder -> ArrayRecord shards (`python -m cjepa_jax.array_record`).
  metrics.py            metrics.jsonl, TensorBoard, the progress line, the timed log window.
  workdir_lock.py       One trainer per workdir: a lock file with a heartbeat lease.
  errorlog.py           Library tracebacks to WORKDIR/errors.log, off the console.
  preemption.py         SIGTERM / SIGINT -> save the step in flight, `Preempted`, exit 75.
  distributed.py        jax.distributed start-up and fail-fast errors across processes.
  reference_layout.py   The reference I-JEPA state-dict layout <-> flax params; writing a
                        converted checkpoint (shared by the converters and the export).
  hf.py                 Hugging Face IJepaModel folders <-> encoders (safetensors, no torch):
                        import, export, model card.
  evals/                Evaluation: one registry of evaluator types (kNN, linear, low-shot,
                        few-shot, attentive probes; fine-tuning's classifier accuracy), one
                        config shape (`config.evals.<name>`), features, the probe runner.
  loop.py               The one training loop of pretraining and fine-tuning, given a `Task`:
                        restore or init, resume checks, the finite check, evaluators at their
                        cadence, the best checkpoint, saves, preemption, config.json.
Entry points (absl flags are defined in their `run()`, never at import)
  cli.py                The CLIs' one error path (one line, exit 1) and `--help`.
  train.py              `cjepa-train`: pretraining (its task for loop.py).
  probe.py              `cjepa-probe`: evaluators on a checkpoint.
  finetune.py           `cjepa-finetune`: fine-tuning a pretrained encoder as a classifier (its
                        task for loop.py).
  convert_torch.py      `cjepa-convert-torch`: reference PyTorch checkpoints -> orbax.
  compile.py            `cjepa-compile`: a recipe's step compiled for a TPU slice (no TPU):
                        fit, memory per chip, the compiler's estimate, collectives.
  convert_hf.py         `cjepa-convert-hf`: Hugging Face I-JEPA folders (safetensors) -> orbax.
  export.py             `cjepa-export`: an encoder -> a Hugging Face IJepaModel folder and card.
"""

__version__ = "0.1.0"
