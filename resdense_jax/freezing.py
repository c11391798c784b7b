"""Freezing by rules: one label per parameter, and the BatchNorms that freeze with their parameters.

One call, for any Flax module with `keras_layers()` and a `frozen_bn` field (a backbone of
`resdense_jax.models`, or a ResDenseNet):

    labels, model = optim.freeze(model, variables["params"], "backbones")
    tx = optim.with_frozen(optim.keras_rmsprop(1e-3), labels)

`labels` is an optax label tree with the structure of the parameters; `model` is a copy of `model` in which
every BatchNormalization whose parameters are all frozen runs in inference mode even under `train=True`
(moving statistics used and never updated: Keras's frozen BatchNormalization). Without that copy a frozen
backbone's statistics would keep moving.

Rules are strings (one string is one rule). Every parameter gets exactly one label (big_vision's principle):
"frozen" when some rule selects it, "trainable" otherwise; a rule that selects nothing is an error, so a typo
cannot silently train everything.
  "all"                  every parameter
  "backbones"            every backbone (a ResDenseNet's head stays trainable; a standalone backbone: all)
  "resnet101"            one backbone of a ResDenseNet, by its sub-tree name
  "resnet101:100"        the first 100 entries of that backbone's Keras `model.layers` (parameter-free layers
                         count, as in Keras), from its `keras_layers()` list
  "backbones:100"        the first 100 Keras layers of every backbone
  "backbone", "backbone:100"  a standalone backbone itself (its parameters are not nested under a name)
  "re:<regex>"           parameters whose path "a/b/c" fully matches the regular expression
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import jax

TRAINABLE = "trainable"
FROZEN = "frozen"
LABELS = (TRAINABLE, FROZEN)
# The rule name of a standalone backbone: its parameters sit at the top of the tree, under no backbone name.
STANDALONE = "backbone"

Path = tuple[str, ...]


# ------------------------------------------------------------------------------------------- tree paths


def _key_name(entry: Any) -> str:
  """One entry of a jax key path as the string Flax uses (DictKey.key, GetAttrKey.name, SequenceKey.idx)."""
  for field in ("key", "name", "idx"):
    if hasattr(entry, field):
      return str(getattr(entry, field))
  return str(entry)


def _with_paths(tree) -> list[tuple[Path, Any]]:
  """(path, leaf) for every leaf of `tree`, in `jax.tree.leaves` order; paths as tuples of strings."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in flat]


def _text(path: Path) -> str:
  return "/".join(path)


def check_labels(labels, params) -> None:
  """Raises ValueError unless `labels` gives every leaf of `params` exactly one label, TRAINABLE or FROZEN.

  Holds for any label tree, also a hand-written one: each parameter path has one label, no label names a path
  the parameters lack, and the two trees have the same containers (optax maps them together).

      optim.check_labels({"w": "frozen", "b": "trainable"}, {"w": w, "b": b})  # passes
      optim.check_labels({"w": "frozen"}, {"w": w, "b": b})  # ValueError: ... no label for parameter b
  """
  param_paths = [path for path, _ in _with_paths(params)]
  if len(set(param_paths)) != len(param_paths):
    raise ValueError("labels: the parameter tree has two leaves with the same path; each needs its own label")
  labelled = _with_paths(labels)
  by_path = dict(labelled)
  missing = [p for p in param_paths if p not in by_path]
  if missing:
    raise ValueError(f"labels: no label for parameter {_text(missing[0])} ({len(missing)} of {len(param_paths)} "
                     "parameters unlabelled); every parameter needs exactly one label")
  known = set(param_paths)
  extra = [p for p, _ in labelled if p not in known]
  if extra or len(labelled) != len(param_paths):
    name = _text(extra[0]) if extra else "a path"
    raise ValueError(f"labels: {name} is labelled but is no parameter (or is labelled twice); the labels must "
                     "have the parameters' paths exactly")
  for path, label in labelled:
    if label not in LABELS:
      raise ValueError(f"labels: {_text(path)} is labelled {label!r}; each parameter is {TRAINABLE!r} or "
                       f"{FROZEN!r}")
  if jax.tree.structure(labels) != jax.tree.structure(params):
    raise ValueError(f"labels: same paths as the parameters but other containers ({type(labels).__name__} "
                     f"vs {type(params).__name__}); build the labels from these parameters (optim.freeze)")


