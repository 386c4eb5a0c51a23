"""`adm-fast bench`: benchmarks that ship with the package.

`bench sample` times whole classifier-guided sampling steps of the released
ADM layouts (or a tiny one on CPU), adm_fast's backends against
guided-diffusion's eager computation and torch.compile, and checks in the
same run that they give the same samples. `bench ops` and `bench train` run
the repository's per-op and training benchmarks (bench/ in a source checkout).
"""

from .flops import PEAK_TFLOPS_BF16, step_flops
from .sample import TINY, run_sample_bench

__all__ = ["PEAK_TFLOPS_BF16", "TINY", "run_sample_bench", "step_flops"]
