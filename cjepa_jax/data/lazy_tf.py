"""TensorFlow and tfds, imported on first use: the grain loader never imports them.

`tf` and `tfds` here stand for the modules; the first attribute access imports them (TensorFlow
takes ~10 s) and, for TensorFlow, hides the GPUs from it at once (JAX owns the accelerators).
Neither is installed by `pip install -e .`: without them that first access raises
`MissingDependencyError`, one line naming `pip install -e '.[tf]'`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class MissingDependencyError(ImportError, ValueError):
  """TensorFlow or tfds is not installed (also a ValueError: a one-line user error)."""


# The one-line errors for a missing TensorFlow (the tf.data loader) and a missing tfds (a tfds
# dataset name, whichever the loader).
MISSING_TF = ("config.data.loader='tf' needs tensorflow, which is not installed: pip install -e "
              "'.[tf]' (or pip install tensorflow-cpu tensorflow-datasets), or use the grain "
              'loader (--config.data.loader=grain).')
MISSING_TFDS = (
    'A tfds dataset name in config.data.dataset needs tensorflow_datasets, which is not '
    "installed: pip install -e '.[tf]'; or, without it, read the dataset prepared as ArrayRecord "
    '(tfds build <name> --file_format=array_record) with --config.data.dataset=array_record '
    '--config.data.data_dir=<data_dir>/<name>/<version>.')


class _LazyModule:
  """A module imported on first attribute access: the grain loader never imports TensorFlow.

  Importing TensorFlow takes ~10 s and, on GPU hosts, must be followed by hiding the GPUs from it
  (JAX owns them), which is done here right after the import.
  """

  def __init__(self, name: str):
    self._name = name
    self._module = None

  def __getattr__(self, attr: str) -> Any:
    if self._module is None:
      try:
        module = importlib.import_module(self._name)
      except ImportError as e:
        raise MissingDependencyError(
            MISSING_TF if self._name == 'tensorflow' else MISSING_TFDS) from e
      if self._name == 'tensorflow':  # First use here, whoever imported it before.
        _hide_gpus(module)
      self._module = module
    return getattr(self._module, attr)


tf = _LazyModule('tensorflow')
tfds = _LazyModule('tensorflow_datasets')


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off the GPUs (it feeds the host; JAX owns the accelerators).

  Called by the entry points' `main` before any input is built (not at import). If TensorFlow is
  not imported yet this does nothing: the tf.data loader imports it on first use and hides the
  GPUs from it then (and the grain loader never imports it).
  """
  if isinstance(sys.modules.get('tensorflow'), type(sys)):
    _hide_gpus(sys.modules['tensorflow'])


def _hide_gpus(tf_module) -> None:
  try:
    tf_module.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow already initialised its devices: too late, and harmless on CPU.
    pass
