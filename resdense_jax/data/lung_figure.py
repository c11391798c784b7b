"""The lung-crop figure: each scan's lung box (data/lungs.py) on sample slices, and the crops.

    python -m resdense_jax.data.lung_figure --scan=../shared/data/chest_ct_dicom \\
        --scan=../shared/data/chest_ct_nifti/chest_ct.nii.gz --out=docs/images/lung_crop.png

A module of its own so that `python -m` runs it without the package having imported it first.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from resdense_jax.data import lungs


def main(argv: Sequence[str]) -> int:
  """`python -m resdense_jax.data.lung_figure --scan=PATH [--scan=PATH ...] --out=FILE.png [--margin=0.05]`."""
  fv = flags.FlagValues()
  flags.DEFINE_multi_string("scan", None, "A scan: slice-image folder, DICOM series folder or NIfTI file.",
                            flag_values=fv)
  flags.DEFINE_string("out", None, "The PNG to write.", flag_values=fv)
  flags.DEFINE_float("margin", 0.05, "Margin around the box, a fraction of the slice's side.", flag_values=fv)
  flags.DEFINE_integer("per_scan", 5, "Slices shown per scan.", flag_values=fv)
  flags.mark_flags_as_required(["scan", "out"], flag_values=fv)
  try:
    extra = fv(list(argv))[1:]
    if extra:
      raise flags.Error(f"unexpected arguments: {' '.join(extra)}")
  except flags.Error as error:
    print(f"error: {error}\nusage: python -m resdense_jax.data.lung_figure --scan=PATH [--scan=PATH ...] "
          "--out=FILE.png [--margin=0.05]", file=sys.stderr)
    return 2
  try:
    path, boxes = lungs.figure(fv.scan, fv.out, margin=fv.margin, per_scan=fv.per_scan)
  except ValueError as error:  # ScanError: names the scan
    print(f"error: {error}", file=sys.stderr)
    return 1
  for scan_path, box in zip(fv.scan, boxes):
    span = box.lung_range()
    print(f"{scan_path}: box top {box.top:.3f} left {box.left:.3f} bottom {box.bottom:.3f} right "
          f"{box.right:.3f} (fractions of the slice); lung in slices "
          f"{'none' if span is None else f'{span[0]}..{span[1] - 1}'} of {len(box.lung)}")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
