"""Multi-process start-up: `jax.distributed.initialize`, the main-process test and fail-fast errors.

One JAX process runs per host on TPU VMs (all of the host's chips) and one per GPU under SLURM.
Every process runs the same program; `initialize()` connects them before anything touches a device:

  * explicit `--coordinator_address/--num_processes/--process_id` flags, or the environment
    variables `CJEPA_COORDINATOR_ADDRESS/CJEPA_NUM_PROCESSES/CJEPA_PROCESS_ID` when a flag is unset
    (flags win): these are passed to `jax.distributed.initialize` (`launch/local.sh cpu N`);
  * a SLURM step with more than one task, a Cloud TPU VM (GCE or GKE) or an Open MPI job:
    `jax.distributed.initialize()` with no arguments, so JAX's own cluster detection
    (`jax._src.clusters`) reads the coordinator, process count and id from the scheduler. Under
    SLURM on GPUs JAX also restricts each process to the GPU numbered `SLURM_LOCALID`, which is why
    `launch/gpu_slurm.sbatch` makes all the node's GPUs visible to every task. On a Cloud TPU VM the
    worker count comes from the metadata server, so a single-host VM becomes a one-process cluster
    (harmless; it only starts a local coordinator);
  * otherwise: one process, nothing to do.

The entry points (`cjepa_jax.train`, `cjepa_jax.probe`) run through `cli.run`, which calls
`define_flags()` (nothing is defined at import) and wraps `main` in `initialize()` and
`fail_fast()`; `run_main(main)` does the same for scripts without the CLI error handling.

Errors. A multi-process JAX job has no built-in "one process raised, stop everyone": the others
block in their next collective. What happens here:

  * a Python exception escaping `main` on process i (under `run_main` or `fail_fast()`): its
    traceback is logged with every line prefixed `[process i/N]`, a short message is stored in the
    coordination service's key-value store, and the process exits with status 1 at once (without
    the shutdown barrier, which would wait for the others). A watcher thread in every process polls
    that key (every `_WATCH_INTERVAL_S` s) and, on seeing it, logs `[process j/N] stopping: process
    i failed: <error>` and exits with status 1 too. So all processes stop within seconds, and each
    shows the message.
  * a process that dies without a Python exception (killed, segfault, OOM-killed, lost host): no
    message can be posted; the coordination service notices the missing heartbeats after
    `heartbeat_timeout_seconds` (JAX's default, 100 s) and JAX aborts the remaining processes with a
    fatal "coordination service" error. Under SLURM, `srun --kill-on-bad-exit=1` stops the step
    sooner.
  * with one process, exceptions propagate unchanged (absl prints them and exits with status 1).

Only process 0 should write metrics, logs and TensorBoard files: `is_main_process()`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging as py_logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import jax

_FLAGS: dict[str, Any] = {}  # The flag holders, once `define_flags()` has run.


def define_flags() -> None:
  """Defines --coordinator_address, --num_processes, --process_id, --local_device_ids (once).

  The entry points call it (through `cli.run` / `run_main`) before absl parses the command line,
  so importing this module defines nothing.
  """
  if _FLAGS:
    return
  _FLAGS['coordinator_address'] = flags.DEFINE_string(
      'coordinator_address', None,
      'HOST:PORT of process 0\'s coordination service, for runs of several processes started by '
      'hand (env CJEPA_COORDINATOR_ADDRESS). Unset under SLURM and on Cloud TPU VMs: detected '
      'there.')
  _FLAGS['num_processes'] = flags.DEFINE_integer(
      'num_processes', None, 'Number of processes in the run (env CJEPA_NUM_PROCESSES).')
  _FLAGS['process_id'] = flags.DEFINE_integer(
      'process_id', None, 'This process\'s index in [0, num_processes) (env CJEPA_PROCESS_ID).')
  _FLAGS['local_device_ids'] = flags.DEFINE_list(
      'local_device_ids', None,
      'Comma-separated local device ids this process may use (env CJEPA_LOCAL_DEVICE_IDS); '
      'default: all of them, or the GPU numbered SLURM_LOCALID under SLURM.')


ENV_COORDINATOR_ADDRESS = 'CJEPA_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'CJEPA_NUM_PROCESSES'
ENV_PROCESS_ID = 'CJEPA_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'CJEPA_LOCAL_DEVICE_IDS'

# The variables JAX's SlurmCluster needs; all are set for the tasks of an `srun` step.
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')
_ERROR_KEY = 'cjepa/failed'     # Key-value store entry a failing process writes.
_WATCH_INTERVAL_S = 1.0         # How often every process polls for it.

_initialized = False
_watcher: tuple[threading.Thread, threading.Event] | None = None


def _parse_int(value: Any, name: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name}={value!r} is not an integer; set it to an integer.') from None


def detect_cluster(env: Mapping[str, str], on_cloud_tpu: bool = False) -> str | None:
  """Names the multi-process scheduler JAX can read the process layout from, or None.

  Args:
    env: the environment variables (e.g. `os.environ`).
    on_cloud_tpu: whether this process runs on a Cloud TPU VM (JAX sets
      `jax._src.cloud_tpu_init.running_in_cloud_tpu_vm` when jax is imported there).

  Returns:
    'slurm' (an `srun` step of more than one task), 'gke_tpu' (TPU_WORKER_HOSTNAMES /
    TPU_PROCESS_ADDRESSES with several hosts), 'cloud_tpu' (any other Cloud TPU VM: JAX asks the
    metadata server for the workers), 'ompi' (an Open MPI job of more than one rank) or None.
  """
  if all(v in env for v in _SLURM_VARS):
    # In the batch script itself (no srun) SLURM_NTASKS is the allocation's task count while only
    # one process runs; SLURM_STEP_NUM_TASKS is the step's own count when present.
    ntasks = env.get('SLURM_STEP_NUM_TASKS', env['SLURM_NTASKS'])
    if _parse_int(ntasks, 'SLURM_STEP_NUM_TASKS/SLURM_NTASKS') > 1:
      return 'slurm'
    return None
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
  if hosts:
    slices = _parse_int(env.get('MEGASCALE_NUM_SLICES') or 1, 'MEGASCALE_NUM_SLICES')
    return 'gke_tpu' if len(hosts.split(',')) * slices > 1 else None
  if on_cloud_tpu:
    return 'cloud_tpu'
  if 'OMPI_MCA_orte_hnp_uri' in env:
    if _parse_int(env.get('OMPI_COMM_WORLD_SIZE', 1), 'OMPI_COMM_WORLD_SIZE') > 1:
      return 'ompi'
  return None


def resolve_args(
    env: Mapping[str, str],
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int | str] | str | None = None,
    on_cloud_tpu: bool = False,
) -> dict[str, Any] | None:
  """Decides the `jax.distributed.initialize` keyword arguments; pure, so it is testable.

  Args:
    env: the environment variables (e.g. `os.environ`).
    coordinator_address, num_processes, process_id, local_device_ids: the flag values (None:
      unset; then the CJEPA_* variable of `env` is used).
    on_cloud_tpu: whether this process runs on a Cloud TPU VM.

  Returns:
    None for a single process (do nothing); else the keyword arguments for
    `jax.distributed.initialize`: the explicit values, or `{}` (all auto-detected by JAX) when a
    scheduler is detected (see `detect_cluster`). Partial explicit values are allowed only where a
    scheduler can fill the rest in.

  Raises:
    ValueError: malformed values, a process id outside [0, num_processes), or explicit values that
      are incomplete with no scheduler to complete them.
  """
  def pick(flag_value, env_name):
    if flag_value is not None:
      return flag_value
    value = env.get(env_name)
    return value if value not in (None, '') else None

  address = pick(coordinator_address, ENV_COORDINATOR_ADDRESS)
  count = pick(num_processes, ENV_NUM_PROCESSES)
  index = pick(process_id, ENV_PROCESS_ID)
  device_ids = pick(local_device_ids, ENV_LOCAL_DEVICE_IDS)

  kwargs: dict[str, Any] = {}
  if address is not None:
    host, sep, port = str(address).rpartition(':')
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f'coordinator_address={address!r} is not HOST:PORT (e.g. 10.0.0.1:1234); '
                       f'set --coordinator_address or {ENV_COORDINATOR_ADDRESS} to that form.')
    kwargs['coordinator_address'] = str(address)
  if count is not None:
    kwargs['num_processes'] = _parse_int(count, 'num_processes')
    if kwargs['num_processes'] < 1:
      raise ValueError(f'num_processes={count} must be >= 1.')
  if index is not None:
    kwargs['process_id'] = _parse_int(index, 'process_id')
  if device_ids is not None:
    if isinstance(device_ids, str):
      device_ids = [d for d in device_ids.split(',') if d.strip()]
    kwargs['local_device_ids'] = [_parse_int(d, 'local_device_ids') for d in device_ids]

  if 'num_processes' in kwargs and 'process_id' in kwargs:
    if not 0 <= kwargs['process_id'] < kwargs['num_processes']:
      raise ValueError(f'process_id={kwargs["process_id"]} is outside [0, num_processes='
                       f'{kwargs["num_processes"]}); number the processes 0..num_processes-1.')
  if kwargs.get('num_processes') == 1:
    return None  # Explicitly one process.

  cluster = detect_cluster(env, on_cloud_tpu)
  explicit = {'coordinator_address', 'num_processes', 'process_id'} & kwargs.keys()
  if cluster is not None:
    return kwargs  # JAX's detection fills whatever is unset.
  if not explicit:
    return None  # Nothing asks for several processes.
  missing = sorted({'coordinator_address', 'num_processes', 'process_id'} - explicit)
  if missing:
    raise ValueError(
        f'Several processes need coordinator_address, num_processes and process_id, but '
        f'{", ".join(missing)} {"is" if len(missing) == 1 else "are"} unset and no SLURM / Cloud '
        f'TPU / Open MPI environment was detected to fill {"it" if len(missing) == 1 else "them"} '
        f'in; pass --{" --".join(missing)} (or the CJEPA_* environment variables).')
  return kwargs


def _flag_values() -> dict[str, Any]:
  """The distributed flags' values, or all None when absl has not parsed the command line."""
  if not _FLAGS or not flags.FLAGS.is_parsed():
    return {}
  return {name: holder.value for name, holder in _FLAGS.items()}


