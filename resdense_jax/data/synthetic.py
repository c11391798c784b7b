"""Synthetic chest CT: COV19-CT-DB-layout collections, DICOM series and NIfTI volumes for tests.

Each scan is rendered in Hounsfield units from a per-scan random anatomy (body outline with
subcutaneous fat, chest wall, ribs, sternum, spine, lungs with branching vessels and a
diaphragm dome, heart, great vessels, trachea and bronchi), then blurred, given noise and mapped
to uint8 through the lung window, like the JPEG slices of COV19-CT-DB. COVID scans carry
peripheral, mostly posterior and lower-lobe, often bilateral ground-glass opacities, some with
a consolidated core; non-COVID scans are normal or carry small solid nodules. Both classes may
show a thin dependent (posterior) density, so posterior haziness alone is no COVID cue.

Coordinates: u runs over image columns (patient right to left), v over rows (anterior to
posterior), both in [-1, 1]; z runs from the lung bases (0) to the apices (1).
Everything is deterministic from the seed.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from resdense_jax.data.scans import DEFAULT_WINDOW, Scan, uint8_to_hu, window_to_uint8

AIR, LUNG, FAT, SOFT, LIVER, CORTEX, MARROW = -1000.0, -860.0, -100.0, 40.0, 55.0, 700.0, 230.0
DEFAULT_NUM_SCANS = {"train": (24, 24), "validation": (8, 8), "test": 16}


@dataclasses.dataclass
class _Lesion:
  centre: np.ndarray  # (u, v, z)
  radii: np.ndarray  # (ru, rv, rz)
  angle: float  # in-plane orientation, radians
  density: float  # target HU of the ground glass
  consolidated: bool  # a dense core toward soft-tissue HU


@dataclasses.dataclass
class _Anatomy:
  scale: float
  shift: np.ndarray
  tilt: float
  body_axes: np.ndarray
  lung_axes: np.ndarray
  lung_x: float
  heart_axes: np.ndarray
  contrast: float  # HU of blood
  dome: tuple[float, float]  # diaphragm dome heights (right, left)
  rib_phase: np.ndarray
  vessels: list[np.ndarray]  # per lung: points [k, 4] (u, v, z, radius)
  lesions: list[_Lesion]
  nodules: np.ndarray  # [k, 4] (u, v, z, radius)
  dependent: float  # thickness of a posterior dependent density, 0 for none
  noise: float
  blur: float
  gas_bubble: bool


def _ellipse(u, v, cu, cv, au, av, angle=0.0):
  """Squared normalised radius of an (optionally rotated) ellipse; < 1 inside."""
  du, dv = u - cu, v - cv
  if angle:
    c, s = math.cos(angle), math.sin(angle)
    du, dv = c * du + s * dv, -s * du + c * dv
  return (du / au) ** 2 + (dv / av) ** 2


def _lung_scale(z: float) -> float:
  """Relative lung cross-section size along z: widest a little below the middle."""
  return math.sqrt(max(1.0 - ((z - 0.42) / 0.64) ** 2, 0.0))


def _heart_scale(z: float) -> float:
  return math.sqrt(max(math.sin(math.pi * (z - 0.1) / 0.48), 0.0)) if 0.1 < z < 0.58 else 0.0


def _lung_centre(side: int, anatomy: _Anatomy) -> tuple[float, float]:
  return side * anatomy.lung_x, 0.03


def _sample_tree(rng: np.random.Generator, side: int, anatomy: _Anatomy) -> np.ndarray:
  """Branching vessels of one lung as dense 3-D points (u, v, z, radius)."""
  cu, cv = _lung_centre(side, anatomy)
  au, av = anatomy.lung_axes
  hilum = np.array([cu - side * 0.55 * au, cv - 0.05, 0.5])
  points = []

  def segment(start, end, r0, r1):
    length = np.linalg.norm((end - start) * np.array([1.0, 1.0, 0.8]))
    n = max(int(length / 0.008), 2)
    t = np.linspace(0.0, 1.0, n)[:, None]
    xyz = start + t * (end - start)
    radius = r0 + t * (r1 - r0)
    points.append(np.concatenate([xyz, radius], axis=1))
    return xyz

  def random_end():
    for _ in range(50):
      z = rng.uniform(0.04, 0.97)
      s = _lung_scale(z)
      ang = rng.uniform(0, 2 * math.pi)
      rad = math.sqrt(rng.uniform(0.15, 0.85))
      end = np.array([cu + rad * au * s * math.cos(ang), cv + rad * av * s * math.sin(ang), z])
      if s > 0.2:
        return end
    return hilum.copy()

  for _ in range(14):
    end = random_end()
    trunk = segment(hilum, end, 0.016, 0.006)
    for _ in range(3):
      start = trunk[rng.integers(len(trunk) // 3, len(trunk))]
      target = start + (random_end() - start) * rng.uniform(0.3, 0.7)
      segment(start, target, 0.008, 0.004)
  return np.concatenate(points)


def _sample_lesions(rng: np.random.Generator, anatomy: _Anatomy) -> list[_Lesion]:
  """Peripheral ground-glass patches, lower lobes and posterior favoured, often bilateral."""
  au, av = anatomy.lung_axes
  count = int(rng.integers(4, 10))
  bilateral = rng.random() < 0.8
  first_side = 1 if rng.random() < 0.5 else -1
  lesions = []
  for k in range(count):
    side = (first_side if k % 2 == 0 else -first_side) if bilateral else first_side
    cz = float(np.clip(rng.beta(2.0, 2.6), 0.1, 0.85))
    s = max(_lung_scale(cz), 0.35)
    cu, cv = _lung_centre(side, anatomy)
    # Angle around the lung centre: mostly posterior and lateral pleura.
    theta = rng.normal(math.pi / 2 + side * 0.35, 0.9) if rng.random() < 0.75 else rng.uniform(0, 2 * math.pi)
    lateral = side * math.cos(theta) >= 0 or rng.random() < 0.5
    if not lateral:
      theta = math.pi - theta
    ru = rng.uniform(0.14, 0.26)
    rv = ru * rng.uniform(0.7, 1.4)
    rho = 1.0 - 0.45 * ru / (au * s)
    centre = np.array([cu + rho * au * s * math.cos(theta), cv + rho * av * s * math.sin(theta), cz])
    lesions.append(_Lesion(centre=centre, radii=np.array([ru, rv, rng.uniform(0.09, 0.22)]),
                           angle=float(theta), density=rng.uniform(-420.0, -220.0),
                           consolidated=bool(rng.random() < 0.5)))
  return lesions


def _sample_anatomy(rng: np.random.Generator, covid: bool) -> _Anatomy:
  scale = rng.uniform(0.86, 1.0)
  anatomy = _Anatomy(
      scale=scale, shift=rng.uniform(-0.04, 0.04, size=2), tilt=rng.uniform(-0.06, 0.06),
      body_axes=np.array([rng.uniform(0.84, 0.92), rng.uniform(0.6, 0.68)]),
      lung_axes=np.array([rng.uniform(0.31, 0.35), rng.uniform(0.5, 0.56)]),
      lung_x=rng.uniform(0.4, 0.44),
      heart_axes=np.array([rng.uniform(0.24, 0.3), rng.uniform(0.19, 0.23)]),
      contrast=float(rng.choice([40.0, rng.uniform(150.0, 260.0)], p=[0.6, 0.4])),
      dome=(rng.uniform(0.22, 0.32), rng.uniform(0.16, 0.26)),
      rib_phase=rng.uniform(0, 1, size=(2, 6)), vessels=[], lesions=[],
      nodules=np.zeros((0, 4)), dependent=rng.uniform(0.015, 0.035) if rng.random() < 0.25 else 0.0,
      noise=rng.uniform(8.0, 30.0), blur=rng.uniform(0.4, 0.9), gas_bubble=bool(rng.random() < 0.6))
  anatomy.vessels = [_sample_tree(rng, side, anatomy) for side in (-1, 1)]
  if covid:
    anatomy.lesions = _sample_lesions(rng, anatomy)
  elif rng.random() < 0.5:
    nodules = []
    for _ in range(int(rng.integers(1, 4))):
      side = 1 if rng.random() < 0.5 else -1
      cu, cv = _lung_centre(side, anatomy)
      z = rng.uniform(0.25, 0.85)
      s = _lung_scale(z)
      ang, rad = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0.0, 0.6))
      nodules.append([cu + rad * anatomy.lung_axes[0] * s * math.cos(ang),
                      cv + rad * anatomy.lung_axes[1] * s * math.sin(ang), z,
                      rng.uniform(0.018, 0.035)])
    anatomy.nodules = np.array(nodules)
  return anatomy


def _splat(points: np.ndarray, size: int) -> np.ndarray:
  """Accumulates (u, v, weight) points onto a size x size grid."""
  image = np.zeros((size, size), np.float32)
  if len(points):
    cols = np.clip(((points[:, 0] + 1) * 0.5 * (size - 1)).round().astype(int), 0, size - 1)
    rows = np.clip(((points[:, 1] + 1) * 0.5 * (size - 1)).round().astype(int), 0, size - 1)
    np.add.at(image, (rows, cols), points[:, 2].astype(np.float32))
  return image


def _vessel_layer(anatomy: _Anatomy, z: float, slab: float, size: int) -> np.ndarray:
  """0..1 vessel occupancy at slice z: points of the trees within the slab, blurred."""
  layer = np.zeros((size, size), np.float32)
  pixel = 2.0 / size
  for big in (True, False):
    chosen = []
    for tree in anatomy.vessels:
      near = np.abs(tree[:, 2] - z) < slab + tree[:, 3]
      sel = tree[near & ((tree[:, 3] >= 0.01) == big)]
      chosen.append(sel)
    sel = np.concatenate(chosen)
    if not len(sel):
      continue
    sigma = (0.012 if big else 0.006) * anatomy.scale / pixel
    weight = np.full(len(sel), 2.0 * math.pi * max(sigma, 0.6) ** 2 / 3.0)
    uv = _to_image(sel[:, :2], anatomy)
    splat = _splat(np.column_stack([uv, weight]), size)
    layer = np.maximum(layer, cv2.GaussianBlur(splat, (0, 0), max(sigma, 0.6)))
  return np.clip(layer, 0.0, 1.0)


def _to_image(uv: np.ndarray, anatomy: _Anatomy) -> np.ndarray:
  """Anatomy coordinates -> image coordinates (patient size, position and tilt)."""
  c, s = math.cos(anatomy.tilt), math.sin(anatomy.tilt)
  u, v = uv[:, 0] * anatomy.scale, uv[:, 1] * anatomy.scale
  return np.column_stack([c * u - s * v + anatomy.shift[0], s * u + c * v + anatomy.shift[1]])


def _grid(anatomy: _Anatomy, size: int):
  """Per-pixel anatomy coordinates (inverse of `_to_image`)."""
  axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
  x, y = np.meshgrid(axis, axis)
  x, y = x - anatomy.shift[0], y - anatomy.shift[1]
  c, s = math.cos(anatomy.tilt), math.sin(anatomy.tilt)
  return (c * x + s * y) / anatomy.scale, (-s * x + c * y) / anatomy.scale


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
  field = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
  return field / (field.std() + 1e-6)


def _lungs(u, v, z: float, anatomy: _Anatomy, cavity):
  """Boolean lung masks (right, left), shaped by the cavity, heart and diaphragm domes."""
  s = _lung_scale(z)
  masks = []
  heart = _heart_scale(z)
  for side, dome in zip((-1, 1), anatomy.dome):
    if s <= 0.05:
      masks.append(np.zeros_like(u, bool))
      continue
    cu, cv = _lung_centre(side, anatomy)
    au, av = anatomy.lung_axes * s
    medial = (u - cu) * side < 0
    # D-shaped: the medial side is flatter than the lateral one.
    du = (u - cu) / np.where(medial, au * 0.8, au)
    r2 = du ** 2 + ((v - cv) / av) ** 2
    lung = (r2 < 1.0) & cavity
    if z < dome:  # The diaphragm dome rises into the lung base from below.
      depth = (dome - z) / dome
      lung &= _ellipse(u, v, cu - side * 0.02, cv - 0.06, au * (0.35 + 0.7 * depth),
                       av * (0.3 + 0.75 * depth)) > 1.0
    if heart > 0:
      lung &= _ellipse(u, v, 0.1, -0.06, anatomy.heart_axes[0] * heart * 1.15,
                       anatomy.heart_axes[1] * heart * 1.2, -0.5) > 1.0
    masks.append(lung)
  return masks


def _lesion_field(u, v, z: float, anatomy: _Anatomy, texture: np.ndarray):
  """(ground-glass strength 0..1, consolidation strength 0..1) at slice z."""
  ggo = np.zeros_like(u)
  dense = np.zeros_like(u)
  density = np.full_like(u, -430.0)
  for lesion in anatomy.lesions:
    dz = (z - lesion.centre[2]) / lesion.radii[2]
    if abs(dz) >= 1.6:
      continue
    q = _ellipse(u, v, lesion.centre[0], lesion.centre[1], lesion.radii[0], lesion.radii[1],
                 lesion.angle) + dz ** 2
    # A hazy plateau with soft edges, patchy inside.
    strength = (1.0 / (1.0 + np.exp(np.minimum(6.0 * (q - 0.75), 30.0)))) * (0.8 + 0.25 * texture)
    density = np.where(strength > ggo, lesion.density, density)
    ggo = np.maximum(ggo, strength)
    if lesion.consolidated:
      core = 1.0 / (1.0 + np.exp(np.minimum(8.0 * (q - 0.3), 30.0)))
      dense = np.maximum(dense, np.clip(core * (0.8 + 0.4 * texture), 0.0, 1.0))
  return np.clip(ggo, 0.0, 1.0), dense, density


def _render_slice(anatomy: _Anatomy, z: float, slab: float, size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One axial slice: (HU float32 [size, size], opacity mask bool)."""
  u, v = _grid(anatomy, size)
  hu = np.full((size, size), AIR, np.float32)
  ba, bb = anatomy.body_axes
  ba = ba * (1.0 + 0.06 * max(z - 0.7, 0.0) / 0.3)  # Shoulders widen the apical slices.
  body = _ellipse(u, v, 0.0, 0.04, ba, bb)
  hu[body < 1.0] = SOFT
  hu[(body < 1.0) & (body > 0.86)] = FAT
  # Table under the patient.
  hu[(np.abs(v - (0.04 + bb + 0.07)) < 0.018) & (np.abs(u) < 0.85)] = 120.0
  cavity = _ellipse(u, v, 0.0, 0.05, ba - 0.08, bb - 0.07) < 1.0

  # Ribs: cross-sections along the cavity wall, coming and going with z.
  for side in (-1, 1):
    for k, phase in enumerate(anatomy.rib_phase[(side + 1) // 2]):
      if math.sin(2 * math.pi * (z * 5.5 + phase)) < 0.1:
        continue
      theta = math.pi / 2 - side * (0.45 + k * 0.42)
      ru, rv = (ba - 0.06), (bb - 0.05)
      cu, cv = ru * math.cos(theta), 0.05 + rv * math.sin(theta)
      r = _ellipse(u, v, cu, cv, 0.045, 0.022, theta + math.pi / 2)
      hu[r < 1.0] = CORTEX
      hu[r < 0.35] = MARROW
  # Sternum (anterior) and spine (posterior).
  if z > 0.3:
    st = _ellipse(u, v, 0.0, 0.04 - bb + 0.07, 0.08, 0.03)
    hu[st < 1.0] = 450.0
  vert = _ellipse(u, v, 0.0, 0.36, 0.1, 0.09)
  hu[vert < 1.0] = CORTEX
  hu[vert < 0.7] = MARROW
  for cu, cv, au, av in ((0.0, 0.6, 0.03, 0.07), (-0.11, 0.5, 0.07, 0.025), (0.11, 0.5, 0.07, 0.025)):
    hu[_ellipse(u, v, cu, cv, au, av) < 1.0] = CORTEX * 0.8
  hu[_ellipse(u, v, 0.0, 0.5, 0.045, 0.04) < 1.0] = 15.0  # Spinal canal.

  lungs = _lungs(u, v, z, anatomy, cavity)
  lung = lungs[0] | lungs[1]
  texture = _smooth_noise(rng, size, size / 40)
  gravity = np.clip((v + 0.4) / 0.9, 0.0, 1.0)
  parenchyma = LUNG + 18.0 * texture + 45.0 * gravity
  if anatomy.dependent:
    for side, mask in zip((-1, 1), lungs):
      cu, cv = _lung_centre(side, anatomy)
      s = _lung_scale(z)
      r2 = _ellipse(u, v, cu, cv, anatomy.lung_axes[0] * s, anatomy.lung_axes[1] * s)
      band = mask & (r2 > (1.0 - anatomy.dependent / max(s, 0.2)) ** 2) & (v > cv + 0.2 * s)
      parenchyma = np.where(band, -560.0 + 40.0 * texture, parenchyma)

  ggo, dense, density = _lesion_field(u, v, z, anatomy, texture)
  lesion_hu = parenchyma + ggo * (density - parenchyma)
  lesion_hu = lesion_hu + dense * (15.0 + 10.0 * texture - lesion_hu)
  lung_hu = np.where(lung, lesion_hu, 0.0)
  mask = lung & (ggo > 0.3)

  vessels = _vessel_layer(anatomy, z, slab, size)
  lung_hu = lung_hu + vessels * (anatomy.contrast * 0.3 + 30.0 - lung_hu)
  for nu, nv, nz, nr in anatomy.nodules:
    dz = (z - nz) / nr
    if abs(dz) < 1.0:
      rr = nr * math.sqrt(1.0 - dz ** 2)
      d = np.sqrt((u - nu) ** 2 + (v - nv) ** 2) / rr
      lung_hu = np.where(lung & (d < 1.0), 25.0, lung_hu)
  hu = np.where(lung, lung_hu, hu)

  # Mediastinum: heart, great vessels, airways; liver and stomach under the domes.
  heart = _heart_scale(z)
  if heart > 0:
    h = _ellipse(u, v, 0.1, -0.06, anatomy.heart_axes[0] * heart, anatomy.heart_axes[1] * heart, -0.5)
    hu[(h < 1.0) & (h > 0.8)] = -80.0  # Epicardial fat.
    hu[h < 0.8] = anatomy.contrast
    hu[h < 0.25] = SOFT
  blood = [(0.12, 0.26, 0.055, 0.0, 0.85)]  # Descending aorta.
  blood += [(-0.03, -0.1, 0.06, 0.45, 0.72), (0.09, -0.14, 0.06, 0.5, 0.62),
            (-0.12, -0.13, 0.04, 0.5, 0.9)]  # Ascending aorta, pulmonary trunk, vena cava.
  for cu, cv, r, z0, z1 in blood:
    if z0 <= z <= z1:
      hu[_ellipse(u, v, cu, cv, r, r) < 1.0] = anatomy.contrast
  if 0.72 < z < 0.78:  # Aortic arch.
    hu[_ellipse(u, v, 0.04, 0.08, 0.06, 0.2, -0.5) < 1.0] = anatomy.contrast
  if z > 0.6:
    hu[_ellipse(u, v, 0.0, 0.05, 0.055, 0.05) < 1.0] = AIR  # Trachea.
  elif z > 0.48:
    spread = 0.03 + (0.6 - z) * 1.3
    for side in (-1, 1):
      hu[_ellipse(u, v, side * spread, 0.07, 0.035, 0.03) < 1.0] = AIR  # Main bronchi.
  hu[_ellipse(u, v, 0.03, 0.22, 0.025, 0.02) < 1.0] = -300.0  # Oesophagus with a little air.
  if z < anatomy.dome[0]:
    depth = (anatomy.dome[0] - z) / anatomy.dome[0]
    liver = _ellipse(u, v, -0.2, 0.0, 0.3 + 0.35 * depth, 0.3 + 0.2 * depth) < 1.0
    hu[liver & cavity & ~lung] = LIVER
  if anatomy.gas_bubble and z < anatomy.dome[1] * 0.8:
    hu[_ellipse(u, v, 0.3, -0.12, 0.08, 0.05) < 1.0] = AIR  # Gas in the stomach.

  hu = cv2.GaussianBlur(hu, (0, 0), anatomy.blur * size / 128)
  hu += rng.normal(0.0, anatomy.noise, size=hu.shape).astype(np.float32)
  return hu, mask


def _lesion_coverage(anatomy: _Anatomy, zs: np.ndarray) -> float:
  return float(np.mean([any(abs(z - l.centre[2]) < 0.8 * l.radii[2] for l in anatomy.lesions)
                        for z in zs]))


def synthetic_scan(seed: int, *, covid: bool, num_slices: int = 24, slice_size: int = 128,
                   scan_id: str = "synthetic", window=DEFAULT_WINDOW,
                   lesion_fraction: float = 1.0) -> tuple[Scan, np.ndarray]:
  """One synthetic scan and its opacity mask (bool `[n, h, w]`, all False for non-COVID).

  lesion_fraction < 1 (COVID scans): the opacities sit only in a band of max(1, round(f * n)) consecutive
  slices at a random height (every lesion moved into the band; slices outside it rendered without them), so
  only a few slices of the scan carry the finding (issue 13's collection). 1.0: opacities over most slices.
  """
  if not 0.0 < lesion_fraction <= 1.0:
    raise ValueError(f"lesion_fraction must be in (0, 1], got {lesion_fraction}")
  rng = np.random.default_rng(seed)
  anatomy = _sample_anatomy(rng, covid)
  z_lo, z_hi = rng.uniform(0.0, 0.08), rng.uniform(0.9, 1.0)
  zs = np.linspace(z_lo, z_hi, num_slices)
  if covid:
    # Opacities span most slices, as in moderate COVID-19 pneumonia.
    for _ in range(20):
      if _lesion_coverage(anatomy, zs) >= 0.7:
        break
      anatomy.lesions = _sample_lesions(rng, anatomy)
  slab = 0.5 * (z_hi - z_lo) / max(num_slices - 1, 1)
  band = range(num_slices)
  if covid and lesion_fraction < 1.0:
    count = max(1, int(round(lesion_fraction * num_slices)))
    first = int(rng.integers(0, num_slices - count + 1))
    band = range(first, first + count)
    lo, hi = float(zs[band[0]]), float(zs[band[-1]])
    for lesion in anatomy.lesions:  # centred inside the band, long enough along z to reach its ends
      lesion.centre[2] = rng.uniform(lo, hi)
      lesion.radii[2] = max(hi - lesion.centre[2], lesion.centre[2] - lo) / 0.8 + 2 * slab
  lesions = anatomy.lesions
  slices, masks = [], []
  for i, z in enumerate(zs):
    anatomy.lesions = lesions if i in band else []
    hu, mask = _render_slice(anatomy, float(z), slab, slice_size, rng)
    slices.append(window_to_uint8(hu, window))
    masks.append(mask)
  scan = Scan(slices=np.stack(slices), scan_id=scan_id, label=int(covid), path=None)
  return scan, np.stack(masks)


def _write_jpegs(slices: np.ndarray, folder: Path, quality: int) -> None:
  folder.mkdir(parents=True)
  for i, image in enumerate(slices):
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
      raise OSError(f"could not encode slice {i} for {folder}")
    (folder / f"{i}.jpg").write_bytes(data.tobytes())


def _plan(num_scans, seed: int):
  """(split, class folder or None, scan_id, covid) for every scan, in a fixed order."""
  rng = np.random.default_rng([seed, 1])
  plan, k = [], 0
  for split in ("train", "validation"):
    covid, noncovid = num_scans.get(split, (0, 0))
    for label, count in ((1, covid), (0, noncovid)):
      for _ in range(count):
        plan.append((split, "covid" if label else "non-covid", f"ct_scan_{k}", bool(label)))
        k += 1
  n_test = int(num_scans.get("test", 0))
  test_labels = rng.permutation(np.arange(n_test) < (n_test + 1) // 2)
  for i, covid in enumerate(test_labels):
    plan.append(("test", None, f"test_ct_scan_{i}", bool(covid)))
  return plan


def write_collection(root, *, num_scans=None, slice_size=128, num_slices=(16, 32), seed: int = 0,
                     jpeg_quality: int = 92, progress: bool = True, lesion_fraction: float = 1.0) -> Path:
  """Writes a COV19-CT-DB-layout collection of synthetic scans under `root`; returns root.

  Layout: `<root>/{train,validation}/{covid,non-covid}/<scan_id>/<i>.jpg`, unlabelled
  `<root>/test/<scan_id>/<i>.jpg`; ground truth beside it, outside the scan folders:
  `<root>/_masks/<split>/<scan_id>.npz` (key "mask", bool `[n, h, w]`, COVID scans only) and
  `<root>/_labels/test.csv` (scan_id,label).

  Args:
    num_scans: {"train": (covid, non_covid), "validation": (covid, non_covid), "test": n}.
    slice_size: pixels per side, or a sequence to draw each scan's size from.
    num_slices: (min, max) slices per scan, inclusive.
    lesion_fraction: the share of a COVID scan's slices that carry opacities (synthetic_scan); 1.0: most.
  """
  root = Path(root)
  if root.exists() and any(root.iterdir()):
    raise FileExistsError(f"{root}: already exists and is not empty")
  num_scans = DEFAULT_NUM_SCANS if num_scans is None else num_scans
  sizes = [slice_size] if isinstance(slice_size, int) else list(slice_size)
  plan = _plan(num_scans, seed)
  root.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
  try:
    truth = []
    for index, (split, class_dir, scan_id, covid) in enumerate(
        tqdm(plan, desc="synthetic CT scans", disable=not progress)):
      rng = np.random.default_rng([seed, 2, index])
      n = int(rng.integers(num_slices[0], num_slices[1] + 1))
      size = int(sizes[int(rng.integers(len(sizes)))])
      scan, mask = synthetic_scan(int(rng.integers(2 ** 31)), covid=covid, num_slices=n,
                                  slice_size=size, scan_id=scan_id, lesion_fraction=lesion_fraction)
      folder = staging / split / class_dir / scan_id if class_dir else staging / split / scan_id
      _write_jpegs(scan.slices, folder, jpeg_quality)
      if covid:
        mask_file = staging / "_masks" / split / f"{scan_id}.npz"
        mask_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(mask_file, mask=mask)
      if split == "test":
        truth.append((scan_id, int(covid)))
    if truth:
      (staging / "_labels").mkdir()
      with open(staging / "_labels" / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([("scan_id", "label"), *truth])
    if root.exists():
      root.rmdir()
    os.replace(staging, root)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return root


def load_mask(root, split: str, scan_id: str) -> np.ndarray:
  """Ground-truth opacity mask of a synthetic COVID scan, bool `[n, h, w]`."""
  with np.load(Path(root) / "_masks" / split / f"{scan_id}.npz") as f:
    return f["mask"]


def write_dicom_series(scan: Scan, folder, *, window=DEFAULT_WINDOW, pixel_spacing=0.7,
                       slice_spacing: float = 5.0, first_z: float = -400.0,
                       series_uid: str | None = None, transfer_syntax=None, rescale_slope: float = 1.0,
                       rescale_intercept: float = -1024.0) -> list[Path]:
  """Writes `scan` as one axial DICOM series (one file per slice), returns the files.

  Pixels are HU (inverse of the window) stored as int16 (HU - intercept) / slope, rounded, with
  RescaleSlope `rescale_slope` (1) and RescaleIntercept `rescale_intercept` (-1024). Slice i sits
  at z = first_z + i * slice_spacing (superior as i grows) while InstanceNumber counts from the
  top down, as many scanners do, so readers must order by position. `pixel_spacing`: one value or
  (between rows, between columns) in mm, as DICOM's PixelSpacing. `transfer_syntax`: a pydicom
  UID to compress with (e.g. RLELossless, JPEG2000Lossless); default uncompressed Explicit VR
  Little Endian.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  series_uid = series_uid or generate_uid()
  study_uid = generate_uid()
  n, rows, cols = scan.slices.shape
  stored = np.rint((uint8_to_hu(scan.slices, window) - rescale_intercept) / rescale_slope)
  if stored.min() < -2 ** 15 or stored.max() >= 2 ** 15:
    raise ValueError(f"RescaleSlope {rescale_slope} / RescaleIntercept {rescale_intercept} put stored values "
                     f"at {stored.min():g}..{stored.max():g}, outside int16")
  stored = stored.astype(np.int16)
  row_spacing, col_spacing = (pixel_spacing, pixel_spacing) if np.isscalar(pixel_spacing) else pixel_spacing
  files = []
  for i in range(n):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "CT", scan.scan_id, "Synthetic^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesNumber, ds.InstanceNumber = 1, n - i
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.ImagePositionPatient = [-(cols - 1) / 2 * col_spacing, -(rows - 1) / 2 * row_spacing,
                               first_z + i * slice_spacing]
    ds.PixelSpacing = [row_spacing, col_spacing]
    ds.SliceThickness = slice_spacing
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = rescale_slope, rescale_intercept, "HU"
    ds.PixelData = stored[i].tobytes()
    if transfer_syntax is not None:
      ds.compress(transfer_syntax, stored[i])
    path = folder / f"{i:04d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    files.append(path)
  return files


def write_nifti(scan: Scan, file, *, window=DEFAULT_WINDOW, voxel_size=(0.7, 0.7, 5.0),
                orientation: str = "RAS") -> Path:
  """Writes `scan` as an int16 HU NIfTI volume with axis codes `orientation` (e.g. "LPS").

  Voxel axes are laid out so that a reader reorienting to RAS+ gets `scan.slices` back.
  """
  file = Path(file)
  hu = np.rint(uint8_to_hu(scan.slices, window)).astype(np.int16)
  ras = np.ascontiguousarray(hu[:, ::-1, ::-1].transpose(2, 1, 0))  # Inverse of the reader.
  affine = np.diag([*voxel_size, 1.0])
  image = nib.Nifti1Image(ras, affine)
  target = nib.orientations.axcodes2ornt(tuple(orientation))
  image = image.as_reoriented(nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt(("R", "A", "S")), target))
  image.set_data_dtype(np.int16)
  file.parent.mkdir(parents=True, exist_ok=True)
  suffix = ".nii.gz" if file.name.endswith(".gz") else ".nii"
  partial = file.with_name(f".{file.name}.partial{suffix}")
  nib.save(image, partial)
  os.replace(partial, file)
  return file
