"""A counter of the bytes autograd holds for backward, for the training
benchmark (bench_train.py) and its tests."""

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
