"""Input data: the API the trainers call (`input_pipeline`) and, behind it, two loaders.

  spec.py             `DataSpec`: what the input reads of a config, read once where it enters.
  input_pipeline.py   The input API: train / eval iterators, dataset checks, class names.
  sources.py          The grain loader's random-access sources (image folder, ArrayRecord, tfds,
                      synthetic).
  image_folder.py     The image-folder layout: its classes and files (both loaders, converter).
  array_record.py     ArrayRecord datasets: record format, shards, class names, the converter.
  augment.py          numpy / PIL preprocessing: RandomResizedCrop, ablations, evaluation crop.
  grain_loader.py     grain: global shuffle, batches, O(1) exact resume; no TensorFlow.
  tf_augment.py       The same preprocessing in TensorFlow (the tf.data loader).
  tf_loader.py        tf.data over tfds, an image folder or synthetic images.
  lazy_tf.py          TensorFlow / tfds imported on first use, the one-line missing-extra error.
  batching.py         Host-side batch arithmetic both loaders share.
"""
