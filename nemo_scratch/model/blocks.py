"""The four mixers of a Nemotron 3 block, built from the ops through one backend object.

Each mixer is a function ``mixer(x, p, cfg, be, cache) -> y`` with x the block-normed input [b, t, d],
p the layer's parameter dict (see model/params.py), be the backend (nemo_scratch.backends), and cache the
layer's entry of a Cache (or None for a plain forward). A block is ``h = h + mixer(rms_norm(h))``
(spec section 2); there is no separate FFN sub-block.
"""

from __future__ import annotations

import numpy as np


def mamba_mixer(x, p, cfg, be, cache=None, dt_limit=(0.0, float("inf"))):  # [b,t,d] -> [b,t,d]
    """Mamba-2 mixer (spec 3.1-3.3): in_proj -> conv1d+SiLU on xBC -> SSD scan -> gated RMSNorm -> out_proj."""
    b, t, _ = x.shape
    xp = be.xp
    h, pd, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    i, c = cfg.mamba_intermediate, cfg.conv_dim
    # zxbcdt = x W_in^T, split z | xBC | dt  (pitfall 2: z and dt skip the conv)
    zxbcdt = be.linear(x, p["in_proj"])                                       # [b,t,i+c+h]
    z, xbc, dt_raw = zxbcdt[..., :i], zxbcdt[..., i:i + c], zxbcdt[..., i + c:]
    dt_min, dt_max = dt_limit
    if cache is not None and (t == 1 or cache.get("record")):
        # Decode (and speculative verification): step token by token with the rolling conv state and the
        # float32 SSM state. In "record" mode every intermediate state is kept so that Cache.accept() can
        # roll back to any accepted prefix, and the numbers are exactly those of plain decoding.
        ys, conv_hist, ssm_hist = [], [], []
        conv, ssm = cache["conv"], cache["ssm"]
        for s in range(t):
            xbc_s, conv = be.causal_conv1d_step(xbc[:, s], conv, p["conv_weight"], p["conv_bias"])   # [b,c]
            xs, bm, cm = xbc_s[:, :i], xbc_s[:, i:i + g * n], xbc_s[:, i + g * n:]
            dt = be.discretize_dt(dt_raw[:, s], p["dt_bias"], dt_min, dt_max)                       # [b,h]
            y_s, ssm = be.ssd_step(xs.reshape(b, h, pd), dt, p["A"], bm.reshape(b, g, n), cm.reshape(b, g, n),
                                   p["D"], ssm)                                                      # [b,h,p]
            ys.append(y_s)
            if cache.get("record"):
                conv_hist.append(conv)
                ssm_hist.append(ssm)
        cache["conv"], cache["ssm"] = conv, ssm
        if cache.get("record"):
            cache["conv_history"], cache["ssm_history"] = conv_hist, ssm_hist
        y = xp.stack(ys, axis=1)                                                                     # [b,t,h,p]
    else:
        state = None if cache is None else cache["conv"]
        xbc, conv = be.causal_conv1d(xbc, p["conv_weight"], p["conv_bias"], state=state)            # [b,t,c]
        xs, bm, cm = xbc[..., :i], xbc[..., i:i + g * n], xbc[..., i + g * n:]
        # dt = clip(softplus(dt + dt_bias), dt_min, dt_max)   (the dt floor is a documented switch: model.py)
        dt = be.discretize_dt(dt_raw, p["dt_bias"], dt_min, dt_max)                                 # [b,t,h]
        y, ssm = be.ssd_scan(xs.reshape(b, t, h, pd), dt, p["A"], bm.reshape(b, t, g, n), cm.reshape(b, t, g, n),
                             cfg.chunk_size, D=p["D"], initial_state=None if cache is None else cache["ssm"])
        if cache is not None:
            cache["conv"], cache["ssm"] = conv, ssm
    # gate first, then group RMSNorm over groups of width i/g (pitfall 4)
    y = be.gated_rms_norm(y.reshape(b, t, i), z, p["gated_norm"], g, cfg.layer_norm_epsilon)
    return be.linear(y, p["out_proj"])


def attention_mixer(x, p, cfg, be, cache=None):  # [b,t,d] -> [b,t,d]
    """GQA attention, no positional encoding (spec 4). The cache holds K and V of every past position."""
    b, t, _ = x.shape
    xp = be.xp
    q_heads, kv_heads, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = be.linear(x, p["q_proj"]).reshape(b, t, q_heads, dh)
    k = be.linear(x, p["k_proj"]).reshape(b, t, kv_heads, dh)
    v = be.linear(x, p["v_proj"]).reshape(b, t, kv_heads, dh)
    if cache is None:
        o = be.gqa_attention(q, k, v)                                          # [b,t,q,dh]
    else:
        if cache.get("k") is not None:
            k = xp.concatenate([cache["k"], k], axis=1)                       # [b,s,kv,dh]
            v = xp.concatenate([cache["v"], v], axis=1)
        cache["k"], cache["v"] = k, v
        o = be.gqa_decode(q, k, v) if t <= 8 and k.shape[1] > t else be.gqa_attention(q, k, v)
    return be.linear(o.reshape(b, t, q_heads * dh), p["o_proj"])


def moe_mixer(x, p, cfg, be, cache=None):  # [b,t,d] -> [b,t,d]
    """(Latent)MoE (spec 5): route on the full width, experts in latent space, shared expert on full width."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    # router: sigmoid(x W_gate^T); bias for selection only; normalise; * routed_scaling_factor
    idx, w = be.route(xf, p["gate"], p["gate_bias"], cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                      cfg.norm_topk_prob, cfg.routed_scaling_factor)              # [bt,k], [bt,k]
    u = be.linear(xf, p["fc1"]) if p.get("fc1") is not None else xf              # [bt,l]
    routed = be.moe_experts(u, idx, w, p["experts_up"], p["experts_down"])       # [bt,l]
    if p.get("fc2") is not None:
        routed = be.linear(routed, p["fc2"])                                      # [bt,d]
    if p.get("shared_up") is not None:
        # shared expert: unscaled, full width, on the block-normed input (pitfall 7)
        routed = routed + be.mlp(xf, p["shared_up"], p["shared_down"])
    return routed.reshape(b, t, d)


def mlp_mixer(x, p, cfg, be, cache=None):  # [b,t,d] -> [b,t,d]
    """Dense squared-ReLU MLP block ("-"): down(relu2(up(x)))."""
    b, t, d = x.shape
    return be.mlp(x.reshape(b * t, d), p["up"], p["down"]).reshape(b, t, d)


MIXERS = {"mamba": mamba_mixer, "attention": attention_mixer, "moe": moe_mixer, "mlp": mlp_mixer}


def block(h, p, cfg, be, cache=None, dt_limit=(0.0, float("inf"))):  # [b,t,d] -> [b,t,d]
    """One residual block: h + mixer(RMSNorm(h))."""
    x = be.rms_norm(h, p["norm"], cfg.layer_norm_epsilon)
    if p["type"] == "mamba":
        return h + mamba_mixer(x, p, cfg, be, cache, dt_limit)
    return h + MIXERS[p["type"]](x, p, cfg, be, cache)


def new_layer_cache(block_type, cfg, batch, dtype, xp=np):
    """Empty cache entry of one layer: conv + float32 SSM state for Mamba, K/V for attention, nothing else."""
    if block_type == "mamba":
        return {"conv": xp.zeros((batch, cfg.conv_dim, cfg.conv_kernel), dtype=dtype),
                "ssm": xp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), dtype=dtype)}
    if block_type == "attention":
        return {"k": None, "v": None}
    return {}
