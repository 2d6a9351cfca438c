"""Claim (GPU): a ~125M dense model (12 layers, width 768, sequence 1024, bf16) reaches >= 40% MFU.

Times the bare jitted train step of `--config` (default configs/base.py) on the devices present
and reports tokens/s and MFU against 989 TFLOP/s (H100 SXM datasheet, dense bf16) and against the
790 TFLOP/s measured on the lent H100/H200 machines. FLOPs per token: `model.plan` (`ModelPlan.flops_per_token`).

Usage: python -m benchmarks.dense_mfu [--config=configs/base.py] [--steps=20]
       (on CPU, as a smoke test: --config=configs/base.py:tiny)
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from configs import schema, sharding
from model import plan
from train import mesh as mesh_lib
from train.step import make_step_fns

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/base.py', 'Experiment config.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.')
PEAKS = {'datasheet_989': 989e12, 'measured_790': 790e12}


def main(argv):
  del argv
  cfg = schema.load(_CONFIG.value, jax.device_count())
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 256, (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
  batch = jax.device_put({'inputs': toks[:, :-1], 'targets': toks[:, 1:]}, fns.batch_sharding)
  state = fns.init()
  for _ in range(3):
    state, metrics = fns.train_step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = fns.train_step(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / _STEPS.value
  tokens_per_sec = cfg.train.batch_size * cfg.train.seq_len / step_s
  model_plan = plan.build(cfg.model, cfg.train.seq_len)
  flops = tokens_per_sec * model_plan.flops_per_token
  row = {
    'params_M': model_plan.params / 1e6,
    'batch': cfg.train.batch_size,
    'seq_len': cfg.train.seq_len,
    'dtype': cfg.model.dtype,
    'step_s': step_s,
    'tokens_per_sec': tokens_per_sec,
  }
  row.update({f'mfu_{name}': flops / (peak * jax.device_count()) for name, peak in PEAKS.items()})
  common.print_table([row])
  print(f'wrote {common.write_result("dense_mfu", {"rows": [row], "target_mfu": 0.40})}')


if __name__ == '__main__':
  app.run(main)
