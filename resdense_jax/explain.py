"""Explaining a scan's prediction: class activation maps over its slices, as PNG figures.

    python -m resdense_jax.explain --checkpoint=runs/demo --scan=/data/scan_folder --out=explanations/
    python -m resdense_jax.explain ... --method=gradcam --layer=resnet101

writes into --out:

  top_1_slice_<i>.png ...   the slices pushing most towards COVID (highest P(COVID)): the slice, and the slice
                            with its activation map laid over it
  montage.png               every slice of the scan with its map and its P(COVID); red frames: above threshold
  slice_probabilities.png   P(COVID) of each slice along the body axis, with the scan score and threshold
  maps.npz                  the numbers behind the figures: `maps` (float32 [n, h, w], each slice's map at the
                            slice's resolution), `slice_probs`, `p_covid`, `threshold`, `method`, `layer`
                            (with a scan head, config.model.scan_head attention / transformer: also
                            `slice_weights`, each slice's attention weight; p_covid is the head's scan score,
                            the top slices are those with the most attention, and the plot shows the weights)

The default map is the CAM of the fused feature map (resdense_jax/cam.py): the head's COVID weights projected
onto the added ResNet + DenseNet features before pooling, i.e. each location's contribution to the COVID logit.

The scan is read as the checkpoint's training run read it (`Predictor.read`): with `config.data.lung_crop` the
figures and maps show each slice's lung crop, with `drop_lungless_slices` only the slices kept; slices of other
sizes than the scan's most common one are shown resized to it (with a warning naming them).

With test-time augmentation (`--tta=flip`, or the checkpoint's config.eval.tta) the probabilities are the
mean over each slice and its left-right mirror, as `predict` computes them, and each map is the mean of the
slice's map and the mirrored slice's map mirrored back.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import tempfile
from typing import Sequence

import numpy as np
from absl import flags

from resdense_jax import cam, compilation_cache, cpu_flags, data, plotting, predict
from resdense_jax.data import augment

METHODS = ("cam", "gradcam")


@dataclasses.dataclass
class ScanExplanation:
  """A scan, its slice probabilities and one activation map per slice at the slice's own resolution."""
  scan: object  # data.Scan
  slice_probs: np.ndarray
  p_covid: float
  maps: np.ndarray  # float32 [n, h, w]; CAM: logit contribution (signed); Grad-CAM: >= 0
  method: str
  threshold: float
  layer: str | None = None
  # A scan head's (config.model.scan_head attention / transformer) attention weight of each slice; None: mean.
  slice_weights: np.ndarray | None = None

  def top_slices(self, k: int) -> np.ndarray:
    """Indices of the k slices with the highest P(COVID) (with a scan head: the most attention), highest first."""
    ranking = self.slice_probs if self.slice_weights is None else self.slice_weights
    return np.argsort(-np.asarray(ranking), kind="stable")[:k]


def _map_fn(predictor, method: str, layer: str | None):
  """The jit-compiled map function for this predictor's model, made once per (method, layer)."""
  cache = predictor.__dict__.setdefault("_explain_fns", {})
  key = (method, layer)
  if key not in cache:
    if method == "cam":
      cache[key] = cam.compiled(cam.class_activation_maps, predictor.model)
    elif method == "gradcam":
      cache[key] = cam.compiled(cam.grad_cam, predictor.model, layer=layer)
    else:
      raise ValueError(f"unknown explanation method {method!r}; choose one of {METHODS}")
  return cache[key]


