"""Phase 1 from cached backbone features (issue 10, `config.train.cache_frozen_features` = K views per slice).

While every backbone parameter is frozen and every backbone BatchNorm runs in inference mode (`check`), the
backbones are a fixed function of the image. `build` runs them once over K augmented views of every training
slice and keeps their final feature maps in host memory (or in memory-mapped files); the head (fusion convs,
add, pooling, dropout, Dense) then trains on those (`head_train_step`, the same step as `train.train_step`
with the backbones' forward pass taken out). Building costs K forward passes over the training slices; each
phase step after that costs the head alone.

Trade-off: the train pipeline draws a fresh flip and rotation for every slice in every epoch; the cache holds a
finite set of K augmented views per slice, drawn once (from (seed, view, scan, slice), so a rebuild after a
restart is identical). Every view is augmented as the pipeline augments (none is left plain), so an entry is
a draw from the pipeline's own distribution. With K equal to the phase's epochs the head sees as many distinct
augmented images as the pipeline would show it, each once; with fewer, each view comes back epochs / K times.
With `config.data.augment` off the views would be identical: one is built.

Memory: slices x K x sum over backbones of (h x w x channels) x bytes per value (4 for float32, the default;
bfloat16 storage is lossless for a model that computes in bfloat16). The paper's ResNet101 + DenseNet121 at
256 px give 8 x 8 x (2048 + 1024) values, 768 KiB per (slice, view) in float32: 100,000 slices x 1 view is
73 GiB, which is what `directory=` (np.memmap files) is for.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resdense_jax import data, losses, optim
from resdense_jax.data import augment as augment_lib

# Storage dtypes by name (the manifest of a disk cache records the name).
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(jnp.bfloat16)}
# Tags the augmentation draws of cached views apart from any other stream seeded from config.seed.
_VIEW_STREAM = 0xCAC4E
_MANIFEST = "manifest.json"
_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ validity


def check(model, labels) -> None:
  """Raises ValueError, naming the first offender, unless the phase leaves the backbones a fixed function:
  every backbone parameter labelled optim.FROZEN and every backbone BatchNorm in inference mode (the phase
  model's `frozen_bn` lists it, or `backbone_bn_inference`). `model`: the phase's ResDenseNet; `labels`: its
  optim.freeze_labels tree (train.create_phase builds both)."""
  flat = traverse_util.flatten_dict(labels)
  for name in model.backbones:
    paths = sorted(path for path in flat if path[0] == name)
    if not paths:
      raise ValueError(f"feature cache: the freezing labels have no parameters of backbone {name}")
    trainable = [path for path in paths if flat[path] != optim.FROZEN]
    if trainable:
      raise ValueError(f"feature cache: {'/'.join(trainable[0])} is trainable in this phase ({len(trainable)} "
                       f"trainable parameters in {name}); cached features need every backbone parameter frozen "
                       "(freeze rule 'backbones')")
  if model.backbone_bn_inference:
    return
  frozen_bn = dict(model.frozen_bn)
  for name, layers in model.keras_layers().items():
    inference = set(frozen_bn.get(name, ()))
    training = [layer.name for layer in layers if layer.class_name == "BatchNormalization"
                and layer.name not in inference]
    if training:
      raise ValueError(f"feature cache: BatchNorm {name}/{training[0]} runs in training mode in this phase "
                       f"({len(training)} such layers in {name}); cached features need every backbone BatchNorm "
                       "in inference mode (frozen_bn from train.create_phase, or backbone_bn_inference)")


def applies(model, labels) -> bool:
  """Whether `check` passes: cached backbone features equal what this phase's backbones compute."""
  try:
    check(model, labels)
  except ValueError:
    return False
  return True


# ------------------------------------------------------------------------------------------------ the cache


@dataclasses.dataclass
class FeatureCache:
  """Backbone feature maps of K views per training slice, and the batches the head trains on.

  Entry e is view e % num_views of slice e // num_views, slice s being (scan_index, slice_index) =
  `slices[s]` of the source. `valid` is False for the entries of slices that could not be read (never batched).
  """
  features: dict[str, np.ndarray]  # {backbone name: [entries, h, w, channels]}
  labels: np.ndarray               # int32 [entries], the slice's scan label
  slices: np.ndarray               # int32 [slices, 2]
  valid: np.ndarray                # bool [entries]
  num_views: int
  batch_size: int
  seed: int
  loaded: bool = False             # read back from a disk cache instead of computed

  def __post_init__(self):
    self._usable = np.flatnonzero(self.valid)
    self._epoch, self._order = None, None
    if self.steps_per_epoch == 0:
      raise ValueError(f"feature cache: {len(self._usable)} entries hold no full batch of {self.batch_size}")

  @property
  def num_entries(self) -> int:
    return len(self.labels)

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per pass over the cache (about num_views epochs of the train pipeline)."""
    return len(self._usable) // self.batch_size

  @property
  def nbytes(self) -> int:
    return sum(int(f.nbytes) for f in self.features.values())

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._epoch != epoch:
      rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch])
      self._epoch, self._order = epoch, self._usable[rng.permutation(len(self._usable))]
    return self._order

  def entry_indices(self, step_in_phase: int) -> np.ndarray:
    """The entries of global batch `step_in_phase`: each pass over the cache is a fresh permutation of the
    valid entries from (seed, pass), the remainder dropped; a function of the step alone (exact resumption)."""
    epoch, index = divmod(int(step_in_phase), self.steps_per_epoch)
    return self._epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]

  def batch(self, step_in_phase: int, *, shard_index: int | None = None,
            shard_count: int | None = None) -> dict:
    """{"features": {name: [b, h, w, c]}, "label": int32 [b]}: this process's block p of global batch
    `step_in_phase` (b = batch_size / process count, the whole batch with one process); `global_batch` makes
    the global arrays."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if self.batch_size % shard_count:
      raise ValueError(f"batch_size {self.batch_size} is not divisible by the {shard_count} processes")
    share = self.batch_size // shard_count
    entries = self.entry_indices(step_in_phase)[shard_index * share:(shard_index + 1) * share]
    return {"features": {name: np.asarray(f[entries]) for name, f in self.features.items()},
            "label": self.labels[entries]}

  def global_batch(self, step_in_phase: int, sharding: NamedSharding) -> dict:
    """`batch` as global jax.Arrays laid out by `sharding` (data.to_global_batch for the nested dict)."""
    return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value),
                        self.batch(step_in_phase))


