"""Thin entry: the benchmark is adm_fast/benchmarks/diffusion_step.py (also `adm-fast bench`)."""
import sys

from adm_fast.benchmarks.diffusion_step import main

sys.exit(main())
