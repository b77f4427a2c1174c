"""`AttentionSpec`: every option of one ring_attention call, normalised and checked once.

The custom operator (api.py) is derived from this class: its schema is q, k, v followed by
the spec's fields in order, each field's annotation giving its schema type (`schema_args`);
the op, its fake rule and its backward rebuild the spec from their arguments (`take`), and
the backward receives the same fields again (`op_args`), its tensors kept by autograd
(`TENSORS`). The arguments are named as ring_attention's keywords.

`from_options` turns what a caller passed into the schema's types, field by field (each
field's `normalise`), then runs the checks of the options alone (checks.option_problem).
A value the schema cannot carry becomes a problem and the field's default, so the call still
enters the op and its verdict words the problem on every rank alike; only a group that is not
a process group is raised at once, on this rank (there is no group to tell). The checks that
need the tensors, the groups or the world size run inside the op (api._check).

A new option: one field here (annotation, default, normaliser) and its check in checks.py.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, TypeVar, cast

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from . import checks
from .checks import Signature

if TYPE_CHECKING:
    from torch.distributed.distributed_c10d import GroupName

Tensor = torch.Tensor
T = TypeVar("T")

_NOT_A_MEMBER = ""  # the name a rank outside a group passes for it (torch's NON_GROUP_MEMBER)


# -- normalisers: what a caller passed -> (the schema's value, problem or None) ------------------

Normaliser = Callable[[object], tuple[object, Optional[str]]]
Problem = Callable[[object], Optional[str]]  # the worded problem with a value (checks.py)


def _flag(name: str) -> Callable[[object], tuple[Optional[bool], Optional[str]]]:
    def normalise(x: object) -> tuple[Optional[bool], Optional[str]]:
        try:
            return bool(x), None
        except (TypeError, ValueError, RuntimeError):
            return None, f"{name} must be True or False, got {x!r}"

    return normalise


def _real(name: str, problem: Problem) -> Callable[[object], tuple[Optional[float], Optional[str]]]:
    def normalise(x: object) -> tuple[Optional[float], Optional[str]]:
        if isinstance(x, Tensor) and x.numel() == 1 and not x.dtype.is_complex:
            x = x.item()  # a 1-element real tensor is read once
        if x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool)):
            return (None if x is None else float(x)), None
        return None, problem(x)

    return normalise


def _integer(problem: Problem) -> Callable[[object], tuple[Optional[int], Optional[str]]]:
    def normalise(x: object) -> tuple[Optional[int], Optional[str]]:
        if x is None or (isinstance(x, numbers.Integral) and not isinstance(x, bool)):
            return (None if x is None else int(x)), None
        return None, problem(x)

    return normalise


def _name(what: str, optional: bool = False) -> Callable[[object], tuple[Optional[str], Optional[str]]]:
    def normalise(x: object) -> tuple[Optional[str], Optional[str]]:
        if isinstance(x, str) or (optional and x is None):
            return x, None
        return None, f"{what} must be a name (str){' or None' if optional else ''}, got {x!r}"

    return normalise


def _bounds(x: object) -> tuple[Optional[list[int]], Optional[str]]:
    if x is None:
        return None, None
    bounds, problem = checks.parse_bounds(x)
    return (None if bounds is None else list(bounds)), problem  # bounds is None exactly with a problem


def _ids(name: str) -> Callable[[object], tuple[Optional[Tensor], Optional[str]]]:
    def normalise(x: object) -> tuple[Optional[Tensor], Optional[str]]:
        if x is None or isinstance(x, Tensor):
            return x, None
        try:  # a list or array of ids
            return torch.as_tensor(x), None
        except (TypeError, ValueError, RuntimeError):
            return None, f"{name} must be a 1-D integer tensor over the global sequence, got {type(x).__name__}"

    return normalise


# mask_mod functions cross into the op by name: "module.qualname#id" (the part before "#" is what the
# ranks compare). The registry keeps the latest MAX_MASK_MODS (a backward finds its forward's function).
MAX_MASK_MODS = 4096
_MASK_MODS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}


def _mask_mod(x: object) -> tuple[Optional[str], Optional[str]]:
    if x is None:
        return None, None
    if not callable(x):
        return None, f"mask_mod must be a function (query positions, key positions) -> bool tensor, got {x!r}"
    name = f"{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', type(x).__name__)}#{id(x):x}"
    if name not in _MASK_MODS:
        while len(_MASK_MODS) >= MAX_MASK_MODS:
            del _MASK_MODS[next(iter(_MASK_MODS))]
        _MASK_MODS[name] = cast(Callable[[Tensor, Tensor], Tensor], x)
    return name, None


def mask_mod_function(name: Optional[str]) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """The function a mask_mod argument names (None: none)."""
    return None if name is None else _MASK_MODS[name]


def mask_mod_identity(name: Optional[str]) -> Optional[str]:
    """What ranks compare of a mask_mod: its module and qualified name."""
    return None if name is None else name.split("#")[0]


def _sinks(x: object) -> tuple[Optional[Tensor], Optional[str]]:
    if x is None or isinstance(x, Tensor):
        return x, None
    return None, f"sinks must be a 1-D tensor of one logit per query head, got {type(x).__name__}"


def _group(what: str) -> Callable[[object], tuple[Optional[str], None]]:
    def normalise(group: object) -> tuple[Optional[str], None]:
        """Process groups cross into the op by name (a rank outside the group passes _NOT_A_MEMBER
        and the op's checks word it). Not a group at all: raised here, on this rank alone."""
        if group is None:
            return None, None
        if dist.is_available() and dist.is_initialized() and group is dist.GroupMember.NON_GROUP_MEMBER:
            return _NOT_A_MEMBER, None
        name = getattr(group, "group_name", None)
        if not isinstance(name, str):
            raise ValueError(
                f"ring_attention: {what} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
            )
        return name, None

    return normalise


def process_group(name: Optional[str]) -> Optional[ProcessGroup]:
    """The process group an op argument names (None: the default group)."""
    if name is None:
        return None
    if name == _NOT_A_MEMBER:
        # torch's stand-in for a group this rank is not in (an int), which dist's functions take as a group
        return cast(ProcessGroup, dist.GroupMember.NON_GROUP_MEMBER)
    from torch._C._distributed_c10d import _resolve_process_group  # distributed_c10d's, where it is defined

    return _resolve_process_group(cast("GroupName", name))


def _option(default: T, normalise: Normaliser) -> T:
    return field(default=default, metadata=dict(normalise=normalise))


# -- the spec ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """The options of one call, in the op's schema types (process groups by name)."""

    causal: bool = _option(False, _flag("causal"))
    softmax_scale: Optional[float] = _option(None, _real("softmax_scale", checks.scale_problem))
    layout: str = _option("zigzag", _name("layout"))
    group: Optional[str] = _option(None, _group("group"))
    backend: str = _option("auto", _name("backend"))
    cu_seqlens: Optional[list[int]] = _option(None, _bounds)
    document_ids: Optional[Tensor] = _option(None, _ids("document_ids"))
    window: Optional[int] = _option(None, _integer(checks.window_problem))
    window_right: Optional[int] = _option(None, _integer(checks.window_problem))
    chunk: Optional[int] = _option(None, _integer(checks.chunk_problem))
    group_ids: Optional[Tensor] = _option(None, _ids("group_ids"))
    mask_mod: Optional[str] = _option(None, _mask_mod)
    sinks: Optional[Tensor] = _option(None, _sinks)
    softcap: Optional[float] = _option(None, _real("softcap", checks.softcap_problem))
    ulysses_group: Optional[str] = _option(None, _group("ulysses_group"))
    mesh_group: Optional[str] = _option(None, _group("mesh_group"))
    transport: Optional[str] = _option(None, _name("transport", optional=True))

    @classmethod
    def from_options(cls, options: dict[str, object]) -> tuple[AttentionSpec, Optional[str]]:
        """(spec, the first problem or None) from ring_attention's keyword arguments."""
        window = options.get("window")
        if isinstance(window, (tuple, list)) and len(window) == 2 and "window_right" not in options:
            options = {**options, "window": window[0], "window_right": window[1]}  # (left, right)
        unknown = set(options) - set(NAMES)
        if unknown:
            raise TypeError(f"ring_attention got unexpected keyword arguments {sorted(unknown)}")
        values: dict[str, Any] = {}  # field -> its value, of the field's own type (its normaliser's)
        problems = []
        for name, default, normalise in _NORMALISERS:
            if name in options:
                value, problem = normalise(options[name])
                values[name] = default if problem else value
                problems.append(problem)
        spec = cls(**values)
        problem = next((p for p in problems if p), None)
        return spec, problem or checks.option_problem(spec)

    # -- the op's arguments --------------------------------------------------------------------
    @classmethod
    def take(cls, args: Sequence[Any]) -> tuple[AttentionSpec, tuple[Any, ...]]:
        """(the spec, the arguments after it) from an op's arguments that start with the spec's fields
        (each of the type the op's schema gives it, as torch checked)."""
        n = len(FIELDS)
        return cls(*args[:n]), tuple(args[n:])

    def op_args(self) -> tuple[object, ...]:
        """The fields in schema order: the op's arguments after q, k, v (after saved, backward)."""
        return tuple(getattr(self, n) for n in NAMES)

    def without_tensors(self) -> AttentionSpec:
        """The spec with its tensors taken out (autograd keeps those: save_for_backward)."""
        none: dict[str, Any] = {n: None for n in TENSORS}  # every tensor field is Optional[Tensor]
        return dataclasses.replace(self, **none)

    def with_tensors(self, tensors: Sequence[Optional[Tensor]]) -> AttentionSpec:
        kept: dict[str, Any] = dict(zip(TENSORS, tensors, strict=True))  # every tensor field is Optional[Tensor]
        return dataclasses.replace(self, **kept)

    # -- what every rank must pass alike ---------------------------------------------------------
    def signature(self, **resolved: object) -> Signature:
        """((name, value), ...) of every option the ranks must agree on, as the op resolved it
        (`resolved` overrides: the scale, the document bounds, the transport). Groups are checked
        as a ring or a mesh, and document_ids by the bounds they give (cu_seqlens), not here."""
        sig: list[tuple[str, object]] = []
        for n in NAMES:
            if n in _NOT_COMPARED:
                continue
            value = resolved[n] if n in resolved else getattr(self, n)
            sig.append((n, (value is not None) if n in TENSORS else value))
        return tuple(sig)


FIELDS = dataclasses.fields(AttentionSpec)
NAMES = tuple(f.name for f in FIELDS)
# (name, default, normaliser) per field, as plain tuples (torch.compile traces from_options, and
# refuses to read a field's metadata mapping)
_NORMALISERS: tuple[tuple[str, object, Normaliser], ...] = tuple(
    (f.name, f.default, f.metadata["normalise"]) for f in FIELDS
)
TENSORS = tuple(f.name for f in FIELDS if f.type == "Optional[Tensor]")
_NOT_COMPARED = ("group", "ulysses_group", "mesh_group", "document_ids")  # group_ids: compared as spans

# each field's annotation -> its type in the op's schema
_SCHEMA_TYPES = {
    "bool": "bool",
    "str": "str",
    "Optional[str]": "str?",
    "Optional[float]": "float?",
    "Optional[int]": "SymInt?",
    "Optional[list[int]]": "SymInt[]?",
    "Optional[Tensor]": "Tensor?",
}


def schema_args() -> str:
    """The spec's fields as schema arguments: "bool causal, float? softmax_scale, ..."."""
    unknown = [f.name for f in FIELDS if f.type not in _SCHEMA_TYPES]
    if unknown:
        raise TypeError(f"AttentionSpec fields {unknown} have no schema type; add theirs to _SCHEMA_TYPES")
    return ", ".join(f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in FIELDS)