# ------------------------------------------------------------------------------------------------ building


def view_image(image: np.ndarray, *, image_size: int, seed: int, view: int, scan_index: int, slice_index: int,
               augment: bool = True, rotation_factor: float = 0.2, out: np.ndarray | None = None,
               resize: str = "squash") -> np.ndarray:
  """uint8 grey `[image_size, image_size]`: the slice resized (`resize`: config.data.resize), flipped and
  rotated as the train pipeline does (data/augment.py), with the flip and angle drawn from (seed, view, scan,
  slice)."""
  resized = augment_lib.resize(image, image_size, mode=resize)
  if out is None:
    out = np.empty((image_size, image_size), np.uint8)
  if not augment:
    out[...] = resized
    return out
  rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, _VIEW_STREAM, view, scan_index, slice_index])
  flips, angles = augment_lib.draw_flips_and_angles(rng, 1, rotation_factor)
  return augment_lib.flip_and_rotate(resized, flips[0], angles[0], out=out)


def backbone_features(variables: dict, images: jax.Array, *, model) -> dict[str, jax.Array]:
  """The backbones' final feature maps of raw RGB images. Inference mode is what the phase runs (`check`):
  its BatchNorms use their moving statistics whatever `train` says, and the backbones have no dropout."""
  return model.apply(variables, images, train=False, method="backbone_features")


def compile_backbone_features(model, mesh: Mesh) -> Callable:
  """backbone_features, jit-compiled with the variables replicated and the images sharded on "data"."""
  return jax.jit(functools.partial(backbone_features, model=model),
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
                 out_shardings=NamedSharding(mesh, P("data")))


