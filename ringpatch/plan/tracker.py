"""Counting a step as it runs: every tensor storage it allocates and frees, its FLOPs and its host
syncs. The same code counts real tensors and fake ones (FakeTensorMode: shapes and dtypes, no
data), so a simulated rank (plan/simulate.py) and a real run on the CPU are held to one count.

  StorageTracker  a dispatch mode: each op's new storages (outputs that are not views and not one
                  of its inputs), labelled when they appear, dropped when their storage dies
                  (a weak reference to the storage, not to the Python object: a tensor that only
                  autograd holds is still alive); the peak, and what is live at the peak by label;
                  the FLOPs (torch's formulas; attention_flops: a causal call at half); for a
                  simulated step, which tensors are fake
  SyncCounter     a function mode: every read of tensor data into Python (item, tolist, bool,
                  int, float, equal), by call site. On a GPU each is a host sync
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

Label = Callable[[], tuple[str, str]]
"""Called as a storage appears: (place, category), place "device" or "host"."""


_DEVICE = torch.ops.prim.device.default
_READ_OPS = (
    torch.ops.aten.equal.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten._local_scalar_dense.default,
)
DEBUG_STACKS = False


def _returns_tensor(schema) -> bool:
    return any(str(r.type).startswith("Tensor") for r in schema.returns)


def _flop_formulas() -> dict:
    """torch's flop formulas, the fused attention ops' replaced by attention_flops()."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    return {**flop_registry, **{k: shape_wrapper(v) for k, v in attention_flops().items()}}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class StorageTracker(TorchDispatchMode):
    """Live bytes by place ("device", "host") and category, and each place's peak with the
    categories live at it (and "all": both places' peak, one memory on a CPU); with count_flops, the FLOPs of the ops in torch's flop registry (the
    fused attention ops by attention_flops()). Storages that exist before the mode starts are not
    counted.

    fake_mode: a simulated step. Ops whose inputs are all real then make real tensors below
    `threshold` bytes and fake ones (of fake_mode) from it on, and ops with a fake input make fakes
    anyway: a simulated step keeps the values of its small bookkeeping tensors (positions, the rows
    of a check), which its checks read, while its large tensors cost no memory. Ops that write into
    their inputs run as they are. (One mode, not three stacked: every op of a step passes through it.)"""

    def __init__(self, label: Label, count_flops: bool = False, fake_mode=None, threshold: int = 4 * 2**20, syncs=None):
        super().__init__()
        self.syncs = syncs
        self.label = label
        self.live: dict[int, list] = {}  # key -> [ref, bytes, place, category, order, what]
        self.current: Counter = Counter()  # place -> bytes
        self.peak: Counter = Counter()
        self.at_peak: dict[str, Counter] = {}  # place -> category -> bytes
        self.largest_at_peak: dict[str, list] = {}  # place -> [(bytes, category, shape and dtype)]
        self.events = 0  # storages added so far: an entry's order
        self.flops = 0
        self.largest_numel = 0  # a kernel indexing with 32-bit ints overflows from 2**31 elements
        self.formulas = _flop_formulas() if count_flops else {}
        self.fake_mode, self.threshold = fake_mode, threshold

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE:  # tensor.device on a fake tensor: most of a simulated step's dispatches
            return func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in _READ_OPS and self.syncs is not None and torch._C._current_graph_task_id() != -1:
            answered = self.syncs.read(func.__name__.split(".")[0], tensors)
            if answered is not None:
                return answered
        out = self._run(func, tensors, args, kwargs) if self.fake_mode is not None else func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        inputs = None
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view() and t.layout == torch.strided:
                self.largest_numel = max(self.largest_numel, t.numel())
                if inputs is None:
                    inputs = {_storage_key(x) for x in tensors}
                key = _storage_key(t)
                if key not in inputs:
                    self._add(key, t)
        return out

    def _run(self, func, tensors, args, kwargs):
        schema = func._schema
        if any(is_fake(t) for t in tensors) or schema.is_mutable or not _returns_tensor(schema):
            return func(*args, **kwargs)
        with self.fake_mode:
            shaped = func(*args, **kwargs)
        size = sum(t.untyped_storage().nbytes() for t in tree_leaves(shaped) if isinstance(t, torch.Tensor))
        return shaped if size >= self.threshold else func(*args, **kwargs)

    def _sweep(self) -> None:
        for key in [k for k, entry in self.live.items() if entry[0].expired()]:
            _, size, place, *_ = self.live.pop(key)
            self.current[place] -= size
            self.current["all"] -= size

    def _add(self, key: int, t: torch.Tensor) -> None:
        self._sweep()  # also frees a key whose address a new storage now reuses
        size = t.untyped_storage().nbytes()
        if key in self.live or not size:
            return
        place, category = self.label()
        self.events += 1
        what = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        self.live[key] = [StorageWeakRef(t.untyped_storage()), size, place, category, self.events, what]
        self.current[place] += size
        self.current["all"] += size
        self.peak["all"] = max(self.peak["all"], self.current["all"])
        if DEBUG_STACKS:
            import traceback

            what += (
                " @ "
                + " < ".join(
                    f"{f.filename.split('/')[-1]}:{f.lineno}:{f.name}"
                    for f in reversed(traceback.extract_stack(limit=14)[:-3])
                    if "/torch/" not in f.filename
                )[:300]
            )
            self.live[key][5] = what
        if self.current[place] > self.peak[place]:
            self.peak[place] = self.current[place]
            self.at_peak[place] = self.by_category(place)
            self.largest_at_peak[place] = sorted(
                ((e[1], e[3], e[5]) for e in self.live.values() if e[2] == place), reverse=True
            )[:12]

    def by_category(self, place: str = "device") -> Counter:
        self._sweep()
        by = Counter()
        for _, size, place_, category, *_ in self.live.values():
            if place_ == place:
                by[category] += size
        return by

    def relabel(self, since: int, category: str, keep: Callable[[str], bool] = lambda c: True) -> None:
        """Give the live storages added after event `since` (self.events then) a new category
        when keep(old category): what a scope leaves alive as it ends."""
        self._sweep()
        for entry in self.live.values():
            if entry[4] > since and entry[2] == "device" and keep(entry[3]):
                entry[3] = category

    def live_bytes(self, place: str = "device") -> int:
        self._sweep()
        return self.current[place]


READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


class SyncCounter(TorchFunctionMode):
    """Counts reads of tensor data into Python by call site (file:line of the caller). A read of a
    fake tensor (no data) is answered by `answer(name, tensors, site)`.

    A function mode is off inside its own handlers, so it does not see into `backward()`: reads
    there (a recompute's checks) are counted, and answered, by StorageTracker(syncs=this) at the
    dispatch level, where they arrive as aten.equal, is_nonzero or _local_scalar_dense."""

    def __init__(self, answer: Callable | None = None, skip: tuple[str, ...] = ()):
        super().__init__()
        self.sites: Counter = Counter()
        self.answer = answer
        self.skip = (__file__, *skip)

    def _site(self) -> str:
        frame = sys._getframe(3)
        while frame is not None and (frame.f_code.co_filename in self.skip or "/torch/" in frame.f_code.co_filename):
            frame = frame.f_back
        return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or func is torch.equal:
            answered = self.read(name, [a for a in args if isinstance(a, torch.Tensor)])
            if answered is not None:
                return answered
        return func(*args, **(kwargs or {}))

    def read(self, name: str, tensors: list):
        """Count one read; the answer for a fake tensor's, else None (the read goes ahead)."""
        site = self._site()
        self.sites[site] += 1
        if self.answer is not None and any(is_fake(t) for t in tensors):
            return self.answer(name, tensors, site)
        return None

    @property
    def total(self) -> int:
        return sum(self.sites.values())


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _attention_flops(q, k, causal: bool, backward: bool) -> int:
    """q (B, H, Sq, D), k (B, H_kv, Sk, D): shapes, as FlopCounterMode passes them."""
    (b, h, sq, d), sk = q, k[2]
    flops = 4 * b * h * sq * sk * d * (2 if backward else 1)  # QK^T and PV; backward twice that
    return flops // 2 if causal and sq == sk else flops


def attention_flops() -> dict:
    """FlopCounterMode custom_mapping for the fused attention ops the ring's kernels call, counting
    a causal (diagonal) call at half: the work the kernels skip is not counted as done."""
    aten = torch.ops.aten

    def fwd(causal_at):
        def count(*args, out_shape=None, **kwargs):
            q, k = args[0], args[1]
            causal = args[causal_at] if len(args) > causal_at else kwargs.get("is_causal", False)
            return _attention_flops(q, k, bool(causal), backward=False)

        return count

    def bwd(q_at, k_at, causal_at):
        def count(*args, out_shape=None, **kwargs):
            causal = args[causal_at] if len(args) > causal_at else kwargs.get("is_causal", False)
            return _attention_flops(args[q_at], args[k_at], bool(causal), backward=True)

        return count

    return {
        aten._scaled_dot_product_flash_attention: fwd(4),  # q, k, v, dropout, is_causal
        aten._scaled_dot_product_flash_attention_backward: bwd(1, 2, 11),  # dout, q, k, v, out, lse, ...
        aten._scaled_dot_product_efficient_attention: fwd(6),  # q, k, v, bias, compute_lse, dropout, causal
        aten._scaled_dot_product_efficient_attention_backward: bwd(1, 2, 11),
        aten._scaled_dot_product_flash_attention_for_cpu: fwd(4),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd(1, 2, 7),
    }


def live_peak(prof) -> int | None:
    """Peak of the bytes allocated and not yet freed within a torch.profiler region (CPU tensors,
    profile_memory=True): the allocator's own count, independent of StorageTracker."""
    from torch.autograd import DeviceType

    try:
        events = prof.profiler.kineto_results.events()
        changes = sorted(
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        )
    except AttributeError:  # a torch without these accessors
        return None
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak
