"""CT scan data: reading scans, finding collections, grain pipelines, prepared TFDS data.

`PreparedData` and `prepare_dataset` load tensorflow_datasets on first use only.
"""

from resdense_jax.data import lungs, synthetic
from resdense_jax.data.discover import Collection, discover, stratified_split
from resdense_jax.data.pipeline import (RawScans, bad_slice_summary, eval_pipeline, eval_steps,
                                        model_slice, read_scan_slices, select_slices, steps_per_epoch,
                                        to_global_batch, train_pipeline)
from resdense_jax.data.scans import (DEFAULT_WINDOW, DataWarning, ReadOptions, Scan, ScanError, ScanRef,
                                     ScanSlices, SliceError, SliceReader, read_scan, uint8_to_hu,
                                     window_to_uint8)

__all__ = [
    "Collection", "DEFAULT_WINDOW", "DataWarning", "PreparedData", "RawScans", "ReadOptions", "Scan",
    "ScanError", "ScanRef", "ScanSlices", "SliceError", "SliceReader", "bad_slice_summary", "discover",
    "eval_pipeline", "eval_steps", "lungs", "model_slice", "prepare_dataset", "read_scan",
    "read_scan_slices", "select_slices", "steps_per_epoch", "stratified_split", "synthetic",
    "to_global_batch", "train_pipeline", "uint8_to_hu", "window_to_uint8",
]


def __getattr__(name):
  if name in ("PreparedData", "prepare_dataset"):
    # Lazy: tensorflow_datasets adds 0.3 s to every `import resdense_jax.data` (grain workers too; measured).
    from resdense_jax.data import prepare as prepare_module
    return getattr(prepare_module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