def activation_maps(predictor, slices, *, method: str = "cam", layer: str | None = None, shape=None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(maps [n, h, w] upsampled to `shape` (default: the first slice's size), P(COVID) [n]) of uint8 [h, w]
  slices (an array [n, h, w], or a list whose sizes may differ)."""
  if method == "gradcam" and not layer:
    layer = predictor.model.backbones[0]
  fn = _map_fn(predictor, method, layer)
  shape = tuple(shape or np.shape(slices[0]))
  mode = predictor.read_options.resize
  maps, probs = [], []
  for start in range(0, len(slices), predictor.batch_size):
    images = predictor.model_inputs(slices[start:start + predictor.batch_size])
    count = len(images)
    images = np.concatenate([images, np.zeros((predictor.batch_size - count, *images.shape[1:]), np.uint8)])
    out = fn(predictor.variables, images)
    heat, prob = out["cam"][:count], out["prob"][:count]
    if getattr(predictor, "tta", "none") == "flip":  # the mirror's map, mirrored back onto the slice
      mirrored = fn(predictor.variables, images[:, :, ::-1])
      heat = (heat + mirrored["cam"][:count, :, ::-1]) / 2
      prob = (prob + mirrored["prob"][:count]) / 2
    maps.append(_on_slices(heat, slices[start:start + count], shape, predictor.image_size, mode))
    probs.append(np.asarray(prob, np.float32))
  return np.concatenate(maps), np.concatenate(probs)


def _on_slices(heat, slices, shape, image_size: int, mode: str) -> np.ndarray:
  """Maps over the model input [n, s, s] -> over the slices, upsampled to `shape`. With resize "pad" the
  input holds the slice inside a padded square: each map is first brought to the input's size and cut to the
  box the slice fills (augment.content_box), so the overlay lines up with the slice, not the padding."""
  if mode == "squash":
    return np.asarray(cam.upsample(heat, shape))
  full = np.asarray(cam.upsample(heat, (image_size, image_size)))
  out = []
  for one, image in zip(full, slices):
    y0, x0, y1, x1 = augment.content_box(np.shape(image), image_size, mode)
    out.append(np.asarray(cam.upsample(one[None, y0:y1, x0:x1], shape))[0])
  return np.stack(out)


def explain_scan(predictor, scan_or_path, *, method: str = "cam", layer: str | None = None) -> ScanExplanation:
  """Slice probabilities, the scan's score and an activation map of every slice."""
  read = predictor.read(scan_or_path)  # the training run's reading path (lung crop included)
  scan = read.to_scan()  # the slices as read and cropped, before resizing: what the figures show
  if method == "gradcam" and not layer:
    layer = predictor.model.backbones[0]
  maps, probs = activation_maps(predictor, read.slices, method=method, layer=layer, shape=scan.slices.shape[1:])
  if getattr(predictor, "scan_inference", None) is not None:  # a scan head: its score and attention weights
    p_covid, weights, probs = predictor.scan_head_scores(read)
    return ScanExplanation(scan=scan, slice_probs=probs, p_covid=p_covid, maps=maps, method=method,
                           threshold=predictor.threshold, layer=layer, slice_weights=weights)
  return ScanExplanation(scan=scan, slice_probs=probs, p_covid=predictor.scan_score(probs), maps=maps,
                         method=method, threshold=predictor.threshold, layer=layer)


# ----------------------------------------------------------------------------------------------- figures


def _map_label(explanation: ScanExplanation) -> str:
  if explanation.method == "cam":
    return "CAM: contribution to the COVID logit"
  return f"Grad-CAM at {explanation.layer} (a.u.)"


def _overlay_scale(explanation: ScanExplanation) -> float:
  """One colour scale for the whole scan (slices comparable): the 99.5th percentile of the positive map."""
  positive = explanation.maps[explanation.maps > 0]
  return float(np.percentile(positive, 99.5)) if positive.size else 1.0


def _overlay(ax, image: np.ndarray, heat: np.ndarray, vmax: float):
  """Grey slice with the positive part of the map over it, transparent where the map is ~0."""
  ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  shown = np.ma.masked_less_equal(np.maximum(heat, 0.0), 0.05 * vmax)
  artist = ax.imshow(shown, cmap="inferno", vmin=0.0, vmax=vmax, alpha=0.55, interpolation="bilinear")
  ax.set_xticks([])
  ax.set_yticks([])
  return artist


def _title(explanation: ScanExplanation) -> str:
  verdict = "COVID" if explanation.p_covid > explanation.threshold else "non-COVID"
  return (f"{explanation.scan.scan_id}: P(COVID) {explanation.p_covid:.3f} -> {verdict} "
          f"(threshold {explanation.threshold:g})")


def plot_top_slice(explanation: ScanExplanation, index: int, rank: int, path) -> pathlib.Path:
  """One slice: as read, and with its activation map, with a colour bar."""
  plt = plotting.pyplot()
  vmax = _overlay_scale(explanation)
  image = explanation.scan.slices[index]
  fig, (ax_raw, ax_map) = plt.subplots(1, 2, figsize=(9, 4.8), dpi=110)
  ax_raw.imshow(image, cmap="gray", vmin=0, vmax=255)
  ax_raw.set_title(f"slice {index} of {len(explanation.slice_probs)}")
  ax_raw.set_xticks([])
  ax_raw.set_yticks([])
  artist = _overlay(ax_map, image, explanation.maps[index], vmax)
  if explanation.slice_weights is None:
    ax_map.set_title(f"P(COVID) {explanation.slice_probs[index]:.3f} (rank {rank} in the scan)")
  else:
    ax_map.set_title(f"attention {explanation.slice_weights[index]:.3f} (rank {rank}), "
                     f"P(COVID) {explanation.slice_probs[index]:.3f}")
  fig.colorbar(artist, ax=ax_map, fraction=0.046, pad=0.03, label=_map_label(explanation))
  fig.suptitle(_title(explanation), fontsize=10)
  return plotting.save_figure(fig, path)


def plot_montage(explanation: ScanExplanation, path, *, columns: int | None = None) -> pathlib.Path:
  """Every slice with its map and P(COVID), in body-axis order; red frames mark slices above threshold."""
  plt = plotting.pyplot()
  n = len(explanation.slice_probs)
  columns = min(columns or (8 if n <= 64 else 12), n)
  rows = -(-n // columns)
  cell = 1.6 if n <= 96 else 1.1
  fig, axes = plt.subplots(rows, columns, figsize=(columns * cell, rows * cell + 0.9), dpi=100, squeeze=False)
  vmax = _overlay_scale(explanation)
  artist = None
  for i, ax in enumerate(axes.flat):
    if i >= n:
      ax.axis("off")
      continue
    artist = _overlay(ax, explanation.scan.slices[i], explanation.maps[i], vmax)
    above = explanation.slice_probs[i] > explanation.threshold
    weight = "" if explanation.slice_weights is None else f" a{explanation.slice_weights[i]:.2f}"
    ax.set_title(f"{i}: {explanation.slice_probs[i]:.2f}{weight}", fontsize=7, color="red" if above else "black",
                 pad=2)
    for spine in ax.spines.values():
      spine.set_edgecolor("red" if above else "lightgrey")
      spine.set_linewidth(2.0 if above else 0.5)
  height = rows * cell + 0.9
  fig.subplots_adjust(top=1.0 - 0.75 / height, bottom=0.02, left=0.02, right=0.9, hspace=0.3, wspace=0.08)
  fig.suptitle(f"{_title(explanation)}\nslice index: P(COVID); red: above threshold", fontsize=10,
               y=1.0 - 0.1 / height)
  fig.colorbar(artist, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label=_map_label(explanation))
  return plotting.save_figure(fig, path)


def plot_slice_probabilities(explanation: ScanExplanation, path, *, top: Sequence[int] = ()) -> pathlib.Path:
  """P(COVID) per slice along the body axis, the scan score, the threshold and the top slices."""
  plt = plotting.pyplot()
  probs = explanation.slice_probs
  index = np.arange(len(probs))
  fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
  ax.fill_between(index, probs, color="tab:red", alpha=0.15)
  ax.plot(index, probs, "o-", color="tab:red", markersize=3, label="slice P(COVID)")
  ax.axhline(explanation.p_covid, color="black", linewidth=1.2, label=f"scan score {explanation.p_covid:.3f}")
  ax.axhline(explanation.threshold, color="grey", linestyle="--", linewidth=1,
             label=f"threshold {explanation.threshold:g}")
  if explanation.slice_weights is not None:  # beside each slice's probability, the attention it gets
    ax.bar(index, explanation.slice_weights, width=0.8, color="tab:blue", alpha=0.35, label="attention weight")
  if len(top):
    ax.plot(top, probs[list(top)], "*", color="gold", markeredgecolor="black", markersize=12,
            label="slices shown", linestyle="none")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlim(-0.5, len(probs) - 0.5)
  ax.set_xlabel("slice index along the body axis (DICOM / NIfTI: inferior -> superior; images: file order)")
  ax.set_ylabel("P(COVID)")
  ax.set_title(_title(explanation), fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8, framealpha=0.9)
  return plotting.save_figure(fig, path)


def save_maps(explanation: ScanExplanation, path) -> pathlib.Path:
  """The maps and probabilities behind the figures as an .npz, written beside `path` and renamed over it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, maps=np.asarray(explanation.maps, np.float32),
               slice_probs=np.asarray(explanation.slice_probs, np.float32), p_covid=explanation.p_covid,
               threshold=explanation.threshold, method=explanation.method, layer=explanation.layer or "",
               **({} if explanation.slice_weights is None else
                  {"slice_weights": np.asarray(explanation.slice_weights, np.float32)}))
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def write_explanation(explanation: ScanExplanation, out_dir, *, top_k: int = 4) -> dict[str, list[pathlib.Path]]:
  """All figures of one scan, and maps.npz, into `out_dir`; returns {"top_slices": [...], "montage": [...],
  "plot": [...], "maps": [...]}."""
  out = pathlib.Path(out_dir)
  top = [int(i) for i in explanation.top_slices(top_k)]
  paths = {"top_slices": [plot_top_slice(explanation, i, rank, out / f"top_{rank}_slice_{i}.png")
                          for rank, i in enumerate(top, 1)]}
  paths["montage"] = [plot_montage(explanation, out / "montage.png")]
  paths["plot"] = [plot_slice_probabilities(explanation, out / "slice_probabilities.png", top=top)]
  paths["maps"] = [save_maps(explanation, out / "maps.npz")]
  return paths


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "A training workdir, its checkpoints/ folder, or one step folder.",
                      flag_values=fv)
  flags.DEFINE_string("scan", None, "One scan: slice-image folder, DICOM series folder or NIfTI file.",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "Folder for the PNGs.", flag_values=fv)
  flags.DEFINE_enum("method", "cam", list(METHODS), "cam (fused feature map, the paper's head) or gradcam.",
                    flag_values=fv)
  flags.DEFINE_string("layer", None, "Grad-CAM layer (module path), e.g. resnet101, densenet121, "
                      "resnet101/conv5_block3_3_conv; default: the first backbone's final feature map.",
                      flag_values=fv)
  flags.DEFINE_integer("top_k", 4, "How many of the most COVID-like slices get their own figure.", flag_values=fv)
  flags.DEFINE_float("threshold", None, "COVID threshold; default: the checkpoint's.", flag_values=fv)
  flags.DEFINE_enum("aggregation", None, ["mean", "vote"], "Scan rule; default: the checkpoint's.",
                    flag_values=fv)
  flags.DEFINE_enum("tta", None, ["none", "flip"], "Test-time augmentation: flip = mean over each slice and its "
                    "mirror (maps too); default: the checkpoint's config.eval.tta.", flag_values=fv)
  flags.DEFINE_boolean("cpu_ynnpack", False, "XLA's YNNPACK convolution fusions on CPU (default off: Eigen's "
                       "convolutions, faster on the machines measured; resdense_jax/cpu_flags.py).", flag_values=fv)
  flags.DEFINE_string("compilation_cache_dir", compilation_cache.DEFAULT_DIR, "Persistent XLA compilation "
                      "cache (a second run reads its compiled programs back); empty: off.", flag_values=fv)
  flags.mark_flags_as_required(["checkpoint", "scan", "out"], flag_values=fv)
  try:
    extra = fv(list(argv))[1:]
    if extra:
      raise flags.Error(f"unexpected arguments: {' '.join(extra)}")
  except flags.Error as error:
    print(f"error: {error}\nusage: python -m resdense_jax.explain --checkpoint=DIR --scan=PATH --out=DIR "
          "[--method=cam|gradcam] [--layer=NAME] [--top_k=4]", file=sys.stderr)
    return 2
  try:
    data.SliceReader(fv.scan)  # a missing or unreadable scan fails here, before the checkpoint loads
  except (OSError, ValueError) as error:
    print(f"error: cannot read the scan: {error}", file=sys.stderr)
    return 1
  cpu_flags.set_ynnpack(fv.cpu_ynnpack)  # before anything starts a JAX backend
  compilation_cache.enable(fv.compilation_cache_dir)
  predictor = predict.Predictor.from_checkpoint(fv.checkpoint, aggregation=fv.aggregation, threshold=fv.threshold,
                                                tta=fv.tta)
  try:
    explanation = explain_scan(predictor, fv.scan, method=fv.method, layer=fv.layer)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  paths = write_explanation(explanation, fv.out, top_k=fv.top_k)
  print(_title(explanation))
  for group in paths.values():
    for path in group:
      print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("MPLBACKEND", "Agg")
  sys.exit(main(sys.argv))
