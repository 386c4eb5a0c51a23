"""Thin entry: the benchmark is adm_fast/benchmarks/models.py (also `adm-fast bench`)."""
import sys

from adm_fast.benchmarks.models import main

sys.exit(main())
