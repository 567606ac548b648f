"""What a unit needs on its device besides its weights: KV cache, Mamba states, prefill activations.

Every figure is bytes, computed from the config's shapes and the run's sizes (``RunShape``), never measured.
The planner (plan.py) adds, per device, the resident reserves of its units (KV + states), the LARGEST
activation peak among them (layers run one at a time, so their temporaries never coexist) and a fixed
context margin.

Conventions (glossary letters, docs/glossary.md; N = b * t tokens of one prefill chunk):
- KV cache: preallocated to ``max_len`` positions in the cache dtype, K and V for every attention layer, the
  MTP head's attention layer included: 2 * b * max_len * kv * dh * itemsize.
  Deviation: model/blocks.py grows K/V with concatenate today (a transient 2x at every step); the pipeline
  runner preallocates, and this reserve assumes it.
- Mamba state, float32: conv [b, c, w] + SSM [b, h, p, n] per layer (the [b, c, w] layout of model/cache.py;
  vLLM keeps w - 1 taps). With speculative decoding (``draft_depth`` > 0) the verification forward records one
  copy per verified token, draft_depth + 1 of them (model/cache.py ``record``).
- Activations, in the compute dtype, for one prefill chunk of ``prefill_chunk`` tokens, from the temporaries
  of the reference code path (each op's peak measured with tracemalloc at Nano widths and matched):
  every layer    the residual h, the normed input, the mixer output, h + y: 4 N d
  mamba          alive through the mixer: zxbcdt N (i + c + h), the conv output N c, dt 2 N h; plus the
                 largest of its ops' own peaks (they run one after another): the conv 4 N c (state|x concat,
                 output, its contiguous copy, the activation); the SSD scan 4 b h nc q^2 (segsum's
                 temporaries, L, M = CB * L) + b nc g q^2 (CB) + 4 b nc q i (X*dt, Y_diag, Y_off, y)
                 + 2 b (nc + 1) h p n (chunk states in and out); the gated norm 3 N i;
                 with q = chunk_size, nc = ceil(t / q)
  attention      q, k, v N (q + 2 kv) dh; scores 3 b q tile s (scores, exp, probs) for a query tile whose
                 [b, q, tile, s] score tensor stays within SCORE_TILE_BYTES (s = max_len, the worst case);
                 the output 2 N q dh (and its [b, t, q*dh] copy)
  moe            router 3 N e (logits, sigmoid, selection scores) + N k 12 B (int64 ids, float32 weights);
                 fc1 output N l; per (token, expert) pair (P = N k): up output and its relu^2 P 2f, down
                 output P l; the routed sum N l; fc2 output N d; shared expert 2 N f_shared + N d
  mlp            2 N f + N d
  embedding      the gathered rows N d and the int64 ids N 8 B
  head           norm_f output N d, the logits of the LAST position only b v (generation asks for no more)
  mtp            the largest of its blocks, plus enorm/hnorm outputs 2 N d, their concat 2 N d, eh_proj N d,
                 final norm N d and last-position logits b v
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ops.attention import SCORE_TILE_BYTES, query_tile  # noqa: F401  (SCORE_TILE_BYTES: its budget)
from ..ops.quant import TILE_BYTES

CACHE_DTYPES = {"float32": 4, "bfloat16": 2, "float64": 8}
COMPUTE_DTYPES = {"float32": 4, "float64": 8}   # activations and states are in the compute dtype: float32, or
                                               # float64 in oracle mode (the dtype policy of docs/oracle.md section 2)


@dataclass(frozen=True)
class RunShape:
    """The sizes a run is planned for (validated by plan.plan_placement)."""

    max_len: int          # tokens of context a sequence may reach (KV cache capacity)
    batch: int            # sequences decoded together
    prefill_chunk: int    # tokens of one prefill forward (at most max_len)
    cache_dtype: str      # "float32" | "bfloat16"
    draft_depth: int      # MTP draft tokens per speculative round; 0 = no speculative decoding
    dtype: str = "float32"   # the compute dtype: activations and the conv/SSM states ("float32" | "float64")

    @property
    def itemsize(self) -> int:
        return COMPUTE_DTYPES[self.dtype]


def kv_bytes(cfg, block, run: RunShape) -> int:
    """K and V of one layer, preallocated to max_len positions: 2 * b * max_len * kv * dh * itemsize."""
    if block != "attention":
        return 0
    return 2 * run.batch * run.max_len * cfg.num_key_value_heads * cfg.head_dim * CACHE_DTYPES[run.cache_dtype]


def state_bytes(cfg, block, run: RunShape, record=True) -> int:
    """Conv [b, c, w] + SSM [b, h, p, n] float32 of one Mamba layer, times 1 + (draft_depth + 1) when the
    speculative verification records a state copy per verified token (``record``: backbone layers only)."""
    if block != "mamba":
        return 0
    one = run.batch * (cfg.conv_dim * cfg.conv_kernel
                       + cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size) * run.itemsize
    copies = 1 + (run.draft_depth + 1 if record and run.draft_depth > 0 else 0)
    return one * copies


def attention_tile(cfg, run: RunShape) -> int:
    """Queries per attention tile at the longest context: ops/attention.py::query_tile at s = max_len, capped
    at the prefill chunk."""
    return min(run.prefill_chunk, query_tile(run.batch, cfg.num_attention_heads, run.max_len, run.itemsize))


def _block_elements(cfg, block, run: RunShape) -> int:
    """Float32 elements of one block's prefill temporaries (the module docstring lists each term)."""
    b, t = run.batch, run.prefill_chunk
    n_tok, d = b * t, cfg.hidden_size
    common = 4 * n_tok * d
    if block == "mamba":
        h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
        i, c, q = cfg.mamba_intermediate, cfg.conv_dim, cfg.chunk_size
        nc = -(-t // q)
        ssd = 4 * b * h * nc * q * q + b * nc * g * q * q + 4 * b * nc * q * i + 2 * b * (nc + 1) * h * p * n
        alive = n_tok * cfg.in_proj_out + n_tok * c + 2 * n_tok * h
        return common + alive + max(4 * n_tok * c, ssd, 3 * n_tok * i)
    if block == "attention":
        q, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        scores = 3 * b * q * attention_tile(cfg, run) * run.max_len
        return common + n_tok * (q + 2 * kv) * dh + scores + 2 * n_tok * q * dh
    if block == "moe":
        e, k, f, l = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.moe_input_width
        pairs = n_tok * k
        router = 3 * n_tok * e + 3 * n_tok * k          # int64 ids count as two float32 slots, weights as one
        shared = 2 * n_tok * (cfg.moe_shared_expert_intermediate_size or 0) + n_tok * d
        return common + router + n_tok * l + pairs * (2 * f + l) + n_tok * l + n_tok * d + shared
    if block == "mlp":
        return common + 2 * n_tok * cfg.intermediate_size + n_tok * d
    raise ValueError(block)


def decode_tile_bytes(cfg, run: RunShape) -> int:
    """The weight decode of one matmul tile (ops/quant.py): a BF16 tile decoded to float32 (TILE_BYTES) and,
    in the float64 oracle mode, its float64 copy; or an NVFP4/FP8 tile of 128 rows (codes unpacked, values,
    scaled values: at most 16 B an element) of the widest input a layer has."""
    widest = max(cfg.hidden_size, cfg.mamba_intermediate, cfg.num_attention_heads * cfg.head_dim,
                 cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size or 0, cfg.intermediate_size)
    return max(TILE_BYTES * (1 + run.itemsize // 4), 128 * widest * 16)


def activation_bytes(cfg, kind, run: RunShape) -> int:
    """Peak prefill temporaries while unit ``kind`` runs one chunk (a block type, "embedding", "head", "mtp"),
    the decode tile of its matmuls included."""
    n_tok, d = run.batch * run.prefill_chunk, cfg.hidden_size
    tile = decode_tile_bytes(cfg, run)
    if kind == "embedding":
        return n_tok * d * run.itemsize + n_tok * 8
    if kind == "head":
        return (n_tok * d + run.batch * cfg.vocab_size) * run.itemsize + tile
    if kind == "mtp":
        blocks = max(_block_elements(cfg, bt, run) for bt in cfg.mtp_layers_block_type)
        return (blocks + 6 * n_tok * d + run.batch * cfg.vocab_size) * run.itemsize + tile
    return _block_elements(cfg, kind, run) * run.itemsize + tile


def unit_reserves(cfg, kind, run: RunShape) -> tuple:
    """(kv, state, activation) bytes of one unit; the MTP head reserves for each of its own blocks."""
    if kind == "mtp":
        kv = sum(kv_bytes(cfg, bt, run) for bt in cfg.mtp_layers_block_type)
        state = sum(state_bytes(cfg, bt, run, record=False) for bt in cfg.mtp_layers_block_type)
        return kv, state, activation_bytes(cfg, kind, run)
    return kv_bytes(cfg, kind, run), state_bytes(cfg, kind, run), activation_bytes(cfg, kind, run)
