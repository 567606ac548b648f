"""The four mixers of a Nemotron 3 block, built from the ops through one backend object.

Each mixer is a function ``mixer(x, p, cfg, be, state) -> y`` with x the block-normed input [b, t, d],
p the layer's parameter dict (see model/weights.py), be the backend (nemo_scratch.backends), and state the
layer's entry of a Cache (model/cache.py: a MambaState, a KVCache, or None) or None for a plain forward.
A block is ``h = h + mixer(rms_norm(h))`` (spec section 2); there is no separate FFN sub-block.
"""

from __future__ import annotations

from .weights import as_dense

# Attention of t new tokens against a cache of s keys runs the decode op (split-K over the cache on the GPU
# backends) when the new tokens are few and the cache holds more than them: a decode step (t = 1) or a
# speculative verification of 1 + draft_depth tokens. Longer continuations run the prefill op.
DECODE_MAX_NEW_TOKENS = 8


def attention_op(be, t, s):
    """The attention op for t new tokens against s cached keys (the rule above)."""
    return be.gqa_decode if t <= DECODE_MAX_NEW_TOKENS and s > t else be.gqa_attention


def mamba_mixer(x, p, cfg, be, state=None, dt_limit=(0.0, float("inf"))):  # [b,t,d] -> [b,t,d]
    """Mamba-2 mixer (spec 3.1-3.3): in_proj -> conv1d+SiLU on xBC -> SSD scan -> gated RMSNorm -> out_proj."""
    b, t, _ = x.shape
    h, pd, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    i, c = cfg.mamba_intermediate, cfg.conv_dim
    dt_min, dt_max = dt_limit
    # zxbcdt = x W_in^T, split z | xBC | dt  (pitfall 2: z and dt skip the conv)
    conv_w, conv_b, dt_bias, D = (as_dense(p[k], x.dtype) for k in ("conv_weight", "conv_bias", "dt_bias", "D"))
    zxbcdt = be.linear(x, p["in_proj"])                                       # [b,t,i+c+h]
    z, xbc, dt_raw = zxbcdt[..., :i], zxbcdt[..., i:i + c], zxbcdt[..., i + c:]
    if state is not None and (t == 1 or state.recording):
        # Decode (and speculative verification): step token by token with the rolling conv state and the SSM
        # state. A recording state keeps the state after every token, so that Cache.accept() can roll back
        # to any accepted prefix; the numbers are exactly those of plain decoding. Plain decode updates the
        # state buffers in place.
        ys = []
        for s in range(t):
            conv, ssm = state.conv, state.ssm
            in_place = {} if state.recording else {"out_state": conv}
            xbc_s, conv = be.causal_conv1d_step(xbc[:, s], conv, conv_w, conv_b, **in_place)
            xs, bm, cm = xbc_s[:, :i], xbc_s[:, i:i + g * n], xbc_s[:, i + g * n:]
            dt = be.discretize_dt(dt_raw[:, s], dt_bias, dt_min, dt_max)                            # [b,h]
            in_place = {} if state.recording else {"out_state": ssm}
            y_s, ssm = be.ssd_step(xs.reshape(b, h, pd), dt, p["A"], bm.reshape(b, g, n), cm.reshape(b, g, n),
                                   D, ssm, **in_place)                                               # [b,h,p]
            state.update(conv, ssm)
            ys.append(y_s)
        y = be.xp.stack(ys, axis=1)                                                                  # [b,t,h,p]
    else:
        xbc, conv = be.causal_conv1d(xbc, conv_w, conv_b, state=None if state is None else state.conv)  # [b,t,c]
        xs, bm, cm = xbc[..., :i], xbc[..., i:i + g * n], xbc[..., i + g * n:]
        # dt = clip(softplus(dt + dt_bias), dt_min, dt_max)   (the dt floor is a documented switch: model.py)
        dt = be.discretize_dt(dt_raw, dt_bias, dt_min, dt_max)                                      # [b,t,h]
        y, ssm = be.ssd_scan(xs.reshape(b, t, h, pd), dt, p["A"], bm.reshape(b, t, g, n), cm.reshape(b, t, g, n),
                             cfg.chunk_size, D=D, initial_state=None if state is None else state.ssm)
        if state is not None:
            state.update(conv, ssm)
    # gate first, then group RMSNorm over groups of width i/g (pitfall 4)
    y = be.gated_rms_norm(y.reshape(b, t, i), z, as_dense(p["gated_norm"], x.dtype), g, cfg.layer_norm_epsilon)
    return be.linear(y, p["out_proj"])


def attention_mixer(x, p, cfg, be, state=None):  # [b,t,d] -> [b,t,d]
    """GQA attention, no positional encoding (spec 4). The KVCache state holds K and V of past positions."""
    b, t, _ = x.shape
    q_heads, kv_heads, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = be.linear(x, p["q_proj"]).reshape(b, t, q_heads, dh)
    k = be.linear(x, p["k_proj"]).reshape(b, t, kv_heads, dh)
    v = be.linear(x, p["v_proj"]).reshape(b, t, kv_heads, dh)
    if state is None:
        o = be.gqa_attention(q, k, v)                                          # [b,t,q,dh]
    else:
        k, v = state.append(k, v)                                              # [b,s,kv,dh]: cache + new
        o = attention_op(be, t, k.shape[1])(q, k, v)
    return be.linear(o.reshape(b, t, q_heads * dh), p["o_proj"])


def moe_mixer(x, p, cfg, be, state=None):  # [b,t,d] -> [b,t,d]
    """(Latent)MoE (spec 5): route on the full width, experts in latent space, shared expert on full width."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    # router: sigmoid(x W_gate^T); bias for selection only; normalise; * routed_scaling_factor (pitfall 8)
    idx, w = be.route(xf, p["gate"], as_dense(p["gate_bias"], x.dtype), cfg.num_experts_per_tok, cfg.n_group,
                      cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)  # [bt,k], [bt,k]
    # routed = fc2(experts(fc1(x)))  (fc None: identity)
    out = be.latent_moe(xf, idx, w, p["experts_up"], p["experts_down"], p.get("fc1"), p.get("fc2"))  # [bt,d]
    if p.get("shared_up") is not None:
        # shared expert: unscaled, full width, on the block-normed input (pitfall 7)
        out = out + be.mlp(xf, p["shared_up"], p["shared_down"])
    return out.reshape(b, t, d)


def mlp_mixer(x, p, cfg, be, state=None):  # [b,t,d] -> [b,t,d]
    """Dense squared-ReLU MLP block ("-"): down(relu2(up(x)))."""
    b, t, d = x.shape
    return be.mlp(x.reshape(b * t, d), p["up"], p["down"]).reshape(b, t, d)


MIXERS = {"mamba": mamba_mixer, "attention": attention_mixer, "moe": moe_mixer, "mlp": mlp_mixer}


def block(h, p, cfg, be, state=None, dt_limit=(0.0, float("inf"))):  # [b,t,d] -> [b,t,d]
    """One residual block: h + mixer(RMSNorm(h))."""
    x = be.rms_norm(h, as_dense(p["norm"], h.dtype), cfg.layer_norm_epsilon)
    if p["type"] == "mamba":
        return h + mamba_mixer(x, p, cfg, be, state, dt_limit)
    return h + MIXERS[p["type"]](x, p, cfg, be, state)
