"""Counters of the bytes autograd holds for backward, for the training
benchmark (bench_train.py) and its tests: what the saved-tensor hooks see
(SavedBytes), and, to check that nothing escapes them, the memory a forward
left allocated (HeldBytes)."""

from __future__ import annotations

import weakref

import torch


class SavedBytes:
    """Counts the bytes autograd holds for backward while the context is open.

    Each storage counts once with its full size (a slice saved for backward
    keeps its whole base alive), so views are not double counted; parameters,
    and any tensor sharing a storage with one of `exclude`, are not activations
    and are left out. Read `nbytes()` after forward and before backward: it
    sums what is still alive, so tensors of graph parts freed during forward
    (a detached branch) do not count.
    """

    def __init__(self, exclude=()):
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self._saved = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and \
                t.untyped_storage().data_ptr() not in self._excluded:
            self._saved.append(weakref.ref(t))
        return t  # the graph keeps t itself, so the weak reference lives as long

    def nbytes(self) -> int:
        storages = {}
        for ref in self._saved:
            t = ref()
            if t is not None:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def _unpack(t):
    return t


class HeldBytes:
    """The bytes allocated while the context is open that are still allocated
    when it closes: for a forward, what its graph keeps for backward (saved
    tensors, and whatever a custom autograd Function stashes out of the hooks'
    sight) plus its outputs, and any cache it filled. On CUDA,
    memory_allocated's difference; on a CPU, which keeps no such count,
    torch's profiler's record of every allocation and free in between."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._profiler = None
        self._base = 0
        self.nbytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.nbytes = torch.cuda.memory_allocated(self.device) - self._base
            return False
        self._profiler.__exit__(*exc)
        if exc[0] is None:
            # Each allocation counts for the op it ran in, each free too (or for
            # "[memory]" outside any op): their sum is what stayed allocated.
            self.nbytes = sum(e.self_cpu_memory_usage for e in self._profiler.events())
        return False
