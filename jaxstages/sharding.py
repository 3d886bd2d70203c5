"""Device mesh, logical-axis sharding rules, and multi-process start-up.

Every parameter, cache and batch array names its dimensions with *logical* axes (`"embed"`, `"heads"`, `"batch"`,
...). A rule table maps each logical axis to zero or more *mesh* axes of a 3-axis mesh `(data, fsdp, tensor)`:

- `data`: pure data parallelism (params replicated);
- `fsdp`: data parallelism with params, gradients and optimizer state sharded (ZeRO-3 style);
- `tensor`: heads, MLP and vocab split across devices (Megatron style).

Rules are data (a tuple of `(logical, mesh_axes)` pairs in the config), so changing how a model is laid out never
touches model code. A dimension that a rule would shard but that its mesh axes do not divide (e.g. 2 KV heads on a
4-way `tensor` axis) is replicated on that dimension instead; parameters keep working on any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxstages.config import ConfigError, from_config

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned layers (ModelConfig.scan_layers)
    # activations, batches and caches
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("cache_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; `-1` in one axis takes all devices the others leave (e.g. `data=-1` is plain data parallel)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: LogicalRules = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple((str(k), _as_mesh_axes(v)) for k, v in self.rules))
    for logical, axes in self.rules:
      for axis in axes or ():
        if axis not in MESH_AXES:
          raise ConfigError(f"sharding rule {logical!r} -> {axis!r}: {axis!r} is not a mesh axis {MESH_AXES}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | None = None, **overrides) -> "MeshConfig":
    return from_config(cls, config, where="mesh config", **overrides)


def _as_mesh_axes(v) -> tuple[str, ...] | None:
  if v is None:
    return None
  if isinstance(v, str):
    return (v,)
  return tuple(v)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  shape = [cfg.data, cfg.fsdp, cfg.tensor]
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
                      f"{num_devices} are available ({jax.process_count()} process(es)); make data*fsdp*tensor equal "
                      "the device count or set one axis to -1")
  return tuple(shape)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over `devices` (default: all devices of all processes).

  Axes are `AxisType.Auto`: XLA's partitioner propagates shardings through the model from the parameter, batch and
  activation constraints we give it, which is what the logical rules are written for.
  """
  cfg = cfg or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                    rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec` on `mesh`.

  Mesh axes of size 1 are dropped; with `shape` given, a dimension its mesh axes do not divide is replicated, and a
  mesh axis is never used twice in one spec.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    if name is not None and name not in table:
      raise ConfigError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    axes = [a for a in (_as_mesh_axes(table.get(name)) or ()) if mesh.shape[a] > 1 and a not in used]
    if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
      axes = []
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> nnx.State:
  """A tree like `state` holding a `NamedSharding` for each variable, from its `logical_axes` metadata."""

  def one(v: nnx.Variable):
    axes = v.get_metadata().get("logical_axes")
    if axes is None:
      raise ConfigError(f"variable of shape {v.shape} has no logical_axes metadata")
    return v.replace(NamedSharding(mesh, logical_to_spec(axes, v.shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _is_axis_names(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_shardings(logical_axes, arrays, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
  """`NamedSharding`s for a tree of arrays (or shape structs) from a matching tree of logical-axis-name tuples, e.g.
  `logical_shardings(KVCache.logical_axes(cfg), cache, mesh)`."""
  return jax.tree.map(lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
                      logical_axes, arrays, is_leaf=_is_axis_names)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Sharding of a `[batch, ...]` array: batch over the data axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh, rules))


def data_parallel_size(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
  axes = logical_to_spec(("batch",), None, mesh, rules)[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_divisible(batch_size: int, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> None:
  n = data_parallel_size(mesh, rules)
  if batch_size % n:
    raise ConfigError(f"global batch size {batch_size} is not divisible by the {n} data-parallel shards of mesh "
                      f"{dict(mesh.shape)}; use a batch size that is a multiple of {n}")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
  """Places a host batch (the *global* batch, identical on every process) on the mesh, batch-sharded. Each process
  copies only the rows its devices hold (`make_array_from_callback`), so this works on several processes too."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    check_batch_divisible(v.shape[0], mesh, rules)
    out[k] = jax.make_array_from_callback(v.shape, batch_sharding(mesh, rules, v.ndim), lambda index, v=v: v[index])
  return out


def global_batch_from_process_local(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                                    rules: LogicalRules = DEFAULT_RULES) -> dict:
  """Assembles a global batch from each process's own rows (`[local_batch, ...]` per process: the rows
  `process_rows` names, e.g. process `p` of `P` holds rows `[p * B / P, (p + 1) * B / P)` of a data-parallel mesh)."""
  out = {}
  for k, v in local_batch.items():
    check_batch_divisible(v.shape[0] * jax.process_count(), mesh, rules)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
  return out


def process_rows(rows: int, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> slice:
  """The rows of a `[rows, ...]` batch-sharded global array that this process's devices hold: a contiguous range
  (every row on one process: `slice(0, rows)`). What a process samples, decodes and verifies of a global batch."""
  check_batch_divisible(rows, mesh, rules)
  starts = sorted({(index[0].start or 0, index[0].stop if index[0].stop is not None else rows)
                   for index in batch_sharding(mesh, rules, 1).addressable_devices_indices_map((rows,)).values()})
  if any(a[1] != b[0] for a, b in zip(starts, starts[1:])):
    raise ConfigError(f"the batch rows of this process's devices on mesh {dict(mesh.shape)} are not contiguous "
                      f"({starts}); order the mesh's devices by process")
  return slice(starts[0][0], starts[-1][1])


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded over its first dimension (the batch), as numpy, in order: each
  process reads only its own shards (on one process: the whole array). The inverse of
  `global_batch_from_process_local`."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.array(x)  # a copy the caller may write to, as the concatenation below is
  shards = {}
  for shard in x.addressable_shards:  # replicas over the non-batch mesh axes hold the same rows: keep one
    shards.setdefault(shard.index[0].start or 0, shard)
  starts = sorted(shards)
  parts = [np.asarray(shards[s].data) for s in starts]
  if any(s + len(p) != t for s, p, t in zip(starts, parts, starts[1:])):
    raise ValueError(f"this process's rows of an array of shape {x.shape} are not contiguous (shards at {starts})")
  return np.concatenate(parts)


def replicate_to_host(tree, mesh: Mesh):
  """Every element of a tree of (small) global arrays, as numpy on every process: a jitted all-gather to a
  replicated layout, then a local read. For per-example statistics and flags, never for whole batches."""
  return jax.tree.map(np.asarray, _replicator(mesh)(tree))


@functools.lru_cache(maxsize=16)
def _replicator(mesh: Mesh):
  return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))


# -- activation constraints -------------------------------------------------------------------------------------

_ACTIVE_RULES: contextvars.ContextVar[LogicalRules | None] = contextvars.ContextVar("jaxstages_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
  """Makes `mesh` and `rules` current, so model code's `constrain` calls take effect while tracing."""
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `use_mesh` (single-device code stays plain)."""
  rules = _ACTIVE_RULES.get()
  if rules is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, rules))


def active_spec(logical_axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
  """The `PartitionSpec` of an array of `shape` under the current `use_mesh` (None outside one): for code that runs
  per shard (`jax.shard_map` around a kernel XLA cannot partition)."""
  rules = _ACTIVE_RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return None
  return logical_to_spec(logical_axes, shape, mesh, rules)


# -- multi-process -----------------------------------------------------------------------------------------------

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
                           initialization_timeout: int | None = None, heartbeat_timeout_seconds: int | None = None,
                           shutdown_timeout_seconds: int | None = None) -> None:
  """Starts `jax.distributed` when running on several processes; does nothing for a single process.

  On TPU pod slices and SLURM/Open MPI GPU clusters JAX discovers every argument itself, so each host simply runs
  the same command. Elsewhere pass the coordinator, or set `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`.

  The three timeouts (seconds) bound how long a run can wait on a host that is gone. Each falls back to an
  environment variable, then to JAX's own default; every process should use the same values.

  - `initialization_timeout` (`JAXSTAGES_INIT_TIMEOUT_SECONDS`, JAX default 300): how long start-up waits for every
    process to reach the coordination service (hosted by process 0); a host that never comes up makes the others
    fail after this long.
  - `heartbeat_timeout_seconds` (`JAXSTAGES_HEARTBEAT_TIMEOUT_SECONDS`, JAX default 100): how long a process may go
    without a heartbeat before it counts as dead. This is what stops the survivors when a host dies: a collective
    waiting on a dead peer (gloo on CPU) does not fail by itself, but the coordination service then aborts every
    remaining process (SIGABRT, "Terminating process because the JAX distributed service detected fatal errors.
    This most likely indicates that another task died") about this long after the death. When process 0 (the
    service) dies and its connections close, the others abort at once instead; a host that vanishes without closing
    them (power loss, a network cut) is noticed after this timeout, whichever process was on it.
  - `shutdown_timeout_seconds` (`JAXSTAGES_SHUTDOWN_TIMEOUT_SECONDS`, JAX default 300): how long a process that
    exits (or calls `jax.distributed.shutdown()`) waits for all the others to exit too; past it, every process
    aborts. This, not the heartbeat, bounds the wait when one process fails with a Python exception while the
    others sit in a collective: the failed process is still alive (heartbeating) while it waits to exit.

  On a preemptible pod: a heartbeat timeout of 30-60 s stops the survivors of a preempted host sooner, so the
  scheduler can restart the job from its last checkpoint; much lower risks declaring a briefly stalled host (an
  overloaded machine, a network blip) dead. Raise the initialization timeout to cover how long a replacement host
  takes to start. A shorter shutdown timeout (a minute or two) frees the other hosts sooner after one fails; it must
  still cover the work one process does alone at the end of a run (process 0 writes the summaries and report).
  """
  if jax.distributed.is_initialized():  # a command that starts it before running stages (`jaxstages run`)
    return
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  on_cluster = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
  if coordinator_address is None and not on_cluster:
    return
  if num_processes == 1:
    return
  timeouts = {}  # only those given, so that JAX's own defaults apply to the rest
  given = {"initialization_timeout": (initialization_timeout, "JAXSTAGES_INIT_TIMEOUT_SECONDS"),
           "heartbeat_timeout_seconds": (heartbeat_timeout_seconds, "JAXSTAGES_HEARTBEAT_TIMEOUT_SECONDS"),
           "shutdown_timeout_seconds": (shutdown_timeout_seconds, "JAXSTAGES_SHUTDOWN_TIMEOUT_SECONDS")}
  for name, (value, env) in given.items():
    if value is None and os.environ.get(env):
      try:
        value = int(os.environ[env])
      except ValueError:
        raise ConfigError(f"{env}={os.environ[env]!r}: expected a whole number of seconds") from None
    if value is not None:
      if value <= 0:
        raise ConfigError(f"{name}={value}: a timeout must be a positive number of seconds")
      timeouts[name] = value
  use_cpu_collectives()
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids, **timeouts)


def sync_processes(name: str) -> None:
  """Waits until every process has reached the same `name`d point (nothing on one process): e.g. all have read a
  folder before one of them writes into it."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def use_cpu_collectives() -> None:
  """Gloo for cross-process collectives of CPU arrays, unless another implementation (MPI) is chosen: without one, a
  computation over CPU devices of several processes fails. Set before `jax.distributed.initialize`; it touches only
  the CPU backend, so it is harmless where the arrays live on accelerators."""
  if jax.config.jax_cpu_collectives_implementation not in ("gloo", "mpi", "megascale"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def optimizer_shardings(optimizer, params, params_sharding, mesh: Mesh):
  """Shardings of `optimizer.init(params)`: every per-parameter slot (Adam's moments, ...) sharded exactly like its
  parameter, everything else (step counts, scalars) replicated. `params` may be abstract (`jax.eval_shape`)."""
  abstract_state = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_state, params_sharding,
                               transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
