"""MoE with token-choice softmax top-2 routing, Switch balance loss and router z-loss.

Usage: python -m train.train --config=configs/moe_topk.py --workdir=runs/moe_topk
  (`:tiny` for a smoke run; `--config.moe.execution=capacity` for capacity-factor dispatch)
Hardware: a GPU (8 experts of width 1024 in every layer of the 12-layer base model; active
  parameters per token equal the dense base model's); `:tiny` runs on 2 CPU cores in about a minute.
Expected: at equal active FLOPs, lower loss than configs/base.py; moe/load_max_mean close to 1 and
  no dead experts once the balance loss has acted.
"""

from configs import base


def get_config(arg: str | None = None):
  base.check_variant('configs/moe_topk.py', arg, ('tiny', '1b'))
  c = base.get_config()
  c.moe.update(
    num_experts=8,
    top_k=2,
    expert_dim=1024,
    router='topk',
    score='softmax',
    balance_weight=1e-2,
    z_loss_weight=1e-3,
  )
  if arg == '1b':
    base.make_1b(c)
  if arg == 'tiny':
    base.make_tiny(c)
  return c