def _scan_labels(source) -> np.ndarray:
  labels = [ref.label for ref in source.scans]
  unlabelled = [ref for ref in source.scans if ref.label is None]
  if unlabelled:
    raise ValueError(f"{unlabelled[0].path}: training scan without a label ({len(unlabelled)} unlabelled scans "
                     "given to the feature cache)")
  return np.asarray(labels, np.int32)


def _backbone_variables(variables: dict, model) -> dict:
  return {"params": {name: variables["params"][name] for name in model.backbones},
          "batch_stats": {name: variables["batch_stats"].get(name, {}) for name in model.backbones}}


def _fingerprint(model, variables, source, slices, settings: dict) -> str:
  """What the cached features depend on: architecture, backbone weights, slices, augmentation, storage."""
  digest = hashlib.sha256()
  description = {"version": _FORMAT_VERSION, "backbones": list(model.backbones),
                 "backbone_config": {name: repr(sorted(model.backbone_config(name).items()))
                                     for name in model.backbones},
                 "preprocessing": model.preprocessing, "dtype": str(np.dtype(model.dtype)),
                 "scans": [[str(ref.path), None if ref.label is None else int(ref.label)] for ref in source.scans],
                 **settings}
  digest.update(json.dumps(description, sort_keys=True).encode())
  digest.update(np.ascontiguousarray(slices).tobytes())
  flat, _ = jax.tree_util.tree_flatten_with_path(_backbone_variables(variables, model))
  for path, leaf in flat:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def _gib(nbytes: int) -> str:
  return f"{nbytes / 2 ** 30:.3f} GiB"


def _open_arrays(folder: pathlib.Path, shapes: Mapping[str, tuple], dtype: np.dtype, mode: str) -> dict:
  return {name: np.memmap(folder / f"{name}.bin", dtype=dtype, mode=mode, shape=shape)
          for name, shape in shapes.items()}


