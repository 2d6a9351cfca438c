"""configs/moe_topk.py plus the expert-router coupling (ERC) loss (docs/methods.md §2.4), weight 1, alpha 1.

Usage: python -m train.train --config=configs/moe_erc.py --workdir=runs/moe_erc
  (`:tiny` for a smoke run; `--config.moe.erc_alpha=0.5` for stricter specialisation,
  `--config.moe.erc_grad_to_router=True` to let the hinge reach the router)
Hardware: as configs/moe_topk.py (a GPU); the ERC loss adds n²·D·F FLOPs per MoE layer and step,
  independent of the batch. `:tiny` runs on 2 CPU cores in about a minute.
Expected: held-out loss at or below configs/moe_topk.py at equal steps; per-layer
  moe/coupling_level (alpha*) near or below 1 while it stays well above 1 for moe_topk;
  moe/erc_epsilon shrinking as experts specialise; load balance as in moe_topk.
"""

from configs import base, moe_topk, sweeps


def get_config(arg: str | None = None):
  base.check_variant('configs/moe_erc.py', arg, ('tiny', '1b'))
  c = moe_topk.get_config()
  c.moe.update(erc_weight=1.0, erc_alpha=1.0, erc_grad_to_router=False)
  if arg == '1b':
    base.make_1b(c)
  if arg == 'tiny':
    base.make_tiny(c)
  return c


def sweep_alpha():
  """`python -m train.sweep --config=configs/moe_erc.py --sweep=alpha --workdir=runs/erc_alpha`."""
  return sweeps.grid(**{'moe.erc_alpha': [0.5, 0.75, 1.0], 'moe.erc_weight': [0.1, 1.0]})
