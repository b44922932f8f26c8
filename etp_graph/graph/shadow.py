"""The shadow run: which channels meet where, read from what the forward computes.

A second forward of the model (no grad, eval mode) in which the output of every layer with
channel slices (Linear, Hugging Face Conv1D, Embedding, convolutions) carries a *shadow*: an
int64 tensor of the same shape holding, at each position, a global id of the channel there
(``-1``: none). Then, per torch function called:

* structural ops (views, reshapes, permutes, splits, chunks, unbinds, indexing, cats, expands,
  repeats) are applied to the shadows exactly as to the tensors, so a shadow always says which
  channel sits where, through any head split, fused q/k/v or grouped-query expansion;
* element-wise ops pass the shadow on; where two shadows meet at one position (rotary
  embeddings add ``q·cos`` and ``rotate_half(q)·sin``; T5 adds its per-head bias table to the
  scores) the pair is recorded as *mixed*;
* matrix products (``matmul``, ``bmm``, ``baddbmm``, ``scaled_dot_product_attention``, and a
  two-operand ``einsum`` read as the batched product it is) record
  the channels they contract against each other (q dim ``j`` with k dim ``j``), the channels of
  each batch slice (one head), and hand the right operand's column channels on (``P·v``);
* the shadow reaching a layer's input is recorded (the output projection's columns).

Modules with a handler run unobserved inside (their own ops are theirs), and the int attributes
that modules without a handler read during their forward are recorded (the attention's head
bookkeeping: ``num_heads``, ``head_dim``, ``split_size``, …). Nothing of the model is changed.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from ..handlers import get_handler
from .inputs import eval_mode, forward

__all__ = ["Shadows", "shadow_run"]

#: ops applied to the shadow as to the tensor
STRUCTURAL = frozenset("""
__getitem__ cat chunk concat concatenate contiguous clone expand expand_as flatten flip movedim
narrow permute repeat repeat_interleave reshape reshape_as roll select split split_with_sizes
squeeze stack swapaxes swapdims t tensor_split tile transpose unbind unflatten unsqueeze view
view_as index_select
""".split())
#: ops that change dtype or device only: the shadow is unchanged
CONVERSIONS = frozenset("to type float half double bfloat16 cpu cuda detach type_as requires_grad_".split())
#: ops whose output holds new values of the input's shape, not its channels
FRESH = frozenset("new_zeros new_ones new_empty new_full new_tensor __setitem__".split())
#: matrix products between activations
PRODUCTS = frozenset("matmul __matmul__ bmm baddbmm scaled_dot_product_attention".split())


@dataclasses.dataclass
class Source:
    """A layer whose output channels carry ids ``base … base + size - 1``; or (``module`` None)
    a free tensor (a parameter or buffer of a module without a handler: a per-head bias table, a
    per-head scale) whose every element carries its own id, ``owner.attr``, of shape ``shape``."""

    name: str
    module: Optional[nn.Module]
    base: int
    size: int
    channel_dim: int   # of its output
    shape: Tuple[int, ...] = ()


@dataclasses.dataclass
class Product:
    """One matrix product that shadowed tensors reach."""

    host: Optional[str]                 # the innermost module (without a handler) running it
    coords: Dict[int, int] = dataclasses.field(default_factory=dict)   # id → place inside its head
    slices: List[torch.Tensor] = dataclasses.field(default_factory=list)   # per batch slice (a head), its ids
    ids: Set[int] = dataclasses.field(default_factory=set)
    left: Set[int] = dataclasses.field(default_factory=set)    # ids of each operand
    #: ``scaled_dot_product_attention`` without ``scale``: its 1/√d follows the head size
    default_scale: bool = False
    right: Set[int] = dataclasses.field(default_factory=set)
    #: the left operand's rows and the right one's columns as 2-D id tensors (read by ``rows``
    #: and ``cols`` when asked: most traces never need them)
    row_ids: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)
    col_ids: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def rows(self) -> List[torch.Tensor]:
        """The distinct id sets along the contraction, in order of first appearance: each row of
        the left operand (in ``q·kᵀ``: one query head)."""
        return _distinct(self.row_ids) if self.row_ids is not None else []

    @functools.cached_property
    def cols(self) -> List[torch.Tensor]:
        """The same for each column of the right operand (in ``q·kᵀ``: one key head)."""
        return _distinct(self.col_ids) if self.col_ids is not None else []


@dataclasses.dataclass
class Shadows:
    """What the shadow run saw."""

    sources: List[Source]
    products: List[Product]
    mixed: List[torch.Tensor]                        # [2, K] id pairs meeting element-wise
    inputs: Dict[str, torch.Tensor]                  # layer → id per input channel (-1: none)
    reads: Dict[str, Dict[str, int]]                 # module → int attributes its forward read


#: free tensors larger than this carry no ids (a per-head table is small; ids cost 8 bytes each)
FREE_LIMIT = 1 << 22
#: pairs of ids are sorted as one int64 key ``a·KEY + b`` (ids stay below it)
KEY = 1 << 31


def _pairs(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """Unique ``[2, K]`` pairs of differing valid ids at equal positions."""
    a, b = torch.broadcast_tensors(a, b)
    for d in range(a.dim()):   # a dim along which both repeat one slice (the tokens) adds no pair
        if a.shape[d] > 1 and bool((a == a.narrow(d, 0, 1)).all()) and bool((b == b.narrow(d, 0, 1)).all()):
            a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
    keep = (a >= 0) & (b >= 0) & (a != b)
    if not keep.any():
        return None
    key = (a[keep] * KEY + b[keep]).unique()   # a 1-D unique: far cheaper than unique(dim=1)
    return torch.stack([key // KEY, key % KEY])


def _mix_pairs(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """Pairs of ids meeting element-wise, without linking across a broadcast: where one operand
    has size 1 along a dim on which the other's channels differ (a mask shared by every head),
    nothing is tied; where the other is the same along it (the batch), index 0 stands for all."""
    rank = max(a.dim(), b.dim())
    a = a.reshape((1,) * (rank - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (rank - b.dim()) + tuple(b.shape))
    for d in range(rank):
        if a.shape[d] == 1 or b.shape[d] == 1:
            wide = b if a.shape[d] == 1 else a
            if (wide != wide.narrow(d, 0, 1)).any():
                return None   # one element meets several channels: shared, not tied to one
            a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
    return _pairs(a, b)


def _place(coords: Dict[int, int], ids: torch.Tensor) -> None:
    """Every id at position ``j`` of the last dim of ``ids`` gets coordinate ``j`` (the smallest
    such ``j``; an id placed before keeps its place)."""
    flat = ids.reshape(-1, ids.shape[-1])
    keep = flat >= 0
    if not keep.any():
        return
    col = torch.arange(flat.shape[-1]).expand_as(flat)[keep]
    found, inverse = flat[keep].unique(return_inverse=True)
    first = torch.full_like(found, flat.shape[-1]).scatter_reduce(0, inverse, col, "amin")
    for g, j in zip(found.tolist(), first.tolist()):
        coords.setdefault(g, j)


def _distinct(flat: torch.Tensor) -> List[torch.Tensor]:
    """The distinct rows of a 2-D id tensor (its ``-1`` entries dropped), in order of first
    appearance."""
    if not len(flat):
        return []
    found, inverse = flat.unique(dim=0, return_inverse=True)
    first = torch.full((len(found),), len(flat), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(flat)), "amin")
    found = found[first.argsort()]
    found = found[(found >= 0).any(1)]
    return [r[r >= 0] for r in found] if bool((found < 0).any()) else list(found)


def _squeeze_repeats(s: torch.Tensor) -> torch.Tensor:
    """``s`` narrowed to one row along each of its last two dims that repeats one row (a
    token dim: every position holds the same channels), so a head's ids are cheap to collect."""
    for d in (-2, -1):
        if s.shape[d] > 1 and bool((s == s.narrow(d, 0, 1)).all()):
            s = s.narrow(d, 0, 1)
    return s


