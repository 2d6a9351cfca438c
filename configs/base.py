"""Every default of an experiment, one comment per field.

Experiment files start from `get_config()` here and change what they need. The whole tree is
converted to frozen dataclasses (`configs.schema.load`) and validated before any work starts.

Usage: python -m train.train --config=configs/base.py --workdir=/tmp/run
Hardware: a ~125M-parameter dense model (12 layers, width 768, sequence 1024); meant for a GPU.
Expected: a reference point for the routed experiments, not a result by itself.
"""

import ml_collections


def check_variant(path: str, arg: str | None, variants: tuple[str, ...] = ('tiny',)) -> None:
  """Refuses, in one line, a `--config=PATH:ARG` variant the experiment file does not define."""
  if arg and arg not in variants:
    raise ValueError(
      f'{path}: unknown variant {arg!r}; expected one of: {", ".join(variants)} (or no variant)'
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  check_variant('configs/base.py', arg, ('tiny', '1b'))
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 384  # embedding rows; >= tokenizer vocabulary (byte level: 257), padded for speed
  m.num_layers = 12  # transformer blocks
  m.d_model = 768  # residual width
  m.num_heads = 12  # query heads; must divide d_model
  m.num_kv_heads = (
    12  # key/value heads (grouped-query attention when < num_heads); divides num_heads
  )
  m.mlp_dim = 2048  # SwiGLU hidden width
  m.tie_embeddings = True  # output projection is the transposed input embedding
  m.rope_theta = 10000.0  # RoPE base frequency
  m.norm_eps = 1e-6  # RMSNorm epsilon
  m.init_std = 0.02  # std of the normal initialiser of every projection and the embedding
  m.dtype = 'bfloat16'  # compute dtype of matmuls and activations (softmax and loss stay f32)
  m.param_dtype = 'float32'  # parameter storage dtype
  m.scan_layers = True  # stack the blocks and jax.lax.scan over them (fast compile at depth)
  m.remat = 'none'  # rematerialisation of each block: none | full | save_dots | save_dots_no_batch

  c.attention = a = ml_collections.ConfigDict()
  a.impl = 'auto'  # attention kernel (model/flash.py): auto (splash on TPU, cudnn on GPU in bf16/f16, chunked on CPU) | xla | chunked | cudnn | splash
  a.kind = 'dense'  # dense | routing (Routing Transformer heads in attention.routing_layers)
  a.non_routing = 'dense'  # kind='routing', layers not in routing_layers: dense (full causal) | local (only local heads, as the paper's code)
  a.routing_layers = (
    -2,
    -1,
  )  # layers with routing heads when kind='routing'; negative counts from the end
  a.window = 256  # routing heads: tokens per cluster (each mean takes its top-window queries/keys)
  a.local_window = 256  # local heads (routing layers; non_routing='local' layers): block size (a query sees its block and the previous one)
  a.num_clusters = 0  # k-means means per routing head; 0 = train.seq_len // window (must divide)
  a.routing_heads = (
    -1
  )  # routing heads per routing layer (the rest are local); -1 = half of model.num_heads
  a.commitment_weight = 1e-4  # weight of the k-means commitment loss added to the training loss
  a.kmeans_decay = (
    0.999  # EMA decay of the k-means sums and counts (centroid update after each step)
  )
  a.routing_scale = 'rsqrt_dim'  # routing heads' logit scale after the no-affine LayerNorm of q: rsqrt_dim (K**-0.5) | none (1, as the paper's code)
  a.qk_norm = False  # RMS-normalise the projected q and k over all heads' channels before RoPE (OLMoE); dense attention only

  c.moe = e = ml_collections.ConfigDict()
  e.num_experts = 0  # experts per MoE layer; 0 = every feed-forward layer is the dense SwiGLU MLP
  e.every = 1  # MoE in every n-th layer (the last of each group of n), dense MLP between
  e.top_k = 2  # experts per token (token-choice routers); <= num_experts
  e.router = 'topk'  # topk (each token picks k experts) | expert_choice (each expert picks its tokens of a sequence)
  e.score = (
    'softmax'  # router scores: softmax | sigmoid (DeepSeek-V3 style, pair with bias_rate > 0)
  )
  e.renormalize = True  # top-k gate weights renormalised to sum to 1 over the selected experts
  e.expert_dim = 0  # hidden width of each expert; 0 = model.mlp_dim
  e.shared_experts = (
    0  # always-active shared experts (a dense SwiGLU of width shared_experts * expert width)
  )
  e.execution = 'dropless'  # token-choice execution: dropless (sort + grouped matmul) | capacity (einsum dispatch, drops overflow)
  e.gmm_impl = 'auto'  # dropless grouped matmul (model/gmm.py): auto (cpu f32 blas > scan, tpu megablox, gpu mgpu > tokamax > scan) | scan | blas (cpu, f32) | ragged_dot | tokamax | megablox | mgpu
  e.block_size = 0  # rows per block of the blocked (CPU) grouped matmul; 0: auto (model.moe.block_rows: 256, or 128 under 512 rows per expert)
  e.capacity_factor = 1.25  # slots per expert = ceil(factor * tokens * top_k / num_experts) (capacity execution; expert choice: top_k = 1, factor = experts per token)
  e.balance_weight = 1e-2  # weight of the Switch load-balancing loss (token choice)
  e.balance_convention = 'assignments'  # Switch loss f_i: assignments (share of the T*k assignments; HF's value / k) | tokens (share of tokens; HF's Mixtral/OLMoE value)
  e.z_loss_weight = 1e-3  # weight of the ST-MoE router z-loss
  e.bias_rate = (
    0.0  # loss-free balancing bias update rate u (b += u * sign(mean load - load)); 0 = no bias
  )
  e.jitter = 0.0  # multiplicative router input noise, uniform in [1 - jitter, 1 + jitter]; 0 = off
  e.erc_weight = 0.0  # weight of the expert-router coupling (ERC) loss, mean over MoE layers; 0 = off (paper: 1.0)
  e.erc_alpha = (
    1.0  # ERC hinge margin alpha: M[i,j] < alpha * M[i,i]; smaller = stricter specialisation
  )
  e.erc_grad_to_router = (
    False  # ERC gradient also into the router (False: perturbed router rows are stop-gradient)
  )

  c.entropy = n = ml_collections.ConfigDict()
  n.enabled = False  # entropy-triggered routing (docs/methods.md §4) on every routed layer; needs a routed layer (MoE or UoE)
  n.tau = 0.7  # trigger threshold on the EMA of the normalised token entropy H_tok, in (0, 1)
  n.plateau = 1e-3  # trigger also when |EMA(H_tok) now - EMA(H_tok) plateau_window steps ago| < plateau; 0 = threshold only
  n.plateau_window = 1000  # steps over which the plateau test measures the change of the EMA
  n.ema_decay = 0.99  # decay of the EMA of H_tok (first step: the EMA starts at that step's value)
  n.ramp_steps = 300  # after the trigger, the loss moves linearly from coverage to specialisation over these steps (>= 1)
  n.beta_tok = 1e-3  # weight of H_tok: -beta_tok*H_tok (coverage, keep routing soft) -> +beta_tok*H_tok (specialise)
  n.beta_use = 1e-2  # weight of the usage entropy H_use (-beta_use*H_use in both regimes); 0 with a Switch balance loss
  n.mode = 'per_layer'  # per_layer (each layer triggers on its own EMA) | global (all layers fire together on the mean H_tok)

  c.uoe = u = ml_collections.ConfigDict()
  u.attention = 'dense'  # dense | smha (Union of Experts selective multi-head attention: heads are experts that pick tokens)
  u.feed_forward = 'mlp'  # mlp | uome (Union of MLP Experts: the dense SwiGLU split into num_experts column/row blocks)
  u.layers = ()  # layers that get smha/uome; () = every layer; negative counts from the end
  u.heads_per_token = (
    -1
  )  # SMHA: head-experts each token picks by its gate; -1 = model.num_heads // 2
  u.head_capacity = 1.0  # SMHA: tokens per head and sequence = ceil(head_capacity * seq_len * heads_per_token / num_heads)
  u.num_experts = 4  # UoME: experts (blocks of model.mlp_dim / num_experts hidden units each); must divide mlp_dim
  u.experts_per_token = (
    2  # UoME: experts each token (data_selection) or each prefix (expert_selection) picks
  )
  u.expert_capacity = 1.0  # UoME data_selection: tokens per expert and sequence = ceil(cap * seq_len * experts_per_token / num_experts)
  u.paradigm = 'data_selection'  # UoME routing: data_selection (experts take their top tokens) | expert_selection (causal prefix-mean gate)
  u.gate_outputs = True  # multiply outputs by num_experts * gate value so the gates learn; False = released code (gates get no gradient)
  u.balance_weight = 1e-2  # weight of the Switch load-balancing loss on the SMHA and UoME gates (token top-k choices)
  u.z_loss_weight = 1e-3  # weight of the router z-loss on the SMHA and UoME gate logits

  c.data = d = ml_collections.ConfigDict()
  d.path = ''  # prepared dataset directory; '' = the default corpus (this interpreter's stdlib)
  d.tokenizer = 'byte'  # tokenizer of the default corpus: byte | sentencepiece:PATH | hf:PATH (data.path has its own)
  d.heldout_fraction = (
    0.02  # default corpus: share of files held out for evaluation (split by file name hash)
  )
  d.cache_dir = (
    ''  # where the default corpus is prepared; '' = $ROUTED_CACHE or ~/.cache/routed_transformers
  )
  d.seed = 0  # shuffling seed of the training windows
  d.worker_count = 0  # grain worker processes (0 = in the main process)
  d.prefetch = 2  # grain prefetch buffer per worker
  d.read_threads = 0  # threads reading batches ahead in each process (0 = read when consumed)
  d.packing = False  # True: rows of whole-document pieces with segment_ids/positions; False: windows across documents
  d.verify = 'auto'  # checks of the prepared files before training: full (sha256) | sizes | off; auto: full up to 2 GiB

  c.optimizer = o = ml_collections.ConfigDict()
  o.learning_rate = 3e-4  # peak learning rate after warmup
  o.warmup_steps = 200  # linear warmup from 0
  o.decay = 'cosine'  # schedule after warmup: cosine | linear | constant
  o.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
  o.b1 = 0.9  # AdamW beta1
  o.b2 = 0.95  # AdamW beta2
  o.eps = 1e-8  # AdamW epsilon
  o.weight_decay = 0.1  # decoupled weight decay; never applied to norms, biases or embedding norms
  o.grad_clip = 1.0  # global-norm clipping threshold; 0 disables

  c.train = t = ml_collections.ConfigDict()
  t.steps = 10000  # optimizer steps in the run
  t.batch_size = 64  # global batch in sequences (all devices, all processes)
  t.seq_len = 1024  # tokens per sequence
  t.grad_accum = (
    1  # micro-batches per step; batch_size must divide by it (times the data-parallel size)
  )
  t.seed = 0  # parameter initialisation seed
  t.log_every = 10  # steps between metric lines, metrics.jsonl rows and TensorBoard points
  t.peak_tflops = (
    989.0  # per-device peak for the MFU estimate (989 = H100 SXM dense bf16); 0 hides MFU
  )
  t.stop_after = (
    0  # stop (with a checkpoint) after this many steps in this process; 0 = run to train.steps
  )
  t.on_nonfinite = 'stop'  # a step whose loss, gradient or new state is not finite is never applied; then: stop | skip (drop that batch and go on)
  t.nonfinite_patience = (
    10  # with on_nonfinite='skip': stop after this many non-finite steps in a row
  )
  t.check_memory = True  # refuse (before compiling) a run whose estimated memory exceeds the device's; False: try anyway
  t.init_from = ''  # warm start: DIR or DIR@STEP of another run; its model, a fresh optimizer, this run's data order
  t.init_from_mode = 'copy'  # copy (same architecture) | upcycle (dense -> top-k MoE: experts copy the MLP) | uoe (dense -> Union of Experts, exact)

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every_steps = 1000  # steps between checkpoints (a final one is always written)
  k.max_to_keep = 3  # newest checkpoints kept on disk
  k.async_save = True  # write checkpoints in the background while training continues

  c.mesh = h = ml_collections.ConfigDict()
  h.shape = (
    1,
    -1,
    1,
    1,
  )  # device mesh over axes (data, fsdp, tensor, expert); one -1 takes the remaining devices
  h.rules = (
    'fsdp'  # logical->mesh rule preset from configs/sharding.py: dp | fsdp | fsdp_tp | fsdp_ep
  )
  h.dcn_shape = ()  # multi-process: processes (CPU/GPU hosts; TPU: slices) per mesh axis, product = their count; () = the outermost axis they divide (data, then fsdp, ...)

  c.eval = v = ml_collections.ConfigDict()
  v.batch_size = 16  # evaluation batch in sequences
  v.max_batches = 50  # held-out batches per evaluation; 0 = the whole held-out split
  v.every_steps = 0  # held-out evaluation during training every N steps; 0 = never
  v.positions_per_window = 4  # non-causal models: positions per held-out window scored from their exact prefix (one forward pass each)

  if arg == '1b':
    make_1b(c)
  return make_tiny(c) if arg == 'tiny' else c


def make_1b(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Scales any experiment to about 1B parameters, for pod-slice plans (`python -m train.plan`,
  docs/scaling.md): 20 layers of width 2048, 16 heads of 128, SwiGLU 5632 (1.03B parameters
  dense), sequence 2048, global batch 256, bf16 compute, FSDP over every device. MoE configs get
  8 experts of 1408 (top-k as configured; 1.7B parameters, 0.68B active at top-2), experts split
  4 ways inside a host (`fsdp_ep`)."""
  c.model.update(
    num_layers=20, d_model=2048, num_heads=16, num_kv_heads=16, mlp_dim=5632, dtype='bfloat16'
  )
  c.train.update(seq_len=2048, batch_size=256)
  c.eval.batch_size = 256
  c.mesh.update(shape=(1, -1, 1, 1), rules='fsdp')
  if c.moe.num_experts:
    c.moe.update(num_experts=8, expert_dim=1408)
    c.mesh.update(shape=(1, -1, 1, 4), rules='fsdp_ep')
  return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any experiment to the size of `:tiny`: same mechanisms, about a minute on 2 CPU cores.

  f32 compute so tests can compare sharded and unsharded runs to f32 tolerance.
  """
  c.model.update(
    num_layers=2,
    d_model=64,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=128,
    dtype='float32',
    remat='none',
  )
  c.train.update(steps=20, batch_size=8, seq_len=64, log_every=5, peak_tflops=0.0)
  c.optimizer.update(warmup_steps=2, learning_rate=3e-3)
  c.checkpoint.update(every_steps=10, max_to_keep=2)
  c.eval.update(batch_size=8, max_batches=2)
  c.mesh.update(shape=(-1, 1, 1, 1), rules='dp')
  if c.moe.num_experts:  # at most 8 small experts (divisible by an expert axis of 2, 4 or 8)
    c.moe.num_experts = min(c.moe.num_experts, 8)
    c.moe.update(
      top_k=min(c.moe.top_k, c.moe.num_experts),
      expert_dim=min(c.moe.expert_dim, 64),
      block_size=min(c.moe.block_size, 128) if c.moe.block_size else 0,
    )
  return c
