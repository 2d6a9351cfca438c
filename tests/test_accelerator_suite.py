"""benchmarks/accelerator_suite.py at toy sizes on CPU (its `--cpu_smoke`), so the device suite
cannot rot between sessions that have a device."""

import math

from benchmarks import accelerator_suite as suite


def test_every_part_runs_and_reports_its_numbers():
  r = suite.suite(suite.SMOKE, steps=2, reps=1)
  assert r['device_kind'] and r['matmul_tflops'] > 0
  for part in ('dense', 'moe'):
    assert r[part]['tokens_per_sec'] > 0 and r[part]['mfu_vs_measured_matmul'] > 0
    assert r[part]['mfu'] is None or 0 < r[part]['mfu'] < 1  # no datasheet peak for a CPU
  assert math.isfinite(r['moe']['mfu_vs_dense'])
  gmm = r['grouped_matmul']
  assert 'dense_gemm' in gmm and all(v['tflops'] > 0 for v in gmm.values())
  assert set(gmm) - {'dense_gemm'} == set(suite.available_gmm_impls())
  assert [row['L'] for row in r['routing_attention']] == list(suite.SMOKE.routing_lengths)
  assert all(row['routing_ms'] > 0 and row['flash_ms'] > 0 for row in r['routing_attention'])
