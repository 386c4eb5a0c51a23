"""The CPU kernels' own thread pool (csrc/cpu/parallel.cpp): the same bytes on
any thread count and from several Python threads at once, and a forked child
(a DataLoader worker, a multiprocessing pool) that runs the kernels after the
parent did neither hangs nor differs."""

import contextlib
import multiprocessing
import threading

import pytest
import torch
from helpers import CPU_EXT

from adm_fast import ops
from adm_fast.ops import use_backend

pytestmark = pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 128, 16, 16, generator=g) + 0.5).contiguous(
        memory_format=torch.channels_last)
    w, b = torch.randn(128, generator=g) + 1, torch.randn(128, generator=g)
    scale, shift = torch.randn(4, 128, generator=g), torch.randn(4, 128, generator=g)
    wt = torch.randn(96, 128, 3, 3, generator=g) / 34 + 0.01
    bias = torch.randn(96, generator=g)
    xs = torch.randn(4, 3, 16, 16, generator=g)
    out = torch.randn(4, 6, 16, 16, generator=g)
    noise = torch.randn(4, 3, 16, 16, generator=g)
    coefs = torch.rand(8, 4, generator=g) + 0.1
    return x, w, b, scale, shift, wt, bias, xs, out, noise, coefs


def _run(args, setting="cpu"):
    """Every kernel family on the CPU backend: GroupNorm+AdaGN+SiLU fwd and
    bwd (NHWC), Winograd conv3x3 fwd and its input gradient, a DDPM step.
    setting None: the caller set the backend (it is process-wide)."""
    x, w, b, scale, shift, wt, bias, xs, out, noise, coefs = args
    with use_backend(setting) if setting else contextlib.nullcontext():
        xg = x.detach().clone().requires_grad_(True)
        h = ops.group_norm_act(xg, 32, w, b, scale, shift, act=True)
        (dx,) = torch.autograd.grad(h, xg, torch.ones_like(h))
        xc = x.detach().clone().requires_grad_(True)
        y = ops.conv3x3(xc, wt, bias)
        (dxc,) = torch.autograd.grad(y, xc, torch.ones_like(y))
        sample, x0 = ops.ddpm_step(xs, out, noise, coefs)
    return [t.detach().clone() for t in (h, dx, y, dxc, sample, x0)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def test_the_same_bytes_on_any_thread_count():
    args = _inputs()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = _run(args)
        for threads in (2, 3, 4, 2):
            torch.set_num_threads(threads)
            assert _same(_run(args), want), threads
    finally:
        torch.set_num_threads(before)


def test_the_same_bytes_from_several_python_threads():
    """Callers at once: one runs on the pool, the others on their own thread
    (the pool takes one job at a time); every result is the serial one. The
    backend is set once, outside the threads: the setting is process-wide."""
    args = _inputs()
    want = _run(args)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(_run(args, setting=None))
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    with use_backend("cpu"):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert len(results) == 20
    differ = [[i for i, (p, q) in enumerate(zip(r, want)) if not torch.equal(p, q)]
              for r in results]
    assert not any(differ), differ


def _native(args):
    """The kernels alone (raw ops; nothing of ATen's that runs an OpenMP region,
    which GNU OpenMP does not support in a forked child once the parent used it)."""
    from adm_fast.ops.conv3x3 import NATIVE as CONV
    from adm_fast.ops.group_norm_act import NATIVE_FORWARD as GN

    x, w, b, scale, shift, wt, bias = args[:7]
    y, _, _ = GN(x, 32, w, b, scale, shift, 1e-5, True)
    return [y, CONV(x, wt, bias)]


def _child(args, queue):
    queue.put([t.numpy() for t in _native(args)])


def test_a_forked_child_runs_the_kernels():
    """The parent's pool workers do not exist in a forked child: it neither
    waits for them nor computes other bytes."""
    args = _inputs()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = _native(args)  # the parent's pool is started
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(args, queue))
        child.start()
        try:
            got = queue.get(timeout=300)
        finally:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
        assert child.exitcode == 0
        assert _same([torch.from_numpy(a) for a in got], want)
    finally:
        torch.set_num_threads(before)


def test_openmp_instead_gives_the_same_bytes(tmp_path):
    """ADM_FAST_CPU_POOL=0 (read once per process) runs the kernels on OpenMP's
    regions: the same bytes as the pool's."""
    import os
    import subprocess
    import sys

    want = _run(_inputs())
    out = tmp_path / "openmp.pt"
    code = ("import sys, torch; sys.path.insert(0, 'tests'); "
            "from test_cpu_parallel import _inputs, _run; torch.set_num_threads(2); "
            f"torch.save(_run(_inputs()), {str(out)!r})")
    env = dict(os.environ, ADM_FAST_CPU_POOL="0")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert _same(torch.load(out, weights_only=True), want)
