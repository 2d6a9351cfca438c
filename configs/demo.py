"""The `make demo` run: a small routed decoder trained on the interpreter's standard library.

Four layers of width 128. Every feed-forward layer is a mixture of 8 SwiGLU experts of width 192,
top-2 (active width 384, the dense `:dense` variant's MLP), with the Switch balance loss, router
z-loss and the expert-router coupling (ERC) loss at the paper's weight 1 and alpha 1. The last two
layers mix 2 routing-attention heads (online k-means, 4 clusters of 64 tokens) with 2 local heads.

Usage: python -m train.train --config=configs/demo.py --workdir=runs/demo
       python -m eval.routing_report --workdir=runs/demo
  (`:dense` for the dense baseline of equal active parameters, `:tiny` for a smoke run)
Hardware: 2 CPU cores: about 3 minutes of training (0.46-0.59 s per step), 3.5-5 for `make demo`.
Expected (measured): held-out bits per byte 2.50 +- 0.09 exact-prefix (640 positions: routing
attention reads the future, so each position is scored from its prefix alone; teacher-forced 2.36)
after 300 steps, against 8.17 untrained; per MoE
layer alpha* (coupling level) 0.85-0.92 at the end (below 1: coupled), load CV 0.08-0.28, no dead
experts; in the routing layers ~24-25% of tokens picked by no cluster and uneven k-means clusters
(a head's smallest cluster near empty) at this short length.
"""

from configs import base


def get_config(arg: str | None = None):
  base.check_variant('configs/demo.py', arg, ('tiny', 'dense'))
  c = base.get_config()
  c.model.update(
    num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, mlp_dim=384, dtype='float32'
  )  # f32: XLA:CPU runs bf16 matmuls slower than f32
  # 4 layers unrolled: on CPU the scan's stacked residual buffers (zero-filled, then written and
  # read by dynamic slices every step) cost more than the longer compile (docs/performance.md)
  c.model.scan_layers = False
  c.train.update(steps=300, batch_size=16, seq_len=256, log_every=25, peak_tflops=0.0)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=30)
  c.checkpoint.update(every_steps=100)
  # Routing attention reads the future, so the held-out score is exact-prefix: 2 positions per
  # window (640 per evaluation) keep `make demo`'s evaluation under twice the teacher-forced time.
  c.eval.update(batch_size=16, max_batches=20, positions_per_window=2)
  c.mesh.update(shape=(-1, 1, 1, 1), rules='dp')
  if arg == 'dense':
    return c
  c.moe.update(
    num_experts=8,
    top_k=2,
    expert_dim=192,
    router='topk',
    score='softmax',
    balance_weight=1e-2,
    z_loss_weight=1e-3,
    erc_weight=1.0,
    erc_alpha=1.0,
  )
  c.attention.update(
    kind='routing',
    routing_layers=(-2, -1),
    window=64,
    local_window=64,
    num_clusters=0,
    routing_heads=-1,
    commitment_weight=1e-4,
    kmeans_decay=0.999,
  )
  if arg == 'tiny':
    base.make_tiny(c)
    c.attention.update(window=16, local_window=16)  # 4 clusters of 16 tokens at sequence 64
  return c