# ------------------------------------------------------------------------------------------------- rules


def _groups(keras_layers) -> dict[str, tuple[Path, Sequence[Any]]]:
  """{rule name: (prefix of its parameter paths, its Keras layers)}.

  A ResDenseNet's `keras_layers()` maps each backbone's sub-tree name to its list; a standalone backbone's is
  the list itself, its parameters unprefixed, and rules call it "backbone".
  """
  if isinstance(keras_layers, Mapping):
    return {name: ((name,), layers) for name, layers in keras_layers.items()}
  if isinstance(keras_layers, Sequence) and not isinstance(keras_layers, str):
    return {STANDALONE: ((), keras_layers)}
  raise TypeError(f"keras_layers must be a backbone's Keras layer list or a mapping of backbone name to one, "
                  f"got {type(keras_layers).__name__}")


def _layer_params(prefix: Path, layers: Iterable[Any]) -> set[Path]:
  """Parameter paths (in the model's tree) of these Keras layers' weights."""
  return {(*prefix, *weight[1:]) for layer in layers for weight in layer.weights if weight[0] == "params"}


def _rule_forms(groups: Mapping[str, Any]) -> str:
  names = ", ".join(f"'{name}', '{name}:N'" for name in groups)
  return f"rules for this model: 'all', 'backbones', 'backbones:N', {names}, 're:<regex>'"


def _first_n(rule: str, count: str, name: str, layers: Sequence[Any]) -> int:
  if not count.isdigit() or int(count) < 1:  # "resnet50:-1" would otherwise slice off the last layer
    raise ValueError(f"freeze rule {rule!r}: {count!r} is not a layer count; '{name}:N' freezes the first N >= 1 "
                     f"of the {len(layers)} Keras layers of {name}")
  if int(count) > len(layers):
    raise ValueError(f"freeze rule {rule!r} asks for more layers than the {len(layers)} Keras layers of {name}")
  return int(count)


def _select(rule: Any, all_paths: Sequence[Path], groups: Mapping[str, tuple[Path, Sequence[Any]]]) -> set[Path]:
  """The parameter paths one rule selects."""
  if not isinstance(rule, str):
    raise TypeError(f"freeze rule {rule!r}: a rule is a string ({_rule_forms(groups)})")
  if rule == "all":
    return set(all_paths)
  if rule.startswith("re:"):
    try:
      pattern = re.compile(rule[3:])
    except re.error as error:
      raise ValueError(f"freeze rule {rule!r}: not a regular expression ({error})") from None
    return {path for path in all_paths if pattern.fullmatch(_text(path))}
  name, colon, count = rule.partition(":")
  targets = list(groups) if name == "backbones" else [name]
  if name not in groups and name != "backbones":
    what = ("this model is a standalone backbone, called 'backbone' in rules" if STANDALONE in groups
            else f"its backbones are {list(groups)}")
    raise ValueError(f"freeze rule {rule!r}: {name!r} is not a backbone of this model ({what}); "
                     f"{_rule_forms(groups)}")
  selected: set[Path] = set()
  for target in targets:
    prefix, layers = groups[target]
    if colon:
      selected |= _layer_params(prefix, layers[:_first_n(rule, count, target, layers)])
    else:
      selected |= {path for path in all_paths if path[:len(prefix)] == prefix}
  return selected


def _as_rules(rules) -> tuple[Any, ...]:
  """One string is one rule (not a sequence of one-character rules)."""
  if isinstance(rules, str):
    return (rules,)
  if not isinstance(rules, Iterable):
    raise TypeError(f"freeze rules must be a string or a sequence of strings, got {type(rules).__name__}")
  return tuple(rules)


