"""Tensor and expert parallelism, part 1: the sharding rules, as pure functions of one layer's parameters.

Rank r of R gets a cut of every parameter dict of model/weights.py and a per-rank config, so that a rank's
partial mixer is the ordinary mixer of model/blocks.py run on its cut, and the SUM of the R partial outputs
(one all-reduce, parallel/tensor.py) is the unsharded output. The rules (docs/parallel.md has the table):

- Mamba: ``in_proj`` rows per segment, z_r | x_r | B_g(r) | C_g(r) | dt_r (NOT one contiguous block of
  rows); conv weight and bias on the rank's x, B, C channels; A, D, dt_bias by head; the gated-norm weight on
  the rank's channels; ``out_proj`` by input columns. When R divides n_groups each rank holds whole groups
  and the group norm is rank-local; when n_groups divides R (n_groups = 1 included) each group's B and C are
  replicated on the R / n_groups ranks that share it, and the norm's sum of squares is all-reduced.
- Attention: q heads split; k/v heads split when R divides them, else each rank keeps the one kv head its q
  heads read (replicated, as vLLM does); ``o_proj`` by input columns.
- MoE: router gate, correction bias and the latent fc1/fc2 replicated; routed experts TP-sliced (up rows,
  down columns, per expert) or EP-assigned (rank r keeps whole experts, contiguous or round-robin); the
  shared expert split like an MLP.
- MLP blocks: up rows, down columns. Embedding and LM head: by vocabulary rows. MTP: enorm, hnorm, eh_proj
  and final_layernorm replicated; its layers cut like the backbone's.

Stored weights shard with their scales: a BF16Weight's bits, an FP8Weight's data (per-tensor scale kept),
an NVFP4Weight's packed codes together with their block scales (a row cut keeps both rows; a column cut must
fall on 16-element blocks and cuts both alike; global_scale and input_scale kept). An ExpertBank cuts each
expert. An impossible split is a one-line PlanError naming the config field and R.

Deviation: vLLM's mamba_mixer2.py accepts an n_groups that R does not divide only when n_groups is 1; here any
n_groups that divides R is accepted, with the same all-reduce of the norm's sums of squares. The embedding is
vocab-parallel (one all-reduce), as vLLM's VocabParallelEmbedding; the MTP head's eh_proj stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, PlanError
from ..ops.formats import BF16Weight, ExpertBank, FP8Weight, NVFP4Weight

NVFP4_BLOCK = 16          # elements per NVFP4 block scale (a column cut must fall on these)
DENSE_MODES = ("tp", "replicated")
EXPERT_MODES = ("tp", "ep")
ASSIGNMENTS = ("contiguous", "round_robin")


@dataclass(frozen=True)
class Layout:
    """How R ranks share the model. ``dense``: Mamba, attention, MLP, shared expert, embedding and LM head are
    split ("tp") or whole on every rank ("replicated"); ``experts``: routed experts TP-sliced or EP-assigned."""

    ranks: int = 1
    dense: str = "tp"
    experts: str = "tp"
    assign: str = "contiguous"

    @classmethod
    def of(cls, tp=1, ep=1, assign="contiguous"):
        """TP_n: tp=n; EP_n: ep=n (the rest replicated); TP_n+EP_n: tp=ep=n (the same n ranks do both)."""
        for name, value in (("tp", tp), ("ep", ep)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"{name} must be a positive integer number of ranks, got {value!r}")
        if tp > 1 and ep > 1 and tp != ep:
            raise InputError(f"tp={tp} and ep={ep}: experts are parallel over the same ranks as the rest, so "
                             "tp and ep must be equal when both exceed 1")
        ranks = max(int(tp), int(ep))
        return cls(ranks, "tp" if tp == ranks else "replicated", "ep" if ep > 1 else "tp", assign).checked()

    def checked(self):
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, (int, np.integer)) or self.ranks < 1:
            raise InputError(f"ranks must be a positive integer, got {self.ranks!r}")
        for name, value, allowed in (("dense", self.dense, DENSE_MODES), ("experts", self.experts, EXPERT_MODES),
                                     ("assign", self.assign, ASSIGNMENTS)):
            if value not in allowed:
                raise InputError(f"layout {name} must be one of {allowed}, got {value!r}")
        if self.dense == "replicated" and self.experts == "tp" and self.ranks > 1:
            raise InputError("layout: with the dense parts replicated the routed experts must be 'ep' "
                             "(otherwise nothing is parallel)")
        return self

    @property
    def label(self) -> str:
        r = self.ranks
        if self.experts == "ep":
            return f"TP{r}+EP{r}" if self.dense == "tp" else f"EP{r}"
        return f"TP{r}"


@dataclass(frozen=True)
class NormSpan:
    """A gated-norm group wider than one rank: ``width`` channels of group ``group`` (of ``groups``) are spread
    over R / groups ranks, which all-reduce their sums of squares."""

    groups: int
    group: int
    width: int


@dataclass(frozen=True)
class LayerShard:
    """What rank code needs beside a layer's cut parameters."""

    type: str
    split: str                      # "tp" (partial output: all-reduce) or "replicated" (whole output)
    experts: str = "tp"             # MoE: "tp" or "ep"
    expert_ids: tuple = ()          # EP: the global ids of this rank's experts, in bank order
    shared: str = "tp"              # MoE: the shared expert split ("tp", partial) or whole ("replicated")
    norm: NormSpan | None = None    # Mamba: the gated norm spans several ranks


