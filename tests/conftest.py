"""The test session's environment (set before adm_fast or Triton loads) and its
fixtures; the plain helpers test files import are in helpers.py."""

import atexit
import os
import shutil
import tempfile

import pytest

from adm_fast.cli import openmp_defaults  # imports no torch

# The suite's processes wait as adm-fast's commands do (a short OpenMP spin,
# set before torch loads libgomp): on a machine shared with other work, long
# spins take the cores the tests need.
openmp_defaults()

import torch  # noqa: E402  (imports no Triton)

# Tests pick backends explicitly; a user's setting must not leak in. Choices
# timed at run time would differ between runs: the tests take the static order
# (test_autotune.py tests the timing itself).
os.environ.pop("ADM_FAST_BACKEND", None)
os.environ["ADM_FAST_AUTOTUNE"] = "0"
# Auto checks implementations against the reference before it uses them
# (ops/verify.py), in the tests as for users; the verdicts go to a folder of
# this process's (subprocesses inherit it), so no run depends on an earlier
# one or on the user's cache.
os.environ.pop("ADM_FAST_VERIFY", None)
os.environ["ADM_FAST_CACHE"] = tempfile.mkdtemp(prefix="adm_fast_tests_")
atexit.register(shutil.rmtree, os.environ["ADM_FAST_CACHE"], True)
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; it
# must be on before the kernels are defined (before adm_fast is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist the workers share the cores: each takes its share of the
# threads, so that compute-bound tests do not oversubscribe the machine while
# the single-threaded ones (Triton's interpreter, nvcc, subprocesses) overlap.
# The share of torch's own default, not of os.cpu_count(): in a container that
# counts the host's cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads()
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
