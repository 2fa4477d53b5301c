"""The image-folder layout `data_dir/<split>/<class name>/<image>`: its classes and files.

Class names sorted -> label ids 0..C-1 (empty class folders included: they still take an id);
files sorted within a class. Both loaders and the ArrayRecord converter read a folder through
these listings, so they number the labels alike. Local paths with `os`; URLs (gs://...) with
`tf.io.gfile`, which only the tf.data loader reads.
"""

from __future__ import annotations

import functools
import os

from cjepa_jax.data.lazy_tf import tf


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


LAYOUT = (
    'An image folder is laid out as DATA_DIR/<split>/<class name>/<image>.jpg (e.g. unpack the '
    'shared CIFAR-10: tar -xzf train.tar.gz -C DATA_DIR && tar -xzf test.tar.gz -C DATA_DIR); set '
    'config.data.data_dir=DATA_DIR.')


@functools.lru_cache(maxsize=16)
def list_classes(data_dir: str, split: str) -> tuple[str, ...]:
  """Sorted class sub-folder names of `data_dir/split`: class i has label id i."""
  if not data_dir:
    raise ValueError("config.data.dataset='image_folder' needs config.data.data_dir. "
                     f'{LAYOUT}')
  root = os.path.join(data_dir, split)
  if not _isdir(root):
    raise ValueError(f'Image folder split {root} does not exist. {LAYOUT}')
  return tuple(sorted(c.rstrip('/') for c in _listdir(root) if _isdir(os.path.join(root, c))))


@functools.lru_cache(maxsize=16)
def list_images(data_dir: str, split: str) -> tuple[list[str], list[int]]:
  """Sorted (paths, labels) of `data_dir/split/<class>/<image>`; classes sorted -> 0..C-1."""
  root = os.path.join(data_dir, split)
  paths, labels = [], []
  for label, cls in enumerate(list_classes(data_dir, split)):
    files = sorted(f for f in _listdir(os.path.join(root, cls))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths.extend(os.path.join(root, cls, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) under {root}/<class>/. '
                     f'{LAYOUT}')
  return paths, labels


def _isdir(path: str) -> bool:
  """os.path.isdir; tf.io.gfile for URLs (gs://...), which only the tf.data loader reads."""
  return tf.io.gfile.isdir(path) if '://' in path else os.path.isdir(path)


def _listdir(path: str) -> list[str]:
  return tf.io.gfile.listdir(path) if '://' in path else os.listdir(path)