# ------------------------------------------------------------------------------------------ cutting one weight

def _take(a, idx):  # [n, ...] -> [len(idx), ...], a C-contiguous copy (reads only those rows of a mmap)
    return np.ascontiguousarray(np.asarray(a)[idx])


def take_rows(w, idx):  # [out, in] (any format) or [n] -> the rows idx
    """Rows ``idx`` (an index array or a slice) of a plain array or a stored weight, scales moving with them."""
    if isinstance(w, ExpertBank):
        return ExpertBank([take_rows(e, idx) for e in w.experts])
    if isinstance(w, NVFP4Weight):
        # the packed codes and their block scales are both [out, ...]: one row cut for both
        return NVFP4Weight(_take(w.packed, idx), _take(w.block_scale, idx), w.global_scale, w.input_scale)
    if isinstance(w, FP8Weight):
        return FP8Weight(_take(w.data, idx), w.scale, w.input_scale)
    if isinstance(w, BF16Weight):
        return BF16Weight(_take(w.bits, idx))
    return _take(w, idx)


def take_cols(w, start, stop, where):  # [out, in] -> [out, stop - start]
    """Input columns start:stop. NVFP4: both ends on a 16-element block; the block scales cut alike."""
    if isinstance(w, ExpertBank):
        return ExpertBank([take_cols(e, start, stop, where) for e in w.experts])
    cols = slice(start, stop)
    if isinstance(w, NVFP4Weight):
        if start % NVFP4_BLOCK or stop % NVFP4_BLOCK:
            raise PlanError(f"{where}: input columns {start}:{stop} do not fall on NVFP4's {NVFP4_BLOCK}-element "
                            "block scales (use fewer ranks, or expert parallelism for routed experts)")
        return NVFP4Weight(_take(w.packed[:, start // 2:stop // 2], slice(None)),
                           _take(w.block_scale[:, start // NVFP4_BLOCK:stop // NVFP4_BLOCK], slice(None)),
                           w.global_scale, w.input_scale)
    if isinstance(w, FP8Weight):
        return FP8Weight(_take(np.asarray(w.data)[:, cols], slice(None)), w.scale, w.input_scale)
    if isinstance(w, BF16Weight):
        return BF16Weight(_take(np.asarray(w.bits)[:, cols], slice(None)))
    return _take(np.asarray(w)[:, cols], slice(None))


def _part(n, r, R):  # the r-th of R equal contiguous parts of range(n)
    return slice(r * (n // R), (r + 1) * (n // R))


def _arange(s):
    return np.arange(s.start, s.stop)


# ------------------------------------------------------------------------------------------ divisibility

def _need(ok, field, value, R, why):
    if not ok:
        raise PlanError(f"config field {field!r} = {value} cannot be split over R = {R} ranks: {why}")


def check_layout(cfg, layout, with_mtp=True):
    """PlanError naming the config field when ``layout`` cannot cut ``cfg``; the layout otherwise."""
    layout = layout.checked()
    R = layout.ranks
    blocks = set(cfg.layers_block_type) | (set(cfg.mtp_layers_block_type) if with_mtp else set())
    tp = layout.dense == "tp"
    if tp and "mamba" in blocks:
        _need(cfg.mamba_num_heads % R == 0, "mamba_num_heads", cfg.mamba_num_heads, R, "R must divide it")
        g = cfg.n_groups
        _need(g % R == 0 or R % g == 0, "n_groups", g, R,
              "R must divide n_groups (rank-local groups) or n_groups divide R (replicated groups)")
    if tp and "attention" in blocks:
        q, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        _need(q % R == 0, "num_attention_heads", q, R, "R must divide it")
        _need(kv % R == 0 or R % kv == 0, "num_key_value_heads", kv, R,
              "R must divide the kv heads (split) or they divide R (replicated)")
    if tp and "mlp" in blocks:
        _need(cfg.intermediate_size % R == 0, "intermediate_size", cfg.intermediate_size, R, "R must divide it")
    if "moe" in blocks:
        if layout.experts == "tp":
            _need(cfg.moe_intermediate_size % R == 0, "moe_intermediate_size", cfg.moe_intermediate_size, R,
                  "R must divide it (or assign whole experts: expert parallelism)")
        else:
            _need(cfg.n_routed_experts % R == 0, "n_routed_experts", cfg.n_routed_experts, R,
                  "expert parallelism gives every rank the same number of experts")
        sh = cfg.moe_shared_expert_intermediate_size
        if tp:
            _need(sh % R == 0, "moe_shared_expert_intermediate_size", sh, R, "R must divide it")
    if tp:
        _need(cfg.vocab_size % R == 0, "vocab_size", cfg.vocab_size, R, "the LM head is split by vocabulary")
    return layout


def rank_config(cfg, layout, with_mtp=True):
    """The config a rank's mixers read: per-rank head, group and width counts of the block types present
    (vocabulary and expert count stay whole: the router and the token ids see the full model)."""
    R = layout.ranks
    blocks = set(cfg.layers_block_type) | (set(cfg.mtp_layers_block_type) if with_mtp else set())
    changes = {}
    if layout.dense == "tp" and R > 1:
        if "mamba" in blocks:
            g = cfg.n_groups
            changes.update(mamba_num_heads=cfg.mamba_num_heads // R, n_groups=g // R if g % R == 0 else 1)
        if "attention" in blocks:
            changes.update(num_attention_heads=cfg.num_attention_heads // R,
                           num_key_value_heads=max(cfg.num_key_value_heads // R, 1))
        if "mlp" in blocks:
            changes["intermediate_size"] = cfg.intermediate_size // R
        if "moe" in blocks:
            changes["moe_shared_expert_intermediate_size"] = cfg.moe_shared_expert_intermediate_size // R
    if "moe" in blocks and layout.experts == "tp" and R > 1:
        changes["moe_intermediate_size"] = cfg.moe_intermediate_size // R
    return cfg.replace(**changes) if changes else cfg


# ------------------------------------------------------------------------------------------ the mixers

def mamba_groups(cfg, r, R):  # -> (first group, groups held)
    """The SSM groups rank r reads: g/R of its own when R divides g, else the one group its heads belong to."""
    g = cfg.n_groups
    return (r * (g // R), g // R) if g % R == 0 else (r // (R // g), 1)


def mamba_conv_channels(cfg, r, R):  # -> int [i/R + 2 * groups * n]
    """Rank r's channels of the conv (x | B | C): its x channels, then B and C of its groups."""
    i, g, n = cfg.mamba_intermediate, cfg.n_groups, cfg.ssm_state_size
    g0, gr = mamba_groups(cfg, r, R)
    x = _arange(_part(i, r, R))
    b = i + np.arange(g0 * n, (g0 + gr) * n)
    return np.concatenate([x, b, b + g * n])


def mamba_in_proj_rows(cfg, r, R):  # -> int [2 i/R + 2 * groups * n + h/R]
    """Rank r's rows of in_proj (z | xBC | dt): z_r | x_r | B_g(r) | C_g(r) | dt_r."""
    i, c = cfg.mamba_intermediate, cfg.conv_dim
    z = _arange(_part(i, r, R))
    dt = i + c + _arange(_part(cfg.mamba_num_heads, r, R))
    return np.concatenate([z, i + mamba_conv_channels(cfg, r, R), dt])


def shard_mamba(p, cfg, r, R, where="mamba"):
    """Rank r's cut of one Mamba layer (dict of model/weights.py) and its LayerShard."""
    i, g = cfg.mamba_intermediate, cfg.n_groups
    heads, chans, cols = _part(cfg.mamba_num_heads, r, R), mamba_conv_channels(cfg, r, R), _part(i, r, R)
    q = {"type": "mamba", "norm": p["norm"],
         "in_proj": take_rows(p["in_proj"], mamba_in_proj_rows(cfg, r, R)),
         "conv_weight": take_rows(p["conv_weight"], chans),
         "conv_bias": None if p["conv_bias"] is None else take_rows(p["conv_bias"], chans),
         "A": take_rows(p["A"], heads), "D": take_rows(p["D"], heads), "dt_bias": take_rows(p["dt_bias"], heads),
         "gated_norm": take_rows(p["gated_norm"], cols),
         "out_proj": take_cols(p["out_proj"], cols.start, cols.stop,
                               f"{where} out_proj (mamba_num_heads x mamba_head_dim = {i}, R = {R})")}
    span = None if g % R == 0 else NormSpan(groups=g, group=r // (R // g), width=i // g)
    return q, LayerShard("mamba", "tp", norm=span)


def attention_kv_heads(cfg, r, R):  # -> slice of kv heads
    """The kv heads rank r keeps: kv/R of them when R divides kv, else the one its q heads read."""
    q, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if kv % R == 0:
        return _part(kv, r, R)
    first = (r * (q // R)) // (q // kv)       # query head j reads kv head j // (q / kv)
    return slice(first, first + 1)


def shard_attention(p, cfg, r, R, where="attention"):
    dh = cfg.head_dim
    qh, kvh = _part(cfg.num_attention_heads, r, R), attention_kv_heads(cfg, r, R)
    qrows, kvrows = _arange(slice(qh.start * dh, qh.stop * dh)), _arange(slice(kvh.start * dh, kvh.stop * dh))
    q = {"type": "attention", "norm": p["norm"], "q_proj": take_rows(p["q_proj"], qrows),
         "k_proj": take_rows(p["k_proj"], kvrows), "v_proj": take_rows(p["v_proj"], kvrows),
         "o_proj": take_cols(p["o_proj"], qrows[0], qrows[-1] + 1,
                             f"{where} o_proj (num_attention_heads x head_dim = {cfg.num_attention_heads * dh}, "
                             f"R = {R})")}
    return q, LayerShard("attention", "tp")


def _split_mlp(up, down, f, r, R, where):  # up [f, d] rows, down [d, f] columns
    s = _part(f, r, R)
    return take_rows(up, s), take_cols(down, s.start, s.stop, where)


def shard_mlp(p, cfg, r, R, where="mlp"):
    up, down = _split_mlp(p["up"], p["down"], cfg.intermediate_size, r, R,
                          f"{where} down_proj (intermediate_size = {cfg.intermediate_size}, R = {R})")
    return {"type": "mlp", "norm": p["norm"], "up": up, "down": down}, LayerShard("mlp", "tp")


def expert_ids(cfg, layout, r):
    """EP: the global ids of rank r's experts, contiguous (r E/R .. (r+1) E/R - 1) or round-robin (r, r+R, ...)."""
    e, R = cfg.n_routed_experts, layout.ranks
    ids = range(r, e, R) if layout.assign == "round_robin" else range(r * (e // R), (r + 1) * (e // R))
    return tuple(ids)


def shard_moe(p, cfg, layout, r, where="moe"):
    R = layout.ranks
    q = {k: p[k] for k in ("type", "norm", "gate", "gate_bias", "fc1", "fc2")}        # replicated
    if layout.experts == "tp":
        f = cfg.moe_intermediate_size
        q["experts_up"], q["experts_down"] = _split_mlp(
            p["experts_up"], p["experts_down"], f, r, R,
            f"{where} experts down_proj (moe_intermediate_size = {f}, R = {R})")
        ids = ()
    else:
        ids = expert_ids(cfg, layout, r)
        # whole experts: the bank keeps references to this rank's experts, nothing is copied
        q["experts_up"] = ExpertBank([p["experts_up"][x] for x in ids])
        q["experts_down"] = ExpertBank([p["experts_down"][x] for x in ids])
    if p.get("shared_up") is None or layout.dense == "replicated":
        q["shared_up"], q["shared_down"] = p.get("shared_up"), p.get("shared_down")
    else:
        sh = cfg.moe_shared_expert_intermediate_size
        q["shared_up"], q["shared_down"] = _split_mlp(
            p["shared_up"], p["shared_down"], sh, r, R,
            f"{where} shared_experts down_proj (moe_shared_expert_intermediate_size = {sh}, R = {R})")
    # the routed output is partial on every rank (an all-reduce completes it); the shared expert as dense
    return q, LayerShard("moe", "tp", layout.experts, ids, shared=layout.dense)


def shard_layer(p, cfg, layout, r, where="layer"):
    """Rank r's (params, LayerShard) for one block of any type; dense blocks stay whole when replicated."""
    R, kind = layout.ranks, p["type"]
    if kind == "moe":
        return shard_moe(p, cfg, layout, r, where)
    if layout.dense == "replicated":
        return p, LayerShard(kind, "replicated")
    cut = {"mamba": shard_mamba, "attention": shard_attention, "mlp": shard_mlp}[kind]
    return cut(p, cfg, r, R, where)


def vocab_rows(cfg, layout, r):  # -> slice of the vocabulary rank r holds
    v = cfg.vocab_size
    return _part(v, r, layout.ranks) if layout.dense == "tp" else slice(0, v)


def shard_params(params, cfg, layout, r, with_mtp=True):
    """Rank r's whole parameter tree, and a dict of what its code needs: ``cfg`` (per rank), ``layers`` and
    ``mtp_layers`` (LayerShard each), ``vocab`` (the slice of the vocabulary its embedding and head hold)."""
    layout = check_layout(cfg, layout, with_mtp and params.get("mtp") is not None)
    if not isinstance(r, (int, np.integer)) or not 0 <= r < layout.ranks:
        raise InputError(f"rank must be an integer in [0, {layout.ranks}), got {r!r}")
    vocab = vocab_rows(cfg, layout, r)
    rows = _arange(vocab)
    out = {"norm_f": params["norm_f"], "embeddings": take_rows(params["embeddings"], rows)}
    tied = params["lm_head"] is params["embeddings"]
    out["lm_head"] = out["embeddings"] if tied else take_rows(params["lm_head"], rows)
    layers = [shard_layer(p, cfg, layout, r, f"layer {i}") for i, p in enumerate(params["layers"])]
    out["layers"] = [q for q, _ in layers]
    with_mtp = with_mtp and params.get("mtp") is not None
    plan = {"cfg": rank_config(cfg, layout, with_mtp), "vocab": vocab, "layout": layout,
            "layers": [s for _, s in layers], "mtp_layers": []}
    out["mtp"] = None
    if with_mtp:
        m = params["mtp"]
        cut = [shard_layer(p, cfg, layout, r, f"mtp layer {j}") for j, p in enumerate(m["layers"])]
        out["mtp"] = {k: m[k] for k in ("enorm", "hnorm", "eh_proj", "final_layernorm")}
        out["mtp"]["layers"] = [q for q, _ in cut]
        plan["mtp_layers"] = [s for _, s in cut]
    return out, plan
