"""MoE with sigmoid scores and loss-free balancing (DeepSeek-V3): a bias that selects, never weighs.

Usage: python -m train.train --config=configs/moe_lossfree.py --workdir=runs/moe_lossfree
Hardware: a GPU (as configs/moe_topk.py); `:tiny` runs on 2 CPU cores in about a minute.
Expected: balance comparable to moe_topk.py without a balance loss in the objective
  (moe/balance_loss is logged but weighted 0); moe/bias_norm grows then plateaus.
"""

from configs import base


def get_config(arg: str | None = None):
  base.check_variant('configs/moe_lossfree.py', arg)
  c = base.get_config()
  c.moe.update(
    num_experts=8,
    top_k=2,
    expert_dim=1024,
    router='topk',
    score='sigmoid',
    balance_weight=0.0,
    z_loss_weight=0.0,
    bias_rate=1e-3,
  )
  if arg == 'tiny':
    base.make_tiny(c)
  return c
