"""Test set-up: 8 fake CPU devices for the sharding tests, float32 matmuls, quiet TensorFlow.

XLA_FLAGS must be set before jax is imported anywhere, so it is set here, at collection time.
Single-device tests simply run on the first device.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The default 'highest' precision makes CPU float32 matmuls exact, which the reference
# comparisons rely on.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_CIFAR10 = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'datasets' / 'cifar10'


@pytest.fixture(scope='session')
def shared_cifar10_tarballs():
  """The shared CIFAR-10 tarballs, or skip when ../shared is absent."""
  if not (SHARED_CIFAR10 / 'train.tar.gz').exists():
    pytest.skip('../shared/datasets/cifar10 is not present')
  return SHARED_CIFAR10
