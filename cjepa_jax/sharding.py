"""Device mesh and shardings: data parallel x FSDP over a 2-D `jax.sharding.Mesh`.

The mesh has two axes, `('data', 'fsdp')`. The batch is split over both (every device gets its own
examples). Parameters, the EMA target parameters and the optimizer state are sharded FSDP-style
over `fsdp`: each large array is split along its largest dimension that `fsdp` divides, and
replicated over `data`. XLA inserts the all-gathers (forward) and reduce-scatters (gradients) that
this implies. With `fsdp = 1` this is plain data parallelism; on one device everything is local.

`make_mesh` takes a `MeshSpec` (`config.mesh.*`, read once where the config enters); `jit_train`
lays a train state and its step out on the mesh the same way for both trainers (pretraining's
train_step.py, fine-tuning's finetune_step.py), over the batch of `abstract_batch`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')   # The batch dimension is split over both axes.
FSDP_MIN_SIZE = 2**14           # Arrays smaller than this stay replicated: gathering costs more.


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """The mesh's axis sizes, `config.mesh.{data,fsdp}` (-1: all the devices the other leaves)."""
  data: int = -1
  fsdp: int = 1

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> MeshSpec:
    return cls(int(config.mesh.data), int(config.mesh.fsdp))


def mesh_shape(spec: MeshSpec, num_devices: int) -> tuple[int, int]:
  """Resolves the spec's sizes (-1: all remaining devices) against a device count."""
  data, fsdp = spec.data, spec.fsdp
  if data == -1 and fsdp == -1:
    raise ValueError('config.mesh.data and config.mesh.fsdp cannot both be -1; set one of them.')
  for name, value in (('data', data), ('fsdp', fsdp)):
    if value == 0 or value < -1:
      raise ValueError(f'config.mesh.{name}={value}: use a positive size or -1 (all remaining '
                       'devices).')
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if num_devices % known:
      raise ValueError(f'config.mesh: {known} does not divide the {num_devices} devices; pick a '
                       f'divisor of {num_devices}.')
    data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
  if data * fsdp != num_devices:
    raise ValueError(
        f'config.mesh.data={data} x config.mesh.fsdp={fsdp} = {data * fsdp} devices, but '
        f'{num_devices} are present. Set --config.mesh.data=-1 to use all devices, or make the '
        'product equal the device count.')
  return data, fsdp


def make_mesh(spec: MeshSpec, devices: list[Any] | None = None) -> Mesh:
  """Builds the `('data', 'fsdp')` mesh of `spec` over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(spec, len(devices))
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if num_slices > 1:
    # Multi-slice: only the data axis crosses the data-centre network (one gradient all-reduce
    # per step); FSDP's all-gathers stay on each slice's fast interconnect.
    if shape[0] % num_slices:
      raise ValueError(f'config.mesh.data={shape[0]} must be a multiple of the {num_slices} '
                       'slices: the data axis spans them (keep fsdp within a slice).')
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // num_slices, shape[1]),
                                                (num_slices, 1), devices=devices)
    return Mesh(grid, MESH_AXES)
  try:
    # Physical-topology-aware placement (ICI rings on TPU); falls back for fake CPU devices.
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError, AttributeError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch array: leading dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Partition spec of one array: its largest dimension divisible by `fsdp_size`, over 'fsdp'.

  Ties go to the last such dimension (the output features of a Dense kernel). Small arrays and
  arrays with no divisible dimension are replicated.
  """
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  best = None
  for axis, dim in enumerate(shape):
    if dim % fsdp_size == 0 and (best is None or dim >= shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = 'fsdp'
  return P(*spec)


def fsdp_shardings(mesh: Mesh, abstract_tree: Any, min_size: int = FSDP_MIN_SIZE) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): FSDP over 'fsdp'."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)),
      abstract_tree)


