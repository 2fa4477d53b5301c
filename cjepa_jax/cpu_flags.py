"""XLA:CPU options the project's own entry points set before JAX starts its backend.

`apply()` adds `CPU_FLAGS` to `XLA_FLAGS` in the environment; the command-line entry points
(`cli.run`: training, fine-tuning, probes) and `benchmarks/step.py` call it first thing.
Importing this or any library module sets nothing, so a program that embeds the package keeps
whatever it chose.

The options are `xla_cpu_*` ones only: XLA reads them in its CPU compiler alone, so the device
programs of a GPU or TPU run are not affected (its host-side CPU programs are).

  --xla_cpu_experimental_ynn_fusion_type=   (empty: no YNNPACK fusions)
      jaxlib 0.10 hands dots and reductions to YNNPACK fusions on x86 by default; on the
      CIFAR-10 recipe's step (ViT-Ti/4 at 32 px: 64-token GEMMs of width 192-768, small
      LayerNorm reductions) the step ran about 5% faster with XLA's own dot and fusion
      emitters, on a loaded machine and not clearly beyond its noise (BENCHMARKS.md, "Against
      the reference PyTorch step"); the results differ by float rounding only.

A user's own value for an option wins: an option already named in `XLA_FLAGS` is left as it is.
`CJEPA_XLA_CPU_FLAGS=0` in the environment turns the whole set off.
"""

from __future__ import annotations

import logging
import os
from typing import MutableMapping

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)
DISABLE_ENV = 'CJEPA_XLA_CPU_FLAGS'


def _option(flag: str) -> str:
  return flag.lstrip('-').split('=', 1)[0]


def merged(xla_flags: str, flags: tuple[str, ...] = CPU_FLAGS) -> str:
  """`xla_flags` plus every one of `flags` whose option it does not already name."""
  present = {_option(f) for f in xla_flags.split()}
  extra = [f for f in flags if _option(f) not in present]
  return ' '.join([xla_flags.strip()] + extra).strip() if extra else xla_flags


def apply(environ: MutableMapping[str, str] | None = None) -> str:
  """Adds `CPU_FLAGS` to `environ['XLA_FLAGS']` (default: os.environ); returns the new value.

  Call before the first JAX call that starts a backend (XLA reads XLA_FLAGS once); after it,
  the flags would not take effect, so nothing is changed and a warning says so.
  """
  environ = os.environ if environ is None else environ
  current = environ.get('XLA_FLAGS', '')
  if environ.get(DISABLE_ENV, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return current
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = False
  if started:
    logging.warning('cpu_flags.apply: the JAX backend already started; XLA_FLAGS unchanged.')
    return current
  new = merged(current)
  environ['XLA_FLAGS'] = new
  return new
