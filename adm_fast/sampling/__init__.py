"""The parts of `adm-fast sample` and `adm_fast.sampling_api`: output files
(atomic, reproducible .npz writing), the resumable run folder of per-batch
shards, PNG grids, class lists, base samples, checkpoint inspection and
progress bars."""
