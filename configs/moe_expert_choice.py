"""MoE with expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens per sequence.

Usage: python -m train.train --config=configs/moe_expert_choice.py --workdir=runs/moe_ec
Hardware: a GPU (as configs/moe_topk.py); `:tiny` runs on 2 CPU cores in about a minute.
Expected: perfect load balance by construction (moe/load_cv = 0) and a nonzero
  moe/dropped_fraction (tokens no expert picked). Selection sees future tokens of the sequence,
  so the training loss is optimistic for a causal LM; see docs/moe.md.
"""

from configs import base


def get_config(arg: str | None = None):
  base.check_variant('configs/moe_expert_choice.py', arg)
  c = base.get_config()
  c.moe.update(
    num_experts=8,
    top_k=2,
    expert_dim=1024,
    router='expert_choice',
    capacity_factor=2.0,
    balance_weight=0.0,
    z_loss_weight=1e-3,
  )
  if arg == 'tiny':
    base.make_tiny(c)
  return c
