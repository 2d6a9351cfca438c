"""Union of Experts LM (docs/methods.md §3): SMHA in every layer plus UoME with data selection.

Every layer's attention is Selective Multi-Head Attention (each token picks half of the 12 heads by
its gate; each head takes ceil(L·6/12) = L/2 tokens per sequence) and every MLP is UoME-DS (the
2048-wide SwiGLU as 4 experts of 512; each token picks 2; each expert takes L/2 tokens per
sequence), capacity 1.0, gate outputs on (the gates learn), Switch loss 1e-2 and z-loss 1e-3 on
both gates. The other settings are configs/base.py's, so the dense base model is the comparison at
equal parameters (about half of its attention and MLP FLOPs per token).

Usage: python -m train.train --config=configs/uoe.py --workdir=runs/uoe
       python -m train.train --config=configs/uoe.py:tiny --workdir=/tmp/uoe_tiny
  (`--config.uoe.paradigm=expert_selection` for UoME-ES with the causal prefix-mean gate;
  `--config.uoe.gate_outputs=False` for UoE as released, whose gates receive no gradient)
Hardware: a GPU (the ~125M-parameter base model with UoE layers, sequence 1024); `:tiny` runs on
  2 CPU cores in about a minute.
Expected: the loss falls like configs/base.py's, somewhat above it at equal steps (half the
  compute per token); per layer uoe/attn_unselected_fraction and uoe/mlp_unselected_fraction well
  below 0.5, uoe/*_load_cv falling under the balance loss, uoe/*_dropped_fraction near 0 once the
  gates balance. The paper's results (lower perplexity than MoE baselines at 76% of their FLOPs on
  WT103/LM1B) are for a Transformer-XL with memory, not reproduced here. `:tiny` only checks that
  it trains.
"""

from configs import base


def get_config(arg: str | None = None):
  base.check_variant('configs/uoe.py', arg, ('tiny', '1b'))
  c = base.get_config()
  c.uoe.update(
    attention='smha',
    feed_forward='uome',
    layers=(),
    heads_per_token=-1,
    head_capacity=1.0,
    num_experts=4,
    experts_per_token=2,
    expert_capacity=1.0,
    paradigm='data_selection',
    gate_outputs=True,
    balance_weight=1e-2,
    z_loss_weight=1e-3,
  )
  if arg == '1b':
    base.make_1b(c)
  if arg == 'tiny':
    base.make_tiny(c)  # 2 layers, 4 heads (2 per token), MLP 128 = 4 experts of 32, sequence 64
  return c
