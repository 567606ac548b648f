# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Grouped-query attention (GQA)
#
# A few layers of Nemotron 3 (6 of Nano's 52) are plain softmax attention, with no positional encoding at all
# (the Mamba layers before them already know where they are). For a query head $j$,
#
# $$
# O_j = \mathrm{softmax}\!\Big(\frac{Q_j K_{\kappa(j)}^\top}{\sqrt{d_h}} + M\Big) V_{\kappa(j)}, \qquad
# \kappa(j) = \Big\lfloor \frac{j}{q/kv} \Big\rfloor, \qquad
# M_{ls} = \begin{cases} 0 & s \le l \\ -\infty & s > l \end{cases}
# $$
#
# *Grouped* query attention keeps only $kv < q$ key/value heads: each group of $q/kv$ consecutive query heads
# shares one, which shrinks the KV cache by a factor $q/kv$ (16 for Nano: 32 query heads, 2 KV heads).
# The mask $M$ makes it causal.

# %%
import matplotlib

if "inline" not in matplotlib.get_backend():  # Jupyter renders inline; anywhere else draw off-screen (Agg)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm

import nemo_scratch
from nemo_scratch.model.blocks import block
from nemo_scratch.ops.attention import gqa_attention, gqa_decode
from nemo_scratch.ops.linear import linear
from nemo_scratch.ops.norm import rms_norm

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. GQA is multi-head attention with repeated K and V
#
# Repeating every KV head $q/kv$ times (transformers' `repeat_kv`) turns GQA into ordinary multi-head attention
# with $kv = q$. `gqa_attention` never materialises the copies, but it must give the same numbers. We also
# write one head out from the formula above.

# %%
b, t, nq, nkv, dh = 1, 7, 6, 2, 8
r = nq // nkv                                         # query heads per KV head
q = rng.normal(size=(b, t, nq, dh))
k, v = rng.normal(size=(b, t, nkv, dh)), rng.normal(size=(b, t, nkv, dh))

o = gqa_attention(q, k, v)                                                    # [b,t,q,dh]
o_mha = gqa_attention(q, np.repeat(k, r, axis=2), np.repeat(v, r, axis=2))    # kv == q: plain MHA
assert o.shape == (b, t, nq, dh)
assert np.allclose(o, o_mha, rtol=1e-12, atol=1e-12)

