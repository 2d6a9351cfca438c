"""benchmarks/accelerator_suite.py at toy sizes on CPU (its `--cpu_smoke`), so the device suite
cannot rot between sessions that have a device. All of it is in the slow set (~10 s for the
kernel parts, more for the two training steps), run by `make test-all`: the tool, not the model,
is under test."""

import math

import pytest

from benchmarks import accelerator_suite as suite


@pytest.mark.slow  # ~10 s of toy-size kernels: the benchmark tool, not the model, is under test
def test_kernel_parts_run_and_report_their_numbers():
  assert suite.matmul_tflops(suite.SMOKE.gemm, 'float32', reps=1) > 0
  gmm = suite.grouped_matmul(suite.SMOKE, reps=1)
  assert 'dense_gemm' in gmm and all(v['tflops'] > 0 for v in gmm.values())
  assert set(gmm) - {'dense_gemm'} == set(suite.available_gmm_impls())
  rows = suite.routing_vs_flash(suite.SMOKE, reps=1)
  assert [row['L'] for row in rows] == list(suite.SMOKE.routing_lengths)
  assert all(row['routing_ms'] > 0 and row['flash_ms'] > 0 for row in rows)
  for experts in (0, 8):  # the dense and MoE configs load
    assert suite._config(suite.SMOKE, experts=experts).model.moe.num_experts == experts  # pylint: disable=protected-access


@pytest.mark.slow  # two train steps compiled: ~25 s on 2 cores with a cold cache
def test_every_part_runs_and_reports_its_numbers():
  r = suite.suite(suite.SMOKE, steps=2, reps=1)
  assert r['device_kind'] and r['matmul_tflops'] > 0
  for part in ('dense', 'moe'):
    assert r[part]['tokens_per_sec'] > 0 and r[part]['mfu_vs_measured_matmul'] > 0
    assert r[part]['mfu'] is None or 0 < r[part]['mfu'] < 1  # no datasheet peak for a CPU
  assert math.isfinite(r['moe']['mfu_vs_dense'])
  assert set(r['grouped_matmul']) - {'dense_gemm'} == set(suite.available_gmm_impls())
  assert [row['L'] for row in r['routing_attention']] == list(suite.SMOKE.routing_lengths)
