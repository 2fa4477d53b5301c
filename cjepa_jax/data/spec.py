"""What the input pipeline reads of a run's config: `DataSpec`, read once where the config enters.

Every function of `data/` takes a `DataSpec` (or plain values), never the config: the trainers,
the probe and fine-tuning make one with `DataSpec.from_config(config)` and hand it down. Its
values are checked where they are used (`input_pipeline`), so a spec of a bad config can be made
and the error still names the config key.
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """`config.data.*` with the run's `seed` and global `batch_size` (config.py says what each is)."""
  dataset: str
  data_dir: str
  train_split: str
  eval_split: str
  num_train_examples: int
  num_classes: int
  image_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  interpolation: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip: bool
  color_jitter: float
  grayscale: float
  blur: float
  shuffle_buffer: int
  prefetch: int
  loader: str
  workers: int
  eval_resize: int
  seed: int          # Seeds the data order and the augmentations (config.seed).
  batch_size: int    # The global training batch (config.batch_size).

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> DataSpec:
    """Reads `config.data`, `config.seed` and `config.batch_size` (keys an older config lacks
    take their defaults)."""
    d = config.data
    return cls(
        dataset=d.dataset, data_dir=d.data_dir, train_split=d.train_split,
        eval_split=d.eval_split, num_train_examples=d.num_train_examples,
        num_classes=d.num_classes, image_size=d.image_size, crop_scale=tuple(d.crop_scale),
        crop_ratio=tuple(d.crop_ratio), interpolation=d.interpolation, mean=tuple(d.mean),
        std=tuple(d.std), flip=d.flip, color_jitter=d.color_jitter, grayscale=d.grayscale,
        blur=d.blur, shuffle_buffer=d.get('shuffle_buffer', 10_000),
        prefetch=d.get('prefetch', 2), loader=d.get('loader', 'grain'),
        workers=d.get('workers', 0), eval_resize=d.get('eval_resize', 256), seed=config.seed,
        batch_size=config.batch_size)