j = 4                                                 # query head 4 reads KV head 4 // 3 = 1
scores = q[0, :, j] @ k[0, :, j // r].T / np.sqrt(dh) + np.triu(np.full((t, t), -np.inf), 1)
probs = np.exp(scores - scores.max(axis=1, keepdims=True))
probs /= probs.sum(axis=1, keepdims=True)
assert np.allclose(o[0, :, j], probs @ v[0, :, j // r], rtol=1e-12, atol=1e-12)

# %% [markdown]
# ## 2. Reading the attention weights out of the op
#
# `gqa_attention` returns $O = PV$, not $P$. But $O$ is linear in $V$: with one-hot values
# $V_{s,\cdot} = e_s$ the output row $l$ *is* the row $P_{l,\cdot}$. So we can read $P$ out of the very op the
# model runs, $d_h$ key positions per call. The causal mask shows up as exact zeros above the diagonal, and
# every row is a probability distribution.

# %%
def attention_weights(q, k):  # [b,t,q,dh], [b,s,kv,dh] -> P [b,q,t,s]
    """The softmax weights of gqa_attention, probed with one-hot values (O = P V is linear in V)."""
    s, dh = k.shape[1], k.shape[3]
    cols = []
    for s0 in range(0, s, dh):
        width = min(dh, s - s0)
        onehot = np.zeros(k.shape, dtype=k.dtype)
        onehot[:, s0 + np.arange(width), :, np.arange(width)] = 1       # value of key s0+i = e_i
        cols.append(gqa_attention(q, k, onehot)[..., :width])            # [b,t,q,width] = P[..., s0:s0+width]
    return np.concatenate(cols, axis=-1).transpose(0, 2, 1, 3)


P = attention_weights(q, k)                                             # [b,q,t,t]
assert np.allclose(np.einsum("bjls,bsjd->bljd", P, np.repeat(v, r, axis=2)), o, rtol=1e-12, atol=1e-12)
assert np.all(np.triu(P, 1) == 0.0)                                     # causal: no weight on the future
assert np.allclose(P.sum(axis=-1), 1.0)

# %% [markdown]
# ## 3. The trained model's attention layer
#
# We run the bundled model's blocks up to its attention layer (`blocks.block`, exactly what the forward pass
# does), apply that block's RMSNorm and its $W_q, W_k, W_v$, and check that our pieces rebuild the block's
# output, $h + O W_o^\top$.

# %%
model = nemo_scratch.load()
cfg = model.cfg
layer = cfg.layers_block_type.index("attention")
print(model, f"\nattention layer {layer}: q={cfg.num_attention_heads} heads, kv={cfg.num_key_value_heads}, "
      f"dh={cfg.head_dim}")

text = "If the file is not found, return None. Otherwise return the name of the file."
ids = np.array([model.tokenizer.encode(text)])
hs = model.embed(ids)                                                    # [1,t,d]
for p_layer in model.params["layers"][:layer]:
    hs = block(hs, p_layer, cfg, model.backend, None, model.dt_limit)

p_att = model.params["layers"][layer]
xn = rms_norm(hs, p_att["norm"], cfg.layer_norm_epsilon)                 # the block-normed input
T = ids.shape[1]
Q = linear(xn, p_att["q_proj"]).reshape(1, T, cfg.num_attention_heads, cfg.head_dim)
K = linear(xn, p_att["k_proj"]).reshape(1, T, cfg.num_key_value_heads, cfg.head_dim)
V = linear(xn, p_att["v_proj"]).reshape(1, T, cfg.num_key_value_heads, cfg.head_dim)
O = gqa_attention(Q, K, V)
rebuilt = hs + linear(O.reshape(1, T, -1), p_att["o_proj"])
assert np.allclose(rebuilt, block(hs, p_att, cfg, model.backend), rtol=1e-5, atol=1e-5)

# decoding the last token against the cached K, V gives the last row of the prefill
assert np.allclose(gqa_decode(Q[:, -1:], K, V), O[:, -1:], rtol=1e-5, atol=1e-6)

P = attention_weights(Q, K)[0]                                          # [q,t,t]
assert np.all(np.triu(P, 1) == 0.0) and np.allclose(P.sum(axis=-1), 1.0, atol=1e-5)

# %% [markdown]
# One heatmap per query head: row $l$ is where the byte at position $l$ looks. Heads in one group share their
# keys but not their queries, so they can still look at different places.

# %%
rq = cfg.num_attention_heads // cfg.num_key_value_heads
cols = 3
rows = -(-cfg.num_attention_heads // cols)
fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows))
chars = [repr(chr(c))[1:-1] for c in ids[0]]
for jh, ax in enumerate(axes.ravel()):
    if jh >= cfg.num_attention_heads:
        ax.axis("off")
        continue
    ax.imshow(P[jh], cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1))   # sqrt scale shows small weights
    ax.set_title(f"q head {jh} (kv head {jh // rq})", fontsize=8)
    ax.set_xticks(range(0, T, 8), [chars[i] for i in range(0, T, 8)], fontsize=6)
    ax.set_yticks(range(0, T, 8), [chars[i] for i in range(0, T, 8)], fontsize=6)
fig.tight_layout()
plt.show()

# %% [markdown]
# A few numbers per head: the mean weight on the token itself, on the previous token and on the first token,
# and the mean distance $\sum_s P_{ls}(l-s)$ it looks back.

# %%
pos = np.arange(T)
dist = (P * (pos[:, None] - pos[None, :])).sum(axis=-1).mean(axis=-1)   # [q]
print("head   self   prev  first  mean distance")
for jh in range(cfg.num_attention_heads):
    diag, prev, first = np.diagonal(P[jh]), np.diagonal(P[jh], -1), P[jh, :, 0]
    print(f"{jh:4d} {diag.mean():6.2f} {prev.mean():6.2f} {first.mean():6.2f} {dist[jh]:9.1f}")