def _running_on_cloud_tpu() -> bool:
  # Set by jax's import-time Cloud TPU set-up (PCI scan for TPU chips + libtpu); no backend start.
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def _client():
  """The coordination-service client (JAX has no public accessor), or None."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


class _ProcessPrefixFormatter(logging.PythonFormatter):
  """absl's formatter with `[process i/N] ` before every line, so interleaved logs stay readable."""

  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def format(self, record: py_logging.LogRecord) -> str:
    text = super().format(record)
    return '\n'.join(self._prefix + line for line in text.split('\n'))


def _prefix() -> str:
  return f'[process {jax.process_index()}/{jax.process_count()}] '


def initialize() -> None:
  """Connects the processes of a multi-process run; does nothing for a single process.

  Call it first thing in `main` (after absl parsed the flags, before any JAX call that touches
  devices: `jax.distributed.initialize` refuses to run after the backend started). Idempotent.
  It starts the backend itself (it logs the device counts), so set backend options (XLA_FLAGS,
  `jax_platforms`) before calling it.

  Raises:
    ValueError: from `resolve_args` for bad or incomplete flags / environment.
    RuntimeError: from JAX when the backend already started before a multi-process init.
  """
  global _initialized
  if _initialized:
    return
  on_tpu = _running_on_cloud_tpu()
  kwargs = resolve_args(os.environ, **_flag_values(), on_cloud_tpu=on_tpu)
  if kwargs is not None and not jax.distributed.is_initialized():
    cluster = detect_cluster(os.environ, on_tpu)
    logging.info('jax.distributed.initialize(%s)%s',
                 ', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items())),
                 f' (other values from {cluster})' if cluster else '')
    # CPU processes need a cross-process collectives backend. gloo ships with jaxlib and is
    # already jax 0.10.2's default; this only fills it in if the option was cleared ('mpi' stays).
    if not jax.config.jax_cpu_collectives_implementation:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**kwargs)
  _initialized = True

  if jax.process_count() > 1:
    logging.use_absl_handler()  # What app.run does; here too for callers outside app.run.
    logging.get_absl_handler().setFormatter(_ProcessPrefixFormatter(_prefix()))
    _start_watcher()
  logging.info('JAX process %d of %d; %d local / %d global devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


def is_main_process() -> bool:
  """True on process 0, the one that writes metrics, logs and TensorBoard files."""
  return jax.process_index() == 0


def _start_watcher() -> None:
  """Starts the thread that stops this process when another one reports a failure."""
  global _watcher
  client = _client()
  if client is None or _watcher is not None:
    return
  stop = threading.Event()

  def watch():
    while not stop.wait(_WATCH_INTERVAL_S):
      try:
        message = client.key_value_try_get(_ERROR_KEY)
      except Exception:  # pylint: disable=broad-except
        continue  # NOT_FOUND: nobody failed. Other errors: JAX's heartbeat check handles them.
      logging.error('stopping: %s', message)
      _flush()
      os._exit(1)  # pylint: disable=protected-access

  thread = threading.Thread(target=watch, name='cjepa-failure-watcher', daemon=True)
  thread.start()
  _watcher = (thread, stop)
  # Registered after jax's own atexit hook, so it runs first: the thread must be out of the
  # client's C++ code before JAX shuts the client down, or the interpreter aborts at exit.
  atexit.register(_stop_watcher)


def _stop_watcher() -> None:
  global _watcher
  if _watcher is not None:
    thread, stop = _watcher
    stop.set()
    thread.join()
    _watcher = None


def _flush() -> None:
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
  """On an exception in a multi-process run: log it, tell the other processes, exit with status 1.

  With a single process (or before `initialize()`), exceptions propagate unchanged. A
  `SystemExit(0)`, or one marked `coordinated` (every process exits with it, e.g. after a
  preemption save), passes through in every case.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    # A clean exit (0, or a coordinated one such as preemption's code 75 that every process
    # takes at the same step) is not a failure to broadcast.
    if isinstance(e, SystemExit) and (e.code in (None, 0) or getattr(e, 'coordinated', False)):
      raise
    client = _client() if jax.distributed.is_initialized() else None
    if client is None or jax.process_count() == 1:
      raise
    _stop_watcher()  # Our own watcher must not exit before the others had time to read the key.
    logging.error('failed:\n%s', traceback.format_exc().rstrip())
    summary = traceback.format_exception_only(type(e), e)[-1].strip()
    with contextlib.suppress(Exception):  # ALREADY_EXISTS: another process failed first.
      client.key_value_set(_ERROR_KEY, f'process {jax.process_index()} failed: {summary}')
    _flush()
    if jax.process_index() == 0:
      # Process 0 hosts the coordination service: stay up long enough for the others to read it.
      time.sleep(3 * _WATCH_INTERVAL_S)
    os._exit(1)  # pylint: disable=protected-access  # Skip the shutdown barrier.


def run_main(main: Callable[[Sequence[str]], Any]) -> None:
  """`app.run(main)` with `initialize()` before `main` and `fail_fast()` around it.

  Args:
    main: the absl main function, called with the remaining command-line arguments.
  """

  def wrapped(argv: Sequence[str]) -> Any:
    initialize()
    with fail_fast():
      return main(argv)

  define_flags()
  app.run(wrapped)

