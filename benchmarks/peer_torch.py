"""The PyTorch worker of benchmarks/peer_step.py: a Hugging Face Llama (dense) or Mixtral (MoE)
train step at our shapes, timed on request, so one driver can interleave it with our step.

Why a separate script: the project environment never imports torch; this runs in .venv-hf
(standard library, torch, transformers and numpy only) as a subprocess of the driver.

Protocol: argv[1] is a JSON spec {d, layers, heads, mlp, vocab, seq, batch, moe, rope_theta,
norm_eps, lr, b1, b2, eps, weight_decay, warmup_steps}. The worker builds the model (f32,
attn_implementation='sdpa', tied embeddings), wraps it in torch.compile and warms up, then writes
one JSON line {ready, mode, params, warmup_s, first_step_s, ...} to its protocol stream (the
original stdout; anything printed by libraries goes to stderr). Then, per stdin line
{"steps": n}, it runs n steps and answers {"times": [...]}; {"quit": true} or EOF ends it.

Usage: .venv-hf/bin/python benchmarks/peer_torch.py '{"d": 64, ...}' (started by peer_step.py;
`make hf-check` builds .venv-hf). On 2 CPU cores torch.compile takes about a minute.
"""

import json
import os
import sys
import time
import traceback

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file
from benchmarks import peer_protocol  # noqa: E402  (standard library only)


def build_model(spec: dict) -> torch.nn.Module:
  """LlamaForCausalLM or MixtralForCausalLM (8 experts top-2 of width mlp/2) at spec's shape."""
  common = dict(
    vocab_size=spec['vocab'], hidden_size=spec['d'], num_hidden_layers=spec['layers'],
    num_attention_heads=spec['heads'], num_key_value_heads=spec['heads'],
    max_position_embeddings=max(spec['seq'], 2048), rms_norm_eps=spec['norm_eps'],
    rope_theta=spec['rope_theta'], tie_word_embeddings=True, attn_implementation='sdpa',
    torch_dtype=torch.float32,
  )  # fmt: skip
  if spec['moe']:
    config = transformers.MixtralConfig(
      intermediate_size=spec['mlp'] // 2, num_local_experts=8, num_experts_per_tok=2,
      output_router_logits=False, sliding_window=None, **common,
    )  # fmt: skip
    cls = transformers.MixtralForCausalLM
  else:
    config = transformers.LlamaConfig(intermediate_size=spec['mlp'], **common)
    cls = transformers.LlamaForCausalLM
  torch.manual_seed(0)
  model = cls(config).to(torch.float32)
  model.train()
  return model


class Stepper:
  """One train step: forward with labels (HF's shifted causal LM loss), backward, AdamW, zero."""

  def __init__(self, spec: dict, compiled: bool):
    self.raw = build_model(spec)
    self.model = torch.compile(self.raw) if compiled else self.raw
    self.opt = torch.optim.AdamW(
      self.raw.parameters(), lr=spec['lr'], betas=(spec['b1'], spec['b2']), eps=spec['eps'],
      weight_decay=spec['weight_decay'],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tokens_BL = rng.integers(0, spec['vocab'], (spec['batch'], spec['seq']), dtype=np.int64)
    self.tokens_BL = torch.from_numpy(tokens_BL)

  def __call__(self) -> float:
    loss = self.model(input_ids=self.tokens_BL, labels=self.tokens_BL).loss
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())  # CPU: synchronous; the float() makes sure of it


def warm_up(spec: dict) -> tuple[Stepper, dict]:
  """The compiled step after its first steps; on a failing inductor, eager (labelled so)."""
  info = {'mode': 'inductor', 'compile_error': None}
  t0 = time.perf_counter()
  stepper = Stepper(spec, compiled=True)
  try:
    loss = stepper()
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc(file=sys.stderr)
    last = (str(e).strip().splitlines() or [''])[-1][:300]
    info.update(mode='eager', compile_error=f'{type(e).__name__}: {last}')
    torch._dynamo.reset()  # pylint: disable=protected-access
    t0 = time.perf_counter()
    stepper = Stepper(spec, compiled=False)
    loss = stepper()
  info['first_step_s'] = time.perf_counter() - t0
  for _ in range(spec.get('warmup_steps', 3)):  # a second compile (e.g. backward) lands here
    stepper()
  info['warmup_s'] = time.perf_counter() - t0
  info['first_loss'] = loss
  info['params'] = sum(p.numel() for p in stepper.raw.parameters())
  info['class'] = type(stepper.raw).__name__
  return stepper, info


def time_steps(step, n: int) -> list[float]:
  """Wall seconds of each of n steps (each step returns only once its work is done)."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times


def main() -> None:
  proto = peer_protocol.protocol_stream()
  spec = json.loads(sys.argv[1])
  torch.set_num_threads(os.cpu_count())
  torch._dynamo.config.suppress_errors = False  # pylint: disable=protected-access
  t0 = time.perf_counter()
  stepper, info = warm_up(spec)
  info.update(
    ready=True, build_and_warmup_s=time.perf_counter() - t0, threads=torch.get_num_threads(),
    torch=torch.__version__, transformers=transformers.__version__,
  )  # fmt: skip
  peer_protocol.serve(proto, info, lambda n: time_steps(stepper, n))


if __name__ == '__main__':
  main()
