"""Winograd weights kept across calls: the transform U = G·g·Gᵀ of a conv3x3
weight, reused while the weight's bytes stay what they were.

A sampling loop runs the same convolutions with the same weights at every
step; on an 8×8 map at 256 channels the transform takes about as long as the
convolution from it (docs/performance.md).
It is not keyed on the weight's version: a write through `.data` (old
training code's EMA and checkpoint loading) leaves the version as it was. Each
entry keeps a copy of the weight's bytes instead and is reused only when the
weight still holds exactly those bytes (a bitwise compare, which reads the
weight and the copy: a third of the transform's time at 256 channels). So a
hit is the same U bit for bit, whatever wrote to the weight; a weight that
changes at every call (training) gets a new transform each time, and after
two changes its compare stops at the first word (see get).

Entries go with their weight's storage (a weak reference) and fit a budget
(ADM_FAST_WINOGRAD_CACHE_MB, 1024 by default; 0 turns the cache off): once it
is full, further weights are transformed on every call, so a model larger
than the budget keeps its first layers' transforms instead of evicting them
in a cycle that would keep none.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import weakref

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import native


def u_shape(weight_shape, turned: bool):
    """U's shape for a [O, C, 3, 3] weight: [16, ceil(O/16), C, 16], strips of
    16 output channels (zero past O) that the products read in order; turned:
    in and out swapped."""
    o, c = (weight_shape[1], weight_shape[0]) if turned else (weight_shape[0], weight_shape[1])
    return (16, -(-o // 16), c, 16)


TRANSFORM = native.define(
    "conv3x3_winograd_weight", "Tensor weight, bool turned", 1,
    lambda weight, turned: weight.new_empty(u_shape(weight.shape, turned)))


def _budget_from_env() -> int:
    raw = os.environ.get("ADM_FAST_WINOGRAD_CACHE_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"ADM_FAST_WINOGRAD_CACHE_MB must be a number of MiB, got {raw!r}") \
            from None
    if not mb >= 0:
        raise ValueError(f"ADM_FAST_WINOGRAD_CACHE_MB must be >= 0, got {raw!r}")
    return int(mb * 2**20)


class _Entry:
    __slots__ = ("snap", "u", "changes", "token")
    _tokens = itertools.count()

    def __init__(self, snap: Tensor):
        self.snap, self.u, self.changes = snap, None, 0
        self.token = next(self._tokens)  # what its finalizer names: not the entry, kept alive


def _bits(t: Tensor) -> Tensor:
    return t.detach().view(torch.int32)


def _has_bytes(t: Tensor) -> bool:
    """Whether t holds data: a fake tensor (a traced step: bench plan, bench
    sample's roofline) or a meta one has none, and every fake weight has
    data_ptr 0, so all of them would share one entry and its compare would
    read address 0."""
    return t.device.type != "meta" and not is_fake(t)


def _same_bytes(weight: Tensor, snap: Tensor) -> bool:
    """Bit for bit, through the extension's memcmp where the layouts match (a
    weight and its clone do): torch.equal is a parallel region, costly on a
    busy machine at every convolution."""
    from .backends import CPU

    w = weight.detach()
    if (CPU.ext is not None and w.device.type == "cpu" and w.shape == snap.shape
            and w.stride() == snap.stride() and w.dtype == snap.dtype
            and (w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last))):
        return CPU.ext.bytes_equal(w, snap)
    return torch.equal(_bits(w), _bits(snap))


class WinogradWeights:
    def __init__(self, budget_bytes: int | None = None):
        # None: ADM_FAST_WINOGRAD_CACHE_MB's, read at the first entry (a bad value
        # is then a clear error from the first convolution, not from the import).
        self.budget = None if budget_bytes is None else int(budget_bytes)
        self._entries: dict[tuple, _Entry] = {}
        self._used = 0
        # Reentrant: freeing a weight inside get() runs its finalizer, which drops an entry.
        self._lock = threading.RLock()
        self.hits = self.misses = 0

    def get(self, weight: Tensor, turned: bool = False) -> Tensor:
        """U (u_shape) of weight [O, C, 3, 3] (turned: of the kernel turned by
        180° with in and out swapped): the same bytes whether kept or made now.

        A weight rewritten between calls (training) is volatile once it has
        changed twice running: its copy is then refreshed only every 16th
        change, so that each call costs a failing compare (which stops at the
        first differing word) instead of a copy, until it holds still again."""
        if not _has_bytes(weight):  # traced: nothing to keep, nor to compare
            return TRANSFORM(weight.detach(), bool(turned))
        key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), bool(turned))
        with self._lock, torch.inference_mode(False), torch.no_grad():
            e = self._entries.get(key)
            if e is not None and _same_bytes(weight, e.snap):
                e.changes = 0
                if e.u is not None:
                    self.hits += 1
                    return e.u
                kept = True
            elif e is None:
                e = self._insert(key, weight, turned)
                kept = e is not None
            else:  # rewritten since its copy
                e.u = None
                e.changes += 1
                kept = e.changes < 2 or e.changes % 16 == 0
                if kept:
                    e.snap.copy_(weight)
            self.misses += 1
            u = TRANSFORM(weight.detach(), bool(turned))
            if kept:
                e.u = u
            return u

    def _insert(self, key, weight: Tensor, turned: bool):
        size = 4 * (weight.numel() + math.prod(u_shape(weight.shape, turned)))
        if self.budget is None:
            self.budget = _budget_from_env()
        if self._used + size > self.budget:
            return None
        e = _Entry(weight.detach().clone())
        self._used += size
        self._entries[key] = e
        # The storage, not the tensor: a detached view or a saved tensor is a new
        # Python object on every call, while torch keeps one per storage.
        weakref.finalize(weight.untyped_storage(), self._drop, key, e.token, size)
        return e

    def _drop(self, key, token, size) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.token == token:
                del self._entries[key]
                self._used -= size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0

    def used_bytes(self) -> int:
        return self._used


CACHE = WinogradWeights()
