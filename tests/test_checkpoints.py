"""Best + latest retention by validation macro-F1, restore by path, and the resolved config beside them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resdense_jax import checkpoints


class _Iterator:
  """Stands in for a grain DatasetIterator: get_state / set_state (grain's handler JSON-encodes it)."""

  def __init__(self):
    self.position = 0

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]

  def start_prefetch(self):
    pass


@pytest.mark.parametrize("f1s,expected_best", [
    ([0.5, 0.8, 0.6, None, 0.7, 0.75], 1),
    ([0.9, 0.2, 0.3, 0.95, None, None], 3),
    ([0.1, 0.2, 0.3], 2),
])
def test_keeps_the_best_and_the_latest(tmp_path, monkeypatch, f1s, expected_best):
  import grain.checkpoint
  from grain._src.python.dataset import dataset
  monkeypatch.setattr(dataset, "DatasetIterator", _Iterator)  # the handler's isinstance check
  manager = checkpoints.create_manager(tmp_path / "ckpt", async_save=False)
  state = {"w": jnp.arange(3.0), "step": jnp.int32(0)}
  it = _Iterator()
  for step, f1 in enumerate(f1s):
    it.position = 10 * step
    metrics = None if f1 is None else {"val_scan_macro_f1": f1}
    checkpoints.save(manager, step, {"w": state["w"] + step, "step": jnp.int32(step)}, it, {"phase": 0}, metrics)
    kept = manager.all_steps()
    best_so_far = max((i for i, v in enumerate(f1s[:step + 1]) if v is not None), key=lambda i: f1s[i])
    assert sorted(kept) == sorted({best_so_far, step}), (step, kept)
  assert manager.best_step() == expected_best and manager.latest_step() == len(f1s) - 1
  restored, it2 = checkpoints.restore(manager, expected_best, state, _Iterator())
  np.testing.assert_array_equal(restored["w"], np.arange(3.0) + expected_best)
  assert it2.position == 10 * expected_best
  assert checkpoints.restore_meta(manager, manager.latest_step()) == {"phase": 0}
  manager.close()