def build(source, variables: dict, *, model, labels, num_views: int, image_size: int, batch_size: int,
          seed: int, augment: bool = True, rotation_factor: float = 0.2, middle_fraction: float = 1.0,
          dtype: str = "float32", directory: str | os.PathLike | None = None, mesh: Mesh | None = None,
          read_threads: int = 8, progress: bool = True) -> FeatureCache:
  """The backbones' features of `num_views` views of every training slice the train pipeline would use.

  Args:
    source: the train slice source (data.RawScans or data.PreparedData, as data.sources.data_sources gives).
    variables: {"params", "batch_stats"}; only the backbones' sub-trees are read.
    model, labels: the phase's model and freezing labels; `check` must pass.
    num_views: K (config.train.cache_frozen_features); 1 when `augment` is off (the views would be equal).
    image_size, augment, rotation_factor, middle_fraction: config.data's, as the train pipeline takes them.
    batch_size: images per compiled call and the global batch of `FeatureCache.batch` (config.train's).
    seed: config.seed: the views' flips and angles, and the per-pass permutations.
    dtype: storage, a key of DTYPES.
    directory: memory-mapped files there instead of host memory; a complete cache with the same fingerprint
      (weights, slices, settings) is read back instead of rebuilt. Keyed on scan paths, not pixels: delete it
      when the data changes under the same paths. With several processes each uses its own sub-folder.
    mesh: devices of the compiled call, axis "data"; default this process's local devices (every process
      builds the whole cache).
  """
  check(model, labels)
  if num_views < 1:
    raise ValueError(f"feature cache: num_views must be >= 1, got {num_views}")
  if dtype not in DTYPES:
    raise ValueError(f"feature cache: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  num_views = num_views if augment else 1
  mesh = mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), ("data",))
  if batch_size % mesh.size:
    raise ValueError(f"feature cache: batch_size {batch_size} does not divide over the {mesh.size} devices")
  storage = DTYPES[dtype]
  scan_labels = _scan_labels(source)
  slices = data.select_slices(source.num_slices, middle_fraction)
  num_entries = len(slices) * num_views
  if num_entries < batch_size:
    raise ValueError(f"feature cache: {len(slices)} slices x {num_views} views hold no full batch of {batch_size}")
  backbone_vars = _backbone_variables(variables, model)
  images_shape = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
  maps = jax.eval_shape(functools.partial(backbone_features, model=model), backbone_vars, images_shape)
  shapes = {name: (num_entries, *maps[name].shape[1:]) for name in model.backbones}
  per_entry = sum(int(np.prod(shape[1:])) for shape in shapes.values()) * storage.itemsize
  where = "host memory" if directory is None else str(directory)
  # The size first: a cache that does not fit should fail the user's arithmetic, not the machine.
  print(f"feature cache: {len(slices)} slices x {num_views} views x "
        f"({' + '.join(name + ' ' + 'x'.join(map(str, s[1:])) for name, s in shapes.items())}) x "
        f"{storage.itemsize} B = "
        f"{_gib(num_entries * per_entry)} in {where}", flush=True)

  settings = {"num_views": num_views, "image_size": image_size, "augment": augment,
              "rotation_factor": rotation_factor if augment else 0.0, "seed": seed if augment else 0,
              "storage": dtype}
  options = getattr(source, "options", None)
  resize = data.pipeline.resize_mode(source)
  # How slices are read (lung crop, resize) changes the features; only when not the defaults, so that caches
  # written before these options keep their fingerprint.
  if options is not None and options != data.ReadOptions():
    settings["read_options"] = dataclasses.asdict(options)
  folder = None
  if directory is not None:
    folder = pathlib.Path(directory)
    if jax.process_count() > 1:
      folder = folder / f"process_{jax.process_index()}"
    fingerprint = _fingerprint(model, variables, source, slices, settings)
    manifest_path = folder / _MANIFEST
    if manifest_path.exists():
      manifest = json.loads(manifest_path.read_text())
      if manifest.get("fingerprint") == fingerprint:
        print(f"feature cache: reusing {folder}", flush=True)
        return FeatureCache(_open_arrays(folder, shapes, storage, "r"), np.load(folder / "labels.npy"), slices,
                            np.load(folder / "valid.npy"), num_views, batch_size, seed, loaded=True)
    if folder.exists():
      shutil.rmtree(folder)
    folder.mkdir(parents=True)
    features = _open_arrays(folder, shapes, storage, "w+")
  else:
    features = {name: np.zeros(shape, storage) for name, shape in shapes.items()}

  entry_labels = np.repeat(scan_labels[slices[:, 0]], num_views).astype(np.int32)
  valid = np.ones(num_entries, bool)
  features_fn = compile_backbone_features(model, mesh)
  backbone_vars = jax.device_put(backbone_vars, NamedSharding(mesh, P()))
  images_sharding = NamedSharding(mesh, P("data"))
  bad = []

  def views_of(position: int) -> np.ndarray | None:
    scan_index, slice_index = (int(v) for v in slices[position])
    try:
      image = source.load(scan_index, slice_index)
    except data.SliceError as error:
      bad.append(str(error.path))
      return None
    grey = np.empty((num_views, image_size, image_size), np.uint8)
    for view in range(num_views):
      view_image(image, image_size=image_size, seed=seed, view=view, scan_index=scan_index,
                 slice_index=slice_index, augment=augment, rotation_factor=rotation_factor, out=grey[view],
                 resize=resize)
    return grey

  def store(start: int, count: int, outputs) -> None:
    for name, values in outputs.items():
      features[name][start:start + count] = np.asarray(values)[:count].astype(storage)

  # Slices in chunks whose views fill whole compiled batches (the last one padded with zeros and cut off);
  # the device works on one batch while the threads decode and augment the next.
  slices_per_batch = max(1, batch_size // num_views)
  pending = None
  grey = np.zeros((batch_size, image_size, image_size), np.uint8)
  buffered, buffer_start = 0, 0
  with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool, \
      tqdm.tqdm(total=num_entries, desc="feature cache", unit="img", disable=not progress,
                dynamic_ncols=True) as bar:

    def flush(count: int):
      nonlocal pending
      grey[count:] = 0
      outputs = features_fn(backbone_vars, jax.device_put(augment_lib.grey_to_rgb(grey), images_sharding))
      if pending is not None:
        store(*pending)
        bar.update(pending[1])
      pending = (buffer_start, count, outputs)

    for chunk_start in range(0, len(slices), slices_per_batch):
      positions = range(chunk_start, min(chunk_start + slices_per_batch, len(slices)))
      for position, views in zip(positions, pool.map(views_of, positions)):
        for view in range(num_views):
          if views is None:
            valid[position * num_views + view] = False
            grey[buffered] = 0
          else:
            grey[buffered] = views[view]
          buffered += 1
          if buffered == batch_size:
            flush(buffered)
            buffer_start, buffered = buffer_start + batch_size, 0
    if buffered:
      flush(buffered)
    if pending is not None:
      store(*pending)
      bar.update(pending[1])
  if bad:
    warnings.warn(f"feature cache: {len(bad)} unreadable slices left out, e.g. {bad[0]}", data.DataWarning)
  entry_labels[~valid] = -1

  if folder is not None:
    for array in features.values():
      array.flush()
    np.save(folder / "labels.npy", entry_labels)
    np.save(folder / "valid.npy", valid)
    manifest = {"fingerprint": fingerprint, "shapes": {name: list(s) for name, s in shapes.items()},
                "settings": settings}
    tmp = folder / (_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)  # written last: only a complete cache is ever reused
    features = _open_arrays(folder, shapes, storage, "r")
  return FeatureCache(features, entry_labels, slices, valid, num_views, batch_size, seed)


def build_from_config(config, source, variables: dict, *, model, labels, directory=None,
                      mesh: Mesh | None = None) -> FeatureCache:
  """build() with config.train.cache_frozen_features views and config.data's augmentation and slices."""
  return build(source, variables, model=model, labels=labels,
               num_views=int(config.train.cache_frozen_features), image_size=config.data.image_size,
               batch_size=config.train.batch_size, seed=config.seed, augment=config.data.augment,
               rotation_factor=config.data.rotation_factor, middle_fraction=config.data.middle_fraction,
               directory=directory, mesh=mesh)


# ---------------------------------------------------------------------------------------------- the step


def head_train_step(state, batch: dict, *, model, tx: optax.GradientTransformation, labels: Any,
                    loss_fn: Callable):
  """train.train_step on cached features: the same dropout key, partition, update and metrics.

  `state`: anything with step / params / batch_stats / opt_state / rng and `.replace` (train.TrainState).
  The backbones are frozen and in inference mode (`check`), so their parameters are carried over bitwise and
  batch_stats do not change (train_step's BatchNorms in inference mode return them as they are).
  """
  trainable, frozen = optim.split(state.params, labels)
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_of(trainable_params):
    variables = {"params": optim.merge(trainable_params, frozen), "batch_stats": state.batch_stats}
    logits = model.apply(variables, batch["features"], train=True, rngs={"dropout": dropout_rng},
                         method="head")
    return loss_fn(logits, batch["label"]), logits

  (loss, logits), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
  params, opt_state = optim.apply_trainable_update(tx, state.params, labels, grads, state.opt_state)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), losses.step_metrics(
      loss, logits, batch["label"])


def compile_head_step(phase, loss_fn: Callable, mesh: Mesh, *, state_shardings: Any = None) -> Callable:
  """head_train_step for this phase (train.Phase: model, tx, labels), jit-compiled like
  train.compile_train_step: the state donated, the batch sharded on "data".

  `state_shardings`: a tree like the state (sharding.state_sharding: replicated, or FSDP); default replicated.
  """
  check(phase.model, phase.labels)
  step = functools.partial(head_train_step, model=phase.model, tx=phase.tx, labels=phase.labels,
                           loss_fn=loss_fn)
  replicated = NamedSharding(mesh, P())
  shardings = replicated if state_shardings is None else state_shardings
  return jax.jit(step, in_shardings=(shardings, NamedSharding(mesh, P("data"))),
                 out_shardings=(shardings, replicated), donate_argnums=0)
