"""Thin entry: the benchmark is adm_fast/benchmarks/evaluate.py (also `adm-fast bench evaluate`)."""
import sys

from adm_fast.benchmarks.evaluate import main

sys.exit(main())
