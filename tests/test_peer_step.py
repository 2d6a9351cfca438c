"""benchmarks.peer_step: bad input is one line; our worker's step times at the smoke shape."""

import math

import pytest

from benchmarks import peer_jax, peer_step


def test_unknown_shape_is_one_line():
  with pytest.raises(peer_step.PeerError, match='known: demo, large') as e:
    peer_step.resolve_shape('huge', moe=False)
  assert '\n' not in str(e.value)


def test_missing_torch_python_is_one_line(tmp_path):
  with pytest.raises(peer_step.PeerError, match='make hf-check') as e:
    peer_step.check_torch_python(str(tmp_path / 'no' / 'python'))
  assert '\n' not in str(e.value)


def test_torch_python_without_torch_is_one_line(tmp_path):
  fake = tmp_path / 'python'  # an interpreter that cannot import torch
  fake.write_text('#!/bin/sh\necho "ModuleNotFoundError: No module named \'torch\'" >&2\nexit 1\n')
  fake.chmod(0o755)
  with pytest.raises(
    peer_step.PeerError, match="lacks torch/transformers .*No module named 'torch'"
  ):
    peer_step.check_torch_python(str(fake))


def test_not_a_nanodo_checkout_is_one_line(tmp_path):
  with pytest.raises(peer_step.PeerError, match='not a nanodo checkout'):
    peer_step.check_nanodo(str(tmp_path))


@pytest.mark.slow  # ~14 s with a cold compile cache; the tool, not the model, is under test
def test_project_worker_smoke():
  """Our step as the project worker builds it, 1 round of 2 steps: positive, finite times."""
  step, info = peer_jax.warm(
    lambda: peer_jax.project_step(peer_step.resolve_shape('smoke', moe=False)), warmup_steps=1
  )
  times = peer_jax.time_steps(step, 2)
  assert len(times) == 2 and all(t > 0 and math.isfinite(t) for t in times)
  assert info['params'] > 0 and info['first_step_s'] > 0
