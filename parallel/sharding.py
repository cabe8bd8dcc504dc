"""Logical-axis sharding rules: logical names (batch, seq, embed, heads, ...) -> mesh axes -> NamedSharding.

Rules format (the `sharding_rules` config field): a sequence of `(logical_name, mesh_axes)` pairs, where
mesh_axes is None (replicated), one mesh axis name, or a tuple of mesh axis names (the dimension is split over
their product, in that order). Each logical name appears at most once. The field may also be a string: a
preset name of RULE_PRESETS, or the literal of such a table (ml_collections cannot override a tuple of pairs
from the command line, but it can override a string).

Resolving one array's logical axes to a PartitionSpec:
- a logical name with no rule is an error (a typo in a rules table must not silently replicate);
- mesh axes of size 1 (or absent from the mesh) are dropped, so one table serves every mesh: DEFAULT_RULES
  gives data parallel on a (data N) mesh, FSDP on (fsdp N), Megatron tensor parallel on (tensor N), and any
  combination, with the mesh config as the only change;
- a mesh axis already used by an earlier dimension of the same array is dropped for later ones;
- a dimension not divisible by the product of its mesh axes raises ParallelConfigError naming the array and
  the logical axis (never a silent uneven split).

`parallel` does not import jaxinfer; NNX variables are recognised by their `get_metadata()` method, whose
`logical_axes` entry holds the names (jaxinfer.models.layers puts them there). flax is imported only by
`create_sharded_module`.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from parallel.mesh import MESH_AXES, ParallelConfigError

__all__ = ["DEFAULT_RULES", "RULE_PRESETS", "rules_preset", "normalize_rules", "logical_to_spec",
           "logical_sharding", "state_partition_specs", "state_shardings", "create_sharded_module",
           "with_logical_constraint"]

Rules = Sequence[tuple[str, Any]]

# One table for every strategy: the mesh sizes decide which of these axes actually split anything.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # activations: data parallel over data and fsdp
    ("seq", "sequence"),  # activations: sequence parallel (ring attention)
    ("embed", "fsdp"),  # parameters: FSDP / ZeRO-3 shards the model dimension
    ("heads", "tensor"),  # Megatron: attention column/row parallel by heads
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),  # Megatron: MLP column (gate/up) / row (down) parallel
    ("vocab", "tensor"),  # embedding table and lm_head split over the vocabulary
    ("norm", None),
    ("head_dim", None),
    ("expert", "expert"),
    ("layers", "stage"),
)

_PARAM_NAMES = ("embed", "heads", "kv_heads", "mlp", "vocab", "norm", "head_dim", "expert", "layers")


def _with(overrides: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  base = {name: None for name in _PARAM_NAMES} | {"batch": None, "seq": None}
  base.update(overrides)
  return tuple(base.items())


# Single-strategy tables: everything not named is replicated. Use with a mesh that has the named axes.
RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "default": DEFAULT_RULES,
    "data": _with({"batch": "data"}),  # pure data parallel: parameters replicated
    "fsdp": _with({"batch": ("data", "fsdp"), "embed": "fsdp"}),  # ZeRO-3
    "tensor": _with({"batch": "data", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
                     "vocab": "tensor"}),  # Megatron-LM
    "sequence": _with({"batch": ("data", "fsdp"), "seq": "sequence", "embed": "fsdp"}),  # ring attention + FSDP
}


def rules_preset(name: str) -> tuple[tuple[str, Any], ...]:
  if name not in RULE_PRESETS:
    raise ParallelConfigError(f"sharding_rules: unknown preset {name!r}; presets: {', '.join(RULE_PRESETS)}")
  return RULE_PRESETS[name]


def _axes_tuple(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def normalize_rules(rules: Rules | Mapping[str, Any] | str, field: str = "sharding_rules"
                    ) -> dict[str, tuple[str, ...]]:
  """{logical name: tuple of mesh axes}; a malformed entry raises ParallelConfigError naming `field[i]`.

  `rules` is a sequence of (logical, mesh axes) pairs, a mapping, or a string: the name of a RULE_PRESETS
  entry or the Python literal of a pairs table (so that `--config.sharding_rules=fsdp` works on the
  command line).
  """
  if isinstance(rules, str):
    if rules in RULE_PRESETS:
      rules = RULE_PRESETS[rules]
    else:
      try:
        rules = ast.literal_eval(rules)
      except (ValueError, SyntaxError):
        raise ParallelConfigError(f"{field}: {rules!r} is neither a preset ({', '.join(RULE_PRESETS)}) nor a "
                                  f"table of (logical, mesh axes) pairs") from None
      if isinstance(rules, str) or not isinstance(rules, (tuple, list, dict)):
        raise ParallelConfigError(f"{field}: expected (logical, mesh axes) pairs, got {rules!r}")
  if isinstance(rules, Mapping):
    rules = list(rules.items())
  out: dict[str, tuple[str, ...]] = {}
  for i, entry in enumerate(rules):
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
      raise ParallelConfigError(f"{field}[{i}]: expected a (logical_name, mesh_axes) pair, got {entry!r}")
    name, axes = entry
    if name in out:
      raise ParallelConfigError(f"{field}[{i}]: logical axis {name!r} appears twice")
    if axes is not None and not isinstance(axes, str) and not (
        isinstance(axes, (tuple, list)) and all(isinstance(a, str) for a in axes)):
      raise ParallelConfigError(f"{field}[{i}]: mesh axes of {name!r} must be None, a name or a tuple of names, "
                                f"got {axes!r}")
    axes = _axes_tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ParallelConfigError(f"{field}[{i}]: {name!r} -> unknown mesh axis {bad[0]!r}; mesh axes are "
                                f"{', '.join(MESH_AXES)}")
    out[name] = axes
  return out


def _table(rules) -> dict[str, tuple[str, ...]]:
  if isinstance(rules, dict) and all(isinstance(v, tuple) for v in rules.values()):
    return rules  # already normalised
  return normalize_rules(rules)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules | Mapping[str, Any], mesh: Mesh,
                    shape: Sequence[int] | None = None, name: str = "array") -> P:
  """PartitionSpec for one array; `shape` enables the divisibility check (error names `name`)."""
  table = _table(rules)
  if shape is not None and len(shape) != len(logical_axes):
    raise ParallelConfigError(f"{name}: {len(logical_axes)} logical axes {tuple(logical_axes)} for an array of "
                              f"shape {tuple(shape)}")
  used: set[str] = set()
  entries = []
  for dim, logical in enumerate(logical_axes):
    if logical is None:
      entries.append(None)
      continue
    if logical not in table:
      raise ParallelConfigError(f"sharding_rules: no rule for logical axis {logical!r} (of {name}); "
                                f"rules cover {', '.join(sorted(table))}")
    axes = tuple(a for a in table[logical] if mesh.shape.get(a, 1) > 1 and a not in used)
    if shape is not None and axes:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[dim] % size:
        raise ParallelConfigError(
            f"sharding_rules: {name} dimension {dim} ({logical!r}, size {shape[dim]}) is not divisible by mesh "
            f"axes {axes} of total size {size}; change the rule for {logical!r} or the mesh")
    used.update(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def logical_sharding(logical_axes, rules, mesh: Mesh, shape=None, name: str = "array") -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape, name))


def with_logical_constraint(x, logical_axes, rules, mesh: Mesh):
  """jax.lax.with_sharding_constraint by logical names (for use inside jit)."""
  return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, rules, mesh, x.shape))


def _is_variable(x) -> bool:
  return hasattr(x, "get_metadata") and hasattr(x, "get_value")


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def state_partition_specs(state, rules, mesh: Mesh):
  """The PartitionSpec of every array in an NNX state (abstract or concrete): a tree of the state's structure.

  Variables without `logical_axes` metadata (and plain array leaves) are replicated.
  """
  table = _table(rules)
  variables, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  specs = []
  for path, leaf in variables:
    if _is_variable(leaf):
      axes = leaf.get_metadata().get("logical_axes")
      value = leaf.get_value()
      count = len(jax.tree_util.tree_leaves(leaf))
    else:
      axes, value, count = None, leaf, 1
    shape = getattr(value, "shape", None)
    spec = P() if axes is None or shape is None else logical_to_spec(axes, table, mesh, shape,
                                                                     name=_path_name(path))
    specs.extend([spec] * count)
  assert len(specs) == len(leaves), "state flattening disagrees with its variables"
  return jax.tree_util.tree_unflatten(treedef, specs)


def state_shardings(state, rules, mesh: Mesh):
  """NamedSharding for every array of an NNX state, from its variables' logical axes (same tree structure)."""
  specs = state_partition_specs(state, rules, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def create_sharded_module(constructor: Callable[[], Any], mesh: Mesh, rules):
  """Builds the NNX module `constructor()` returns with every parameter created directly in its sharding.

  The module is first traced abstractly (nnx.eval_shape: shapes only, no memory), the shardings come from the
  logical axes, then one jitted call with those out_shardings runs the initialisers, so each device only
  ever materialises its own shard. Returns (module, shardings) where shardings has the state's structure.
  """
  from flax import nnx

  abstract = nnx.eval_shape(constructor)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, rules, mesh)

  def init():
    return nnx.split(constructor())[1]

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state), shardings
