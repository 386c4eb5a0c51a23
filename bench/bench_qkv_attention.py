"""Thin entry: the benchmark is adm_fast/benchmarks/qkv_attention.py (also `adm-fast bench`)."""
import sys

from adm_fast.benchmarks.qkv_attention import main

sys.exit(main())
