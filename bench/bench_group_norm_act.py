"""Thin entry: the benchmark is adm_fast/benchmarks/group_norm_act.py (also `adm-fast bench`)."""
import sys

from adm_fast.benchmarks.group_norm_act import main

sys.exit(main())
