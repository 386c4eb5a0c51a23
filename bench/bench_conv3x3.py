"""Thin entry: the benchmark is adm_fast/benchmarks/conv3x3.py (also `adm-fast bench`)."""
import sys

from adm_fast.benchmarks.conv3x3 import main

sys.exit(main())
