"""The `make demo` run: a small dense decoder trained on the interpreter's standard library.

Usage: python -m train.train --config=configs/demo.py --workdir=runs/demo
Hardware: 2 CPU cores, a few minutes.
Expected: held-out bits per byte about 2.45 after 300 steps, against about 8.2 untrained.
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config()
  c.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, mlp_dim=384,
                 dtype='float32')  # f32: XLA:CPU runs bf16 matmuls slower than f32
  c.train.update(steps=300, batch_size=16, seq_len=256, log_every=25, peak_tflops=0.0)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=30)
  c.checkpoint.update(every_steps=100)
  c.eval.update(batch_size=16, max_batches=20)
  c.mesh.update(shape=(-1, 1, 1, 1), rules='dp')
  if arg == 'tiny':
    base.make_tiny(c)
  return c