def freeze_labels(params, rules: str | Sequence[str], keras_layers):
  """A tree like `params` whose leaves are TRAINABLE or FROZEN according to `rules` (see the module docstring).

  `keras_layers` is the model's `keras_layers()`: a standalone backbone's list, or a ResDenseNet's mapping of
  backbone sub-tree name to list. Every Keras layer's parameters must exist in `params`, every rule must select
  at least one parameter, and every parameter gets exactly one label (check_labels).

      labels = freeze_labels(params, "backbones", model.keras_layers())
  """
  rules = _as_rules(rules)
  groups = _groups(keras_layers)
  flat = _with_paths(params)
  all_paths = [path for path, _ in flat]
  if not all_paths:
    raise ValueError("freeze: the parameter tree is empty")
  known = set(all_paths)
  for name, (prefix, layers) in groups.items():
    missing = _layer_params(prefix, layers) - known
    if missing:
      hint = (" (pass variables['params'], not the whole variables dict)"
              if isinstance(params, Mapping) and "params" in params else "")
      raise ValueError(f"freeze: the Keras layer list of {name} names parameters this parameter tree lacks, e.g. "
                       f"{_text(sorted(missing)[0])}{hint}")
  frozen: set[Path] = set()
  for rule in rules:
    selected = _select(rule, all_paths, groups)
    if not selected:
      raise ValueError(f"freeze rule {rule!r} matches no parameter of this model (paths look like "
                       f"{_text(all_paths[0])!r}); {_rule_forms(groups)}")
    frozen |= selected
  labels = jax.tree.unflatten(jax.tree.structure(params),
                              [FROZEN if path in frozen else TRAINABLE for path in all_paths])
  check_labels(labels, params)
  return labels


def frozen_batchnorm(labels, keras_layers):
  """The BatchNormalization layers whose parameters are all frozen: they run in inference mode.

  In the form of the model's `frozen_bn` field's content: for a ResDenseNet's mapping, {backbone: (BN layer
  names, ...)} (pass `tuple(result.items())`); for a standalone backbone's list, a tuple of BN layer names.
  """
  flat = dict(_with_paths(labels))
  result = {}
  for name, (prefix, layers) in _groups(keras_layers).items():
    names = []
    for layer in layers:
      params = [(*prefix, *weight[1:]) for weight in layer.weights if weight[0] == "params"]
      if layer.class_name == "BatchNormalization" and params and all(flat[p] == FROZEN for p in params):
        names.append(layer.name)
    result[name] = tuple(names)
  return result if isinstance(keras_layers, Mapping) else result[STANDALONE]


def freeze(model, params, rules: str | Sequence[str]):
  """(labels, model with those BatchNorms frozen) for `rules`: freezing in one call.

  `model` is any Flax module with `keras_layers()` and a `frozen_bn` field (a backbone of resdense_jax.models or
  a ResDenseNet); `params` its `variables["params"]`. The returned model is `model.clone(frozen_bn=...)`: its
  `frozen_bn` is replaced by the BatchNorms whose parameters the rules freeze (as the training engine's phases
  build it), so their statistics stay fixed under `train=True`; train with it and the labels together.

      labels, model = optim.freeze(model, variables["params"], ("resnet50", "densenet121:100"))
      labels, backbone = optim.freeze(models.ResNet50(), variables["params"], "backbone:100")
      tx = optim.with_frozen(optim.keras_adam(1e-4), labels)
  """
  if not callable(getattr(model, "keras_layers", None)) or not hasattr(model, "frozen_bn"):
    raise TypeError(f"freeze: {type(model).__name__} has no keras_layers() method and frozen_bn field; freeze "
                    "takes a backbone of resdense_jax.models or a ResDenseNet")
  keras_layers = model.keras_layers()
  labels = freeze_labels(params, rules, keras_layers)
  frozen_bn = frozen_batchnorm(labels, keras_layers)
  if isinstance(frozen_bn, Mapping):
    frozen_bn = tuple(frozen_bn.items())
  return labels, model.clone(frozen_bn=frozen_bn)