_FLAT = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


def _leaves(x: Any) -> List[Any]:
    """``pytree.tree_leaves(x)``, without its cost for the usual call of an op: a tensor, or
    positional arguments of tensors and numbers with few keyword arguments."""
    if isinstance(x, torch.Tensor):
        return [x]
    if type(x) is tuple and len(x) == 2 and type(x[0]) is tuple and type(x[1]) is dict:
        args, kwargs = x
        if all(isinstance(a, _FLAT) for a in args) and all(isinstance(v, _FLAT) for v in kwargs.values()):
            return [*args, *kwargs.values()]
    return pytree.tree_leaves(x)


class _Mode(TorchFunctionMode):
    def __init__(self, run: "_Run"):
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.run.hidden == 0:
            try:
                self.run.step(func, args, kwargs, out)
            except Exception:   # an op the run cannot follow: its output carries no shadow
                pass
        return out


class _Run:
    def __init__(self):
        self.shadow: Dict[int, Tuple[Any, torch.Tensor]] = {}   # id(tensor) → (weak ref, shadow)
        self.hidden = 0          # > 0 inside a module with a handler
        self.stack: List[str] = []
        self.products: List[Product] = []
        self.mixed: List[torch.Tensor] = []

    # ------------------------------------------------------------------------ bookkeeping
    def get(self, t) -> Optional[torch.Tensor]:
        if isinstance(t, torch.Tensor):
            hit = self.shadow.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
        return None

    def put(self, t: torch.Tensor, s: torch.Tensor) -> None:
        """Shadow ``t`` with ``s`` while ``t`` lives (a weak reference: the run keeps no
        activation alive, and a shadow goes with its tensor)."""
        if isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor) and s.shape == t.shape:
            key = id(t)

            def gone(ref, key=key, table=self.shadow):
                if table.get(key, (None,))[0] is ref:
                    del table[key]
            self.shadow[key] = (weakref.ref(t, gone), s)

    # ------------------------------------------------------------------------------ rules
    def step(self, func, args, kwargs, out) -> None:
        leaves = _leaves((args, kwargs))
        shadows = [self.get(t) for t in leaves]
        name = getattr(func, "__name__", "")
        if all(s is None for s in shadows) or name in FRESH or name.endswith("_like") or not any(
                isinstance(t, torch.Tensor) for t in _leaves(out)):
            return   # sizes, dtypes, fresh tensors: nothing flows
        if name in CONVERSIONS:
            self.put(out, shadows[0] if shadows[0] is not None else next(s for s in shadows if s is not None))
        elif name in STRUCTURAL:
            self._structural(func, args, kwargs, out)
        elif name in PRODUCTS:
            self._product(name, args, kwargs, out)
        elif name == "einsum":
            self._einsum(args, out)
        elif isinstance(out, torch.Tensor) and out.is_floating_point() and self._elementwise(leaves, out):
            self._merge(leaves, shadows, out)
        # any other op (a reduction, a three-operand einsum, a comparison) hands no shadow on

    def _structural(self, func, args, kwargs, out) -> None:
        def swap(t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return t
            s = self.get(t)
            return s if s is not None else torch.full(t.shape, -1, dtype=torch.long)
        sargs, skw = pytree.tree_map(swap, (args, kwargs))
        sout = func(*sargs, **skw)
        for t, s in zip(pytree.tree_leaves(out), pytree.tree_leaves(sout)):
            if isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor) and (s >= 0).any():
                self.put(t, s)

    @staticmethod
    def _elementwise(leaves, out) -> bool:
        shapes = [t.shape for t in leaves if isinstance(t, torch.Tensor)]
        try:
            return torch.broadcast_shapes(*shapes) == out.shape
        except RuntimeError:
            return False

    def _merge(self, leaves, shadows, out) -> None:
        present = [s for s in shadows if s is not None]
        first = present[0].expand(out.shape)
        for i, other in enumerate(present[1:], 1):
            for earlier in present[:i]:
                p = _mix_pairs(earlier, other)
                if p is not None:
                    self.mixed.append(p)
            first = torch.where(first >= 0, first, other.expand(out.shape))
        self.put(out, first.clone())

    def _product(self, name, args, kwargs, out) -> None:
        if name == "scaled_dot_product_attention":
            q, k, v = (kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(("query", "key", "value")))
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self._sdpa(q, k, v, mask, kwargs.get("enable_gqa", False), out)
            if kwargs.get("scale", args[6] if len(args) > 6 else None) is None:
                for p in self.products[-2:]:
                    p.default_scale = True
            return
        if name == "baddbmm":
            # (self, batch1, batch2) by position or by name (BLOOM: ``alibi.baddbmm(batch1=q, batch2=k)``)
            a, b = (kwargs[n] if n in kwargs else args[i] for i, n in ((1, "batch1"), (2, "batch2")))
        else:
            a, b = args[0], args[1]
        self._matmul(a, b, out)

    def _record(self, sa, sb, out) -> None:
        """The product of ``sa`` (..., n, k) and ``sb`` (..., k, m) (either may be None); ``out``:
        ``(output tensor, its shadow)`` or None."""
        prod = Product(self.stack[-1] if self.stack else None)
        batch = torch.broadcast_shapes(*(s.shape[:-2] for s in (sa, sb) if s is not None))
        sa, sb = (_squeeze_repeats(s) if s is not None else None for s in (sa, sb))
        # an id's place inside its head: along the contraction (q and k), else along the columns (v)
        if sa is not None:
            _place(prod.coords, sa[..., 0, :].expand(*batch, sa.shape[-1]))
        if sb is not None:
            b0 = sb.expand(*batch, *sb.shape[-2:])
            _place(prod.coords, b0[..., :, 0])
            _place(prod.coords, b0[..., 0, :])
        for s, ids in ((sa, prod.left), (sb, prod.right)):
            if s is not None:
                ids.update(s[s >= 0].unique().tolist())
        if sa is not None:
            prod.row_ids = sa.reshape(-1, sa.shape[-1])
        if sb is not None:
            prod.col_ids = sb.transpose(-1, -2).reshape(-1, sb.shape[-2])
        parts = [s.expand(*batch, -1, -1).reshape(batch.numel(), -1) for s in (sa, sb) if s is not None]
        for row in torch.cat(parts, dim=1):
            ids = row[row >= 0].unique()
            if len(ids):
                prod.slices.append(ids)
                prod.ids.update(ids.tolist())
        self.products.append(prod)
        if out is not None and (out[1] >= 0).any():
            self.put(*out)

    def _einsum(self, args, out) -> None:
        """A two-operand ``einsum`` without repeated or summed-away letters, read as the batched
        product it is: ``(batch, left-only, contracted) @ (batch, contracted, right-only)``."""
        ops = args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        eq = args[0].replace(" ", "") if isinstance(args[0], str) else ""
        if len(ops) != 2 or "->" not in eq or "." in eq or not isinstance(out, torch.Tensor):
            return
        lhs, o = eq.split("->")
        if lhs.count(",") != 1:
            return
        a_sub, b_sub = lhs.split(",")
        a, b = ops
        if any(len(set(x)) != len(x) for x in (a_sub, b_sub, o)) or set(o) - set(a_sub + b_sub) \
                or (set(a_sub) ^ set(b_sub)) - set(o) or len(a_sub) != a.dim() or len(b_sub) != b.dim():
            return
        batch = [c for c in o if c in a_sub and c in b_sub]
        left = [c for c in o if c in a_sub and c not in b_sub]
        right = [c for c in o if c in b_sub and c not in a_sub]
        contracted = [c for c in a_sub if c in b_sub and c not in o]
        size = {**dict(zip(b_sub, b.shape)), **dict(zip(a_sub, a.shape))}
        nb = [size[c] for c in batch]

        def arrange(s, sub, rows, cols):
            if s is None:
                return None
            s = s.permute([sub.index(c) for c in batch + rows + cols])
            return s.reshape(*nb, math.prod(size[c] for c in rows), math.prod(size[c] for c in cols))
        sa, sb = arrange(self.get(a), a_sub, left, contracted), arrange(self.get(b), b_sub, contracted, right)
        if sa is None and sb is None:
            return
        n, m = math.prod(size[c] for c in left), math.prod(size[c] for c in right)
        if sb is not None and (sb[..., :1, :] != sb[..., :1, :1]).any():
            so = sb[..., :1, :].expand(*nb, n, m)
        elif sa is not None:
            so = sa[..., :, :1].expand(*nb, n, m)
        else:
            so = sb[..., :1, :].expand(*nb, n, m)
        order = batch + left + right
        so = so.reshape(*nb, *(size[c] for c in left), *(size[c] for c in right)).permute([order.index(c) for c in o])
        self._record(sa, sb, (out, so.contiguous()))

    def _matmul(self, a, b, out) -> None:
        sa, sb = self.get(a), self.get(b)
        if (sa is not None and sa.dim() < 2) or (sb is not None and sb.dim() < 2) or out.dim() < 2:
            return   # a vector product: no heads
        # the output takes the right operand's column channels (P·v), else the left one's rows
        if sb is not None and (sb[..., :1, :] != sb[..., :1, :1]).any():
            so = sb[..., :1, :].expand(out.shape)
        elif sa is not None:
            so = sa[..., :, :1].expand(out.shape)
        else:
            so = sb[..., :1, :].expand(out.shape)
        self._record(sa, sb, (out, so.clone()))

    def _sdpa(self, q, k, v, mask, gqa, out) -> None:
        sq, sk, sv = self.get(q), self.get(k), self.get(v)

        def heads(s, like):
            if s is None or not gqa or s.shape[-3] == like.shape[-3]:
                return s
            return s.repeat_interleave(like.shape[-3] // s.shape[-3], dim=-3)
        sk, sv = heads(sk, q), heads(sv, q)
        skt = sk.transpose(-1, -2) if sk is not None else None
        self._record(sq, skt, None)
        score = None
        if sk is not None:
            score = sk[..., :, :1].transpose(-1, -2).expand(*sk.shape[:-2], q.shape[-2], sk.shape[-2])
            sm = self.get(mask)
            if sm is not None:   # a per-head bias in the mask (T5's relative positions) goes with its head
                p = _mix_pairs(score, sm)
                if p is not None:
                    self.mixed.append(p)
        so = sv[..., :1, :].expand(out.shape).clone() if sv is not None else None
        self._record(score, sv, (out, so) if so is not None else None)


def shadow_run(model: nn.Module, example_inputs: Any, names: Dict[nn.Module, str]) -> Shadows:
    """Run ``model`` once on ``example_inputs`` with shadows (see the module docstring)."""
    run = _Run()
    sources: List[Source] = []
    by_module: Dict[int, Source] = {}
    inputs: Dict[str, torch.Tensor] = {}
    reads: Dict[str, Dict[str, int]] = {}
    hooks, swapped = [], []
    base = 0

    def pre(m, args, kwargs):
        name = names.get(m, "")
        h = get_handler(m)
        if h is not None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            s = run.get(x)
            if s is not None and run.hidden == 0 and s.dim() >= 2:
                dim = -1 if (h.channel_last or s.dim() == 2) else 1
                idx = s.movedim(dim, -1).reshape(-1, s.shape[dim])
                inputs.setdefault(name, idx[0].clone())
            run.hidden += 1
        else:
            run.stack.append(name)

    def post(m, args, kwargs, out):
        h = get_handler(m)
        if h is None:
            run.stack.pop()
            return
        run.hidden -= 1
        src = by_module.get(id(m))
        if run.hidden == 0 and src is not None and isinstance(out, torch.Tensor) and out.dim() >= 1:
            dim = src.channel_dim if out.dim() >= 2 else 0
            if out.shape[dim] == src.size:
                ids = torch.arange(src.base, src.base + src.size).view([-1 if d == dim % out.dim() else 1 for d in range(out.dim())])
                run.put(out, ids.expand(out.shape).clone())

    for name, m in model.named_modules():
        h = get_handler(m)
        if h is not None and h.can_root:
            try:
                size = h.num_channels(m, "out")
            except Exception:
                size = None
            if size:
                src = Source(name, m, base, int(size), -1 if h.channel_last else 1)
                sources.append(src)
                by_module[id(m)] = src
                base += int(size)
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
        if h is None:
            for attr, t in itertools.chain(m.named_parameters(recurse=False), m.named_buffers(recurse=False)):
                if (t is None or not t.is_floating_point() or run.get(t) is not None or not t.numel()
                        or t.numel() > FREE_LIMIT or base + t.numel() >= KEY):
                    continue   # (a table as large as a layer's weight holds no heads to find)
                sources.append(Source(f"{name}.{attr}" if name else attr, None, base, t.numel(), 0, tuple(t.shape)))
                run.put(t, torch.arange(base, base + t.numel()).view(t.shape))
                base += t.numel()
        if h is None:
            swapped += note_int_reads(m, reads.setdefault(name, {}))
    try:
        with eval_mode(model), torch.no_grad(), _Mode(run):
            forward(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, cls in swapped:
            m.__class__ = cls
    return Shadows(sources, run.products, run.mixed, inputs, {k: v for k, v in reads.items() if v})


def note_int_reads(m: nn.Module, seen: Dict[str, int]) -> List[Tuple[nn.Module, type]]:
    """Make ``m`` note into ``seen`` the int attributes its forward reads; ``[(m, its class)]`` to
    restore afterwards (``[]`` where the class cannot be subclassed here, or is scripted)."""
    if isinstance(m, torch.jit.ScriptModule):
        return []
    cls = type(m)
    try:
        m.__class__ = _reading_class(cls, seen)
    except TypeError:   # a class that cannot be subclassed here: its reads are not seen
        return []
    return [(m, cls)]


def _reading_class(cls: type, seen: Dict[str, int]) -> type:
    """A subclass of ``cls`` that notes the int attributes read from the instance into ``seen``."""
    def __getattribute__(self, attr):
        value = cls.__getattribute__(self, attr)
        if type(value) is int and not attr.startswith("__"):
            seen.setdefault(attr, value)
        return value
    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})
