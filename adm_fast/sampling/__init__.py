"""Sampling, one package: `adm-fast sample` (cli.py), the Python API (api.py:
`adm_fast.sampling.sample_images`, also `adm_fast.sample_images`), and their
parts: flags and their rules, checkpoint inspection, the resumable run folder of
per-batch shards, output files, PNG grids, class lists, base samples and
progress bars.

The API's names are imported on first use, so that `adm-fast sample --help`
costs no torch import."""

import importlib

_API = ("batch_seed", "iter_batches", "sample_images", "save_samples", "to_uint8_nhwc",
        "write_png")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module("adm_fast.sampling.api"), name)
    raise AttributeError(f"module 'adm_fast.sampling' has no attribute {name!r}")
