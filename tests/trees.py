"""Comparing variable trees in tests: structure first, then every leaf, named by its path.

`zip(jax.tree.leaves(a), jax.tree.leaves(b))` passes on an empty tree, or when one tree lacks a sub-tree;
these helpers fail then.
"""

from __future__ import annotations

import jax
import numpy as np


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in flat]


def assert_same_structure(actual, expected) -> None:
  """Same tree structure (keys and nesting), at least one leaf, and the same shape and dtype at every leaf."""
  actual_leaves, expected_leaves = _leaves(actual), _leaves(expected)
  assert expected_leaves, "the expected tree has no leaves"
  actual_paths = [p for p, _ in actual_leaves]
  expected_paths = [p for p, _ in expected_leaves]
  missing = sorted(set(expected_paths) - set(actual_paths))
  extra = sorted(set(actual_paths) - set(expected_paths))
  assert not missing and not extra, f"tree paths differ: missing {missing[:5]}, extra {extra[:5]}"
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), (_, b) in zip(actual_leaves, expected_leaves):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape} {a.dtype} != {b.shape} {b.dtype}"


def assert_trees_equal(actual, expected) -> None:
  """Same structure and bitwise-equal leaves."""
  assert_same_structure(actual, expected)
  for (path, a), (_, b) in zip(_leaves(actual), _leaves(expected)):
    np.testing.assert_array_equal(a, b, err_msg=path)


def assert_trees_close(actual, expected, *, rtol: float = 1e-6, atol: float = 0.0) -> None:
  """Same structure and every leaf within rtol / atol."""
  assert_same_structure(actual, expected)
  for (path, a), (_, b) in zip(_leaves(actual), _leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=path)
