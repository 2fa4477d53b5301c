"""cjepa_jax: I-JEPA and C-JEPA self-supervised pretraining in JAX/Flax, evaluation and fine-tuning.

Modules, one per concept (data flows down this list's library part; no library module imports an
entry point). A config is read where it enters, by an entry point and the task it builds, into
small frozen specs (`DataSpec`, `MeshSpec`, `StepSpec`, `EvalsSpec`, `RunSpec`, ...), each read
by its `from_config`; the library modules below take those specs or plain values.

Models
  models/vit.py         ViT encoder (context and EMA target encoder).
  models/predictor.py   The narrow JEPA predictor.
  models/projector.py   The VICReg projector (C-JEPA 'blocks' mode).
  models/classifier.py  The fine-tuning classifier: encoder, mean pool, LayerNorm, linear head.
  models/jepa.py        The model bundle: every module of a run from its `ModelSpec` or a saved
                        model config, abstract params, and the one "does this tree fit" check.
Objective and step
  masks.py              Multi-block masks with static shapes, sampled inside the step.
  losses.py             The JEPA loss and the VICReg terms (`VICRegSpec`).
  optim.py              The optimizers (`AdamW`, `LayerDecayAdamW`, the `RunLength`):
                        pretraining's schedules (built once), AdamW and EMA update;
                        fine-tuning's AdamW with layer-wise lr decay.
  train_step.py         The train state, the pure step, and `setup` of a `StepSpec` (models,
                        optimizer, shardings, the jitted step) without absl or TensorFlow.
  mixup.py              Mixup / CutMix and label smoothing for fine-tuning (in the step).
  finetune_step.py      The fine-tuning state, the pure step, and `setup` of its `StepSpec`,
                        without absl or TensorFlow.
  sharding.py           Device mesh (`MeshSpec`), FSDP shardings, and a train state and step
                        laid out on the mesh (`jit_train`, both `setup`s).
  flops.py              Analytic FLOP count and device peaks for MFU.
  cpu_flags.py          XLA:CPU options the entry points set before JAX starts (CPU only).
  aot.py                Ahead-of-time compiles for a TPU slice from any host: slice names,
                        HBM table, memory / cost / collectives of a compiled program.
Run machinery
  config.py             Every config key with its default and meaning; validation; resume rules.
  checkpoint/           Orbax checkpoints: exact resume, checksums, failed saves, init_from.
  checkpoint/manager.py `Checkpointer`: a run's saves and restores.
  checkpoint/reading.py A checkpoint read by path: config, extra, a subtree, init_from.
  checkpoint/integrity.py
                        The checksum per array, recorded at save, verified at restore.
  checkpoint/layout.py  The directory layout; complete and cut-off steps.
  checkpoint/errors.py  The checkpoint errors and their one-line texts.
  data/                 Input data; TensorFlow only in the tf.data loader, imported on first use.
  data/spec.py          `DataSpec`: what the input reads of a config (`data.*`, seed, batch).
  data/input_pipeline.py
                        The input API: train / eval iterators, dataset checks, class names.
  data/sources.py       The grain loader's random-access sources.
  data/image_folder.py  The image-folder layout: its classes and files.
  data/array_record.py  ArrayRecord datasets: record format, shards, class names, converter.
  data/augment.py       numpy / PIL preprocessing: RandomResizedCrop, ablations, eval crop.
  data/grain_loader.py  grain (the default loader): global shuffle, O(1) exact resume.
  data/tf_augment.py    The same preprocessing in TensorFlow.
  data/tf_loader.py     tf.data over tfds, an image folder or synthetic images.
  data/lazy_tf.py       TensorFlow / tfds imported on first use; the missing-extra error.
  data/batching.py      Host-side batch arithmetic both loaders share.
  metrics.py            metrics.jsonl, TensorBoard, the progress line, the timed log window.
  workdir_lock.py       One trainer per workdir: a lock file with a heartbeat lease.
  errorlog.py           Library tracebacks to WORKDIR/errors.log, off the console.
  preemption.py         SIGTERM / SIGINT -> save the step in flight, `Preempted`, exit 75.
  distributed.py        jax.distributed start-up and fail-fast errors across processes.
  reference_layout.py   The reference I-JEPA state-dict layout <-> flax params; writing a
                        converted checkpoint (shared by the converters and the export).
  hf.py                 Hugging Face IJepaModel folders <-> encoders (safetensors, no torch):
                        import, export.
  hf_card.py            The model card written with an exported encoder.
  evals/                Evaluation: one registry of evaluator types (kNN, linear, low-shot,
                        few-shot, attentive probes; fine-tuning's classifier accuracy), one
                        config shape (`config.evals.<name>`), features, the probe runner.
  loop.py               The one training loop of pretraining and fine-tuning, given a `Task`
                        (and its `RunSpec`): restore or init, resume checks, the finite check,
                        evaluators at their cadence, the best checkpoint, saves, preemption,
                        config.json.
Entry points (absl flags are defined in their `run()`, never at import)
  cli.py                The CLIs' one error path (one line, exit 1) and `--help`.
  train.py              `cjepa-train`: pretraining (reads the config into its task for loop.py).
  probe.py              `cjepa-probe`: evaluators on a checkpoint.
  finetune.py           `cjepa-finetune`: fine-tuning a pretrained encoder as a classifier
                        (reads the config into its task for loop.py).
  convert_torch.py      `cjepa-convert-torch`: reference PyTorch checkpoints -> orbax.
  compile.py            `cjepa-compile`: a recipe's step compiled for a TPU slice (no TPU):
                        fit, memory per chip, the compiler's estimate, collectives.
  convert_hf.py         `cjepa-convert-hf`: Hugging Face I-JEPA folders (safetensors) -> orbax.
  export.py             `cjepa-export`: an encoder -> a Hugging Face IJepaModel folder and card.
  convert_array_record.py
                        `cjepa-convert-array-record`: an image folder -> ArrayRecord shards.
  mask_stats.py         `python -m cjepa_jax.mask_stats`: statistics and pictures of the masks.
"""

__version__ = "0.1.0"
