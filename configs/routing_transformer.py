"""Routing Transformer (Roy et al. 2021), the paper's enwik8 layout scaled down.

The paper's layout: in the last two layers half of the heads are routing heads (k-means clusters
of 256 tokens, shared QK, EMA centroids, commitment loss 1e-4) and half are local heads (blocked
causal window of 256); the first six layers have only local heads (`attention.non_routing='local'`,
as the paper's code), so no layer materialises L×L attention scores.
Byte-level LM on the default corpus, sequence 2048, so 8 clusters.

Usage: python -m train.train --config=configs/routing_transformer.py --workdir=runs/routing
       python -m train.train --config=configs/routing_transformer.py:tiny --workdir=/tmp/rt_tiny
Hardware: one GPU (~27M parameters, 8 layers of width 512, sequence 2048); `:tiny` runs on 2 CPU
cores in about a minute.
Expected: the loss falls like the dense baseline of the same size; per routing layer
`routing/unpicked_fraction` stays well below 0.5 and `routing/occupancy_min` above 0 once the
means have moved (docs/routing_attention.md). `:tiny` only checks that it trains.
"""

from configs import base


def get_config(arg: str | None = None):
  base.check_variant('configs/routing_transformer.py', arg, ('tiny', '1b'))
  c = base.get_config()
  c.model.update(num_layers=8, d_model=512, num_heads=8, num_kv_heads=8, mlp_dim=1536)
  c.attention.update(
    kind='routing',
    non_routing='local',
    routing_layers=(-2, -1),
    window=256,
    local_window=256,
    num_clusters=0,
    routing_heads=-1,
    commitment_weight=1e-4,
    kmeans_decay=0.999,
  )
  c.train.update(steps=20000, batch_size=16, seq_len=2048)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=1000)
  c.mesh.update(shape=(-1, 1, 1, 1), rules='dp')
  if arg == '1b':  # at sequence 8192: 32 clusters of 256 per routing head
    base.make_1b(c)
    c.train.seq_len = 8192
  if arg == 'tiny':
    base.make_tiny(c)  # 2 layers (both routing), 4 heads (2 routing), sequence 64
    c.attention.update(window=16, local_window=16)  # 4 clusters of 16 tokens
  return c