def check_batch_divisible(global_batch: int, mesh: Mesh, process_count: int,
                          accum_steps: int = 1) -> None:
  """Raises a ValueError naming the fix when the global batch can't be split evenly over the
  batch shards, the processes and (`accum_steps` > 1) into micro-batches of equal shares."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % shards:
    raise ValueError(
        f'batch_size={global_batch} is not divisible by the {shards} batch shards (mesh '
        f"data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}). Use a multiple of {shards}, "
        f'e.g. --config.batch_size={max(shards, global_batch // shards * shards)}.')
  if global_batch % process_count:
    raise ValueError(f'batch_size={global_batch} is not divisible by the {process_count} '
                     'processes; use a multiple of the process count.')
  if global_batch % (shards * accum_steps):
    raise ValueError(
        f'batch_size={global_batch} cannot be split into accum_steps={accum_steps} micro-batches '
        f'of equal shares on the {shards} batch shards: use a batch_size that is a multiple of '
        f'{shards * accum_steps} (e.g. --config.batch_size='
        f'{max(1, global_batch // (shards * accum_steps)) * shards * accum_steps}), or another '
        'accum_steps.')


def split_micro(x: jax.Array, accum_steps: int, mesh: Mesh | None = None) -> jax.Array:
  """[B, ...] -> [A, B / A, ...]: micro-batch a holds rows a, A + a, 2A + a, ...

  Strided, not contiguous: each device holds a contiguous slice of the sharded batch, so every
  micro-batch keeps an equal share on every device and the split moves no data. With `mesh`,
  the micro-batches' rows stay pinned to the batch axes.
  """
  out = jnp.swapaxes(x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]), 0, 1)
  if mesh is None:
    return out
  return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(None, BATCH_AXES)))


def merge_micro(x: jax.Array) -> jax.Array:
  """The inverse of `split_micro`: [A, B / A, ...] -> [B, ...] in the batch's order."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def abstract_batch(batch_size: int, image_size: int, mesh: Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch as sharded ShapeDtypeStructs: image [B, S, S, 3] float32, label [B] int32."""
  s = batch_sharding(mesh)
  return {'image': jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32,
                                        sharding=s),
          'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=s)}


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract_tree` carrying `shardings` (a restore or compile target)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


class JittedTrain(NamedTuple):
  """A train state and its step laid out on a mesh (`jit_train`)."""
  abstract_state: Any            # ShapeDtypeStructs of the train state.
  state_shardings: Any           # NamedShardings of the train state (FSDP over 'fsdp').
  init_fn: Callable[[], Any]     # Jitted: a fresh state, created directly sharded.
  jitted_step: Callable[..., tuple[Any, ...]]   # (state, batch) -> (state, metrics, *aux).
  trace_count: list[int]         # [n]: how often the step was traced, i.e. compiled.


def jit_train(init: Callable[[], Any], step: Callable[[Any, Any], tuple[Any, ...]], mesh: Mesh,
              abstract_batch: dict[str, jax.ShapeDtypeStruct], aux_shardings: tuple[Any, ...] = ()
              ) -> JittedTrain:
  """The state's shape and FSDP shardings, its sharded init and the jitted step; compiles nothing.

  `step(state, batch) -> (state, metrics, *aux)`: the state is donated, the metrics (scalars) come
  back replicated, each aux output with its sharding of `aux_shardings`. The step's traces are
  counted: the loop warns when a run compiled it more than once.
  """
  abstract_state = jax.eval_shape(init)
  state_shardings = fsdp_shardings(mesh, abstract_state)
  init_fn = jax.jit(init, out_shardings=state_shardings)
  trace_count = [0]

  def counted_step(state, batch):
    trace_count[0] += 1  # Runs once per trace: a second trace means a recompilation.
    return step(state, batch)

  batch_shardings = {k: v.sharding for k, v in abstract_batch.items()}
  jitted_step = jax.jit(
      counted_step, in_shardings=(state_shardings, batch_shardings),
      out_shardings=(state_shardings, replicated(mesh), *aux_shardings), donate_argnums=0)
  return JittedTrain(abstract_state, state_shardings, init_fn, jitted_step, trace_count)
