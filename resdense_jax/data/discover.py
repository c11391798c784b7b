"""Finding scans: the COV19-CT-DB layout, flat folders of scans, stratified splits by scan."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from resdense_jax.data.scans import ScanError, ScanRef, is_image, is_nifti, natural_key, warn

SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
               "valid": "validation", "test": "test"}
CLASS_NAMES = {"covid": 1, "noncovid": 0}


@dataclasses.dataclass
class Collection:
  """Scans of a collection by split; test scans are unlabelled (label None)."""

  root: Path
  train: list[ScanRef]
  validation: list[ScanRef]
  test: list[ScanRef]

  def split(self, name: str) -> list[ScanRef]:
    return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def _normalise(name: str) -> str:
  return re.sub(r"[\s_\-]", "", name.lower())


def _visible(folder: Path) -> list[Path]:
  """Children not hidden and not ours (`_masks`, `_labels` and other underscored names)."""
  return sorted((p for p in folder.iterdir() if not p.name.startswith((".", "_"))),
                key=lambda p: natural_key(p.name))


def _is_nonempty_dir(path: Path) -> bool:
  return any(p.is_file() for p in path.iterdir())


def scans_in(folder: Path, *, label: int | None, split: str) -> list[ScanRef]:
  """Every scan directly inside `folder`: sub-folders (images or DICOM) and NIfTI files."""
  refs = []
  for path in _visible(folder):
    if path.is_dir():
      if not _is_nonempty_dir(path):
        warn(f"{path}: empty scan folder (no slice files); skipped")
        continue
      refs.append(ScanRef(scan_id=path.name, path=path, label=label, split=split))
    elif is_nifti(path):
      scan_id = re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)
      refs.append(ScanRef(scan_id=scan_id, path=path, label=label, split=split))
    else:
      warn(f"{path}: stray file among scans in {folder} (not a scan folder or NIfTI); skipped")
  return refs


def _class_folders(split_dir: Path) -> dict[int, Path]:
  found: dict[int, Path] = {}
  for path in _visible(split_dir):
    if path.is_dir() and _normalise(path.name) in CLASS_NAMES:
      label = CLASS_NAMES[_normalise(path.name)]
      if label in found:
        raise ScanError(split_dir, f"two folders for one class: {found[label].name} and {path.name}")
      found[label] = path
    elif path.is_dir():
      warn(f"{path}: not a class folder (expected covid or non-covid); skipped")
    else:
      warn(f"{path}: stray file in split folder {split_dir}; skipped")
  return found


def labelled_scans(split_dir: Path, split: str) -> list[ScanRef]:
  """Scans of `<split_dir>/{covid,non-covid}/`; both class folders must be there."""
  folders = _class_folders(split_dir)
  missing = [name for name, label in (("covid", 1), ("non-covid", 0)) if label not in folders]
  if missing:
    present = ", ".join(p.name for p in folders.values()) or "none"
    raise ScanError(split_dir, f"missing class folder {' and '.join(missing)} "
                    f"(class folders found: {present})")
  refs = []
  for label in (1, 0):
    found = scans_in(folders[label], label=label, split=split)
    if not found:
      raise ScanError(folders[label], "class folder holds no scans")
    refs.extend(found)
  return refs


def stratified_split(refs: list[ScanRef], *, val_fraction: float, seed: int
                     ) -> tuple[list[ScanRef], list[ScanRef]]:
  """Splits scans (never slices) per class, seeded; each class keeps >= 1 scan on both sides."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  rng = np.random.default_rng(seed)
  train, validation = [], []
  for label in sorted({r.label for r in refs}):
    members = [r for r in refs if r.label == label]
    order = rng.permutation(len(members))
    n_val = int(round(len(members) * val_fraction))
    if len(members) >= 2:
      n_val = min(max(n_val, 1), len(members) - 1)
    picked = set(order[:n_val].tolist())
    for i, ref in enumerate(members):
      if i in picked:
        validation.append(dataclasses.replace(ref, split="validation"))
      else:
        train.append(ref)
  return train, validation


def discover(root, *, val_fraction: float = 0.25, seed: int = 0) -> Collection:
  """Finds the scans under `root`.

  Layouts: COV19-CT-DB `<root>/{train,validation|val}/{covid,non-covid}/<scan_id>/` plus
  unlabelled `<root>/test/<scan_id>/`; `<root>/{covid,non-covid}/<scan_id>/` (taken as train);
  or a flat folder of scans (image folders, DICOM folders, NIfTI files), all unlabelled test.
  Without a validation folder, train is split by scan, stratified by class and seeded.
  """
  root = Path(root)
  if not root.is_dir():
    raise ScanError(root, "collection root is not a folder")
  children = {SPLIT_NAMES.get(p.name.lower()): p for p in _visible(root) if p.is_dir()}
  children.pop(None, None)
  train, validation, test = [], [], []
  if children:
    if "train" in children:
      train = labelled_scans(children["train"], "train")
    if "validation" in children:
      validation = labelled_scans(children["validation"], "validation")
    if "test" in children:
      test = scans_in(children["test"], label=None, split="test")
    for path in _visible(root):
      if path.is_dir() and path.name.lower() not in SPLIT_NAMES:
        warn(f"{path}: not a split folder (train, validation, val, test); skipped")
  elif any(_normalise(p.name) in CLASS_NAMES for p in _visible(root) if p.is_dir()):
    train = labelled_scans(root, "train")
  elif any(is_image(p) for p in root.iterdir() if p.is_file()):
    raise ScanError(root, "this looks like one scan (slice images), not a collection; "
                    "use read_scan for one scan")
  else:
    test = scans_in(root, label=None, split="test")
  if train and not validation:
    train, validation = stratified_split(train, val_fraction=val_fraction, seed=seed)
  if not (train or validation or test):
    raise ScanError(root, "empty collection: no scans found (expected train/, validation/, "
                    "test/ folders or a folder of scans)")
  return Collection(root=root, train=train, validation=validation, test=test)
