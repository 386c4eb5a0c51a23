"""Thin entry: the benchmark is adm_fast/benchmarks/train.py (also `adm-fast bench`)."""
import sys

from adm_fast.benchmarks.train import main

sys.exit(main())
