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
from nemo_scratch.exercises import check_causal_attention, check_uniform_baseline
from nemo_scratch.model.blocks import block
from nemo_scratch.ops.attention import gqa_attention, gqa_decode
from nemo_scratch.ops.linear import linear
from nemo_scratch.ops.norm import rms_norm

rng = np.random.default_rng(0)
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                     "ytick.labelsize": 8, "legend.fontsize": 8})

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
nq_m, nkv_m, dh_m = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
print(model, f"\nattention layer {layer}: q={nq_m} heads, kv={nkv_m}, dh={dh_m}")


def attention_inputs(text):
    """ids [1,t], the block input hs [1,t,d] and Q [1,t,q,dh], K, V [1,t,kv,dh] of the attention layer."""
    ids = np.array([model.tokenizer.encode(text)])
    hs = model.embed(ids)                                                    # [1,t,d]
    for p_layer in model.params["layers"][:layer]:
        hs = block(hs, p_layer, cfg, model.backend, None, model.dt_limit)
    p_att = model.params["layers"][layer]
    xn = rms_norm(hs, p_att["norm"], cfg.layer_norm_epsilon)                 # the block-normed input
    t = ids.shape[1]
    Q = linear(xn, p_att["q_proj"]).reshape(1, t, nq_m, dh_m)
    K = linear(xn, p_att["k_proj"]).reshape(1, t, nkv_m, dh_m)
    V = linear(xn, p_att["v_proj"]).reshape(1, t, nkv_m, dh_m)
    return ids, hs, Q, K, V


text = "If the file is not found, return None. Otherwise return the name of the file."
ids, hs, Q, K, V = attention_inputs(text)
T = ids.shape[1]
p_att = model.params["layers"][layer]
O = gqa_attention(Q, K, V)
rebuilt = hs + linear(O.reshape(1, T, -1), p_att["o_proj"])
assert np.allclose(rebuilt, block(hs, p_att, cfg, model.backend), rtol=1e-5, atol=1e-5)

# decoding the last token against the cached K, V gives the last row of the prefill
assert np.allclose(gqa_decode(Q[:, -1:], K, V), O[:, -1:], rtol=1e-5, atol=1e-6)

P = attention_weights(Q, K)[0]                                          # [q,t,t]
assert np.all(np.triu(P, 1) == 0.0) and np.allclose(P.sum(axis=-1), 1.0, atol=1e-5)

# %% [markdown]
# One heatmap per query head: row $l$ is where the byte at position $l$ looks. The last panel is the
# **baseline**, uniform causal attention ($P_{ls} = 1/(l+1)$ for $s \le l$): a head that has learned nothing
# about content would look like it. Heads in one group share their keys but not their queries, so they can
# still look at different places.

# %%
rq = nq_m // nkv_m
uniform_P = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]       # [t,t] the baseline
panels = [(P[jh], f"q head {jh} (kv head {jh // rq})") for jh in range(nq_m)] + [(uniform_P, "uniform baseline")]
cols = 4
fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(11, 5.6), layout="constrained")
norm = PowerNorm(0.5, vmin=0, vmax=1)                                    # sqrt scale shows small weights
for i, (ax, (mat, title)) in enumerate(zip(axes.ravel(), panels)):
    im = ax.imshow(mat, cmap="magma", norm=norm)
    ax.set_title(title)
    ax.set(xticks=range(0, T, 20), yticks=range(0, T, 20))
    if i % cols == 0:
        ax.set_ylabel("query position l (byte)")
    if i >= len(panels) - cols:
        ax.set_xlabel("key position s (byte)")
for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
fig.suptitle(f"attention of layer {layer} on {text!r}", fontsize=10)
fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight P[l, s] (sqrt colour scale)")
plt.show()

# %% [markdown]
# ### Are these heads more than uniform?
#
# By eye the heads look diffuse. Numbers settle it. Over three texts (prose and code) and every query
# position $l \ge 8$ (the first few rows are uniform-like for any head), per head:
# - **entropy** $-\sum_s P_{ls}\ln P_{ls}$ as a share of the uniform row's $\ln(l+1)$ (1 = uniform),
# - the weight on the byte **itself** and on the **previous** byte (uniform: $1/(l+1)$ each),
# - the **mean distance** $\sum_s P_{ls}(l-s)$ looked back (uniform: $l/2$),
# and the same statistics of the uniform baseline.

# %%
texts = [text,
         "def read(self, size=-1):\n    if size < 0:\n        return self.readall()\n"
         "    return self.buffer.read(size)\n",
         "    Return the number of bytes in the buffer. If the buffer is empty, return 0; if the buffer is "
         "closed, raise ValueError.\n"]
runs = []                                                                # (ids [t], P [q,t,t]) per text
for tx in texts:
    ids_t, _, Q_t, K_t, _ = attention_inputs(tx)
    runs.append((ids_t[0], attention_weights(Q_t, K_t)[0]))

L0 = 8
stats = {name: [] for name in ("entropy", "self", "prev", "distance")}
base = {name: [] for name in stats}
for ids_t, P_t in runs:
    t = len(ids_t)
    l = np.arange(L0, t)
    rowsP = P_t[:, L0:]                                                  # [q, t-L0, t]
    ent = -np.sum(np.where(rowsP > 0, rowsP * np.log(np.where(rowsP > 0, rowsP, 1)), 0), axis=-1)
    stats["entropy"].append(ent)
    stats["self"].append(rowsP[:, np.arange(t - L0), l])
    stats["prev"].append(rowsP[:, np.arange(t - L0), l - 1])
    stats["distance"].append(np.sum(rowsP * (l[:, None] - np.arange(t)[None, :]), axis=-1))
    base["entropy"].append(np.log(l + 1.0))
    base["self"].append(1 / (l + 1.0))
    base["prev"].append(1 / (l + 1.0))
    base["distance"].append(l / 2)
head = {k: np.concatenate(v, axis=1).mean(axis=1) for k, v in stats.items()}   # [q] per statistic
unif = {k: np.concatenate(v).mean() for k, v in base.items()}                # scalar per statistic
ent_ratio = np.concatenate(stats["entropy"], axis=1).mean(1) / unif["entropy"]

print(f"{'':10s}{'entropy/uniform':>16s}{'self':>8s}{'prev':>8s}{'distance':>10s}")
for jh in range(nq_m):
    print(f"head {jh:<5d}{ent_ratio[jh]:16.2f}{head['self'][jh]:8.3f}{head['prev'][jh]:8.3f}"
          f"{head['distance'][jh]:10.1f}")
print(f"{'uniform':10s}{1.0:16.2f}{unif['self']:8.3f}{unif['prev']:8.3f}{unif['distance']:10.1f}")
assert np.all(ent_ratio < 1), "every trained head is more peaked than uniform"
assert np.all(head["prev"] < 2 * unif["prev"]), "no head is a previous-token head"
assert np.all(head["self"] < 2 * unif["self"]) and np.all(np.abs(head["distance"] / unif["distance"] - 1) < 0.15)

# %% [markdown]
# Every head is more peaked than uniform (entropy below 1), but none is *positional*: weights on the byte
# itself and on the previous one, and the distance looked back, are those of uniform attention. The Mamba
# layers before this layer already carry the recent bytes in their state. So what do the heads pick? Group
# the **keys** by the class of their byte, and compare the attention each class receives with what uniform
# attention gives it (the share of such bytes before each query). Colour is $\log_2$ of that ratio: red =
# sought, blue = avoided.

# %%
key_classes = {"letter": lambda c: chr(c).isalpha(), "space": lambda c: c == 32, "newline": lambda c: c == 10,
               "punctuation": lambda c: not (chr(c).isalnum() or chr(c).isspace())}
got = np.zeros((nq_m, len(key_classes)))
want = np.zeros(len(key_classes))
for ids_t, P_t in runs:
    t = len(ids_t)
    for ci, f in enumerate(key_classes.values()):
        member = np.array([f(c) for c in ids_t], dtype=float)               # [t]
        got[:, ci] += (P_t[:, L0:] @ member).sum(axis=-1)                  # weight on that class
        uniform_t = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]       # [t,t]
        want[ci] += (uniform_t[L0:] @ member).sum()
ratio = got / want                                                       # [q, classes]

fig, ax = plt.subplots(figsize=(6.2, 3.6))
lim = np.abs(np.log2(ratio)).max()
im = ax.imshow(np.log2(ratio), cmap="RdBu_r", vmin=-lim, vmax=lim)
for (jh, ci), r in np.ndenumerate(ratio):
    ax.text(ci, jh, f"{r:.2f}", ha="center", va="center", fontsize=8)
ax.set_xticks(range(len(key_classes)), list(key_classes), rotation=25, ha="right")
ax.set_yticks(range(nq_m), [f"q head {jh}" for jh in range(nq_m)])
ax.set(xlabel="class of the key byte", title="attention received / uniform's, per key class")
fig.colorbar(im, ax=ax, label="log2(ratio to uniform)")
fig.tight_layout()
plt.show()

# %%
best = np.unravel_index(np.argmax(ratio), ratio.shape)
cls_names = list(key_classes)
print(f"strongest preference: head {best[0]} gives {cls_names[best[1]]} bytes {ratio[best]:.2f}x the weight "
      f"uniform attention would")
for ci, name in enumerate(cls_names):
    fav = int(np.argmax(ratio[:, ci]))
    print(f"  {name:12s} most sought by head {fav} ({ratio[fav, ci]:.2f}x), least by head "
          f"{int(np.argmin(ratio[:, ci]))} ({ratio[:, ci].min():.2f}x)")
assert ratio.max() > 1.3, "some head prefers a class of bytes"

# %% [markdown]
# ### A control: is there an induction head?
#
# Many transformers learn *induction heads*: on the second copy of a repeated string they look at the byte
# that followed the current byte last time, and copy it. Test it directly: 30 random letters, repeated. If
# a head did this, its weight on that target would be far above uniform, and the model would predict the
# second copy well.

# %%
n, trials = 30, 6
ls = np.arange(n + 1, 2 * n)                                             # queries in the second copy
target, acc = [], []
for _ in range(trials):
    seg = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), n))
    rep_ids, _, Q_r, K_r, _ = attention_inputs(seg + seg)
    P_r = attention_weights(Q_r, K_r)[0]
    target.append(P_r[:, ls, ls - n + 1].mean(axis=-1))                 # [q] weight on the induction target
    logits_r = model.forward(rep_ids)[0]
    acc.append([np.mean(logits_r[a:b - 1].argmax(-1) == rep_ids[0, a + 1:b]) for a, b in ((0, n), (n, 2 * n))])
target, acc = np.mean(target, axis=0), np.mean(acc, axis=0)
uniform_target = np.mean(1 / (ls + 1))
print(f"{trials} random strings of {n} bytes, each repeated once")
print("weight on the induction target per head:", np.round(target, 3), f" uniform: {uniform_target:.3f}")
print(f"next-byte accuracy: first copy {acc[0]:.1%}, second copy {acc[1]:.1%}")
lean = int(np.argmax(target))
copies = acc[1] > acc[0] + 0.2
print(f"-> {'an induction mechanism' if copies else 'no induction'}: the second copy is predicted "
      f"{'much better' if copies else 'no better'} than the first; the most target-seeking head, head {lean}, "
      f"gives the target {target[lean] / uniform_target:.2f}x uniform's weight")
assert not copies

# %% [markdown]
# So this one attention layer of a 2.5M-parameter model, trained for minutes, has learned *content*
# preferences (which classes of bytes to read) but neither positional nor copying heads. That is a property
# of this toy, not of Nemotron 3: the statistics above are the tool to ask the same question of a real model.
#
# ## Exercises
#
# Each checker from `nemo_scratch.exercises` runs your answer against the package and says whether it is right,
# and where it first goes wrong. The starting points below have one mistake each; fix them.
#
# **1. The uniform baseline.** `uniform_stats(t)` returns a dict of three arrays of length $t$ for uniform
# causal attention over $t$ positions: `"entropy"` (nats), `"self"` (weight on the query's own position) and
# `"distance"` (mean $l - s$ looked back). The attempt below gets the distance wrong.

# %%
def uniform_stats(t):
    l = np.arange(t)
    return {"entropy": np.log(l + 1), "self": 1 / (l + 1), "distance": (l + 1) / 2}


result = check_uniform_baseline(uniform_stats)
print(result)
assert not result

# %% [markdown]
# **2. One head from the formula.** `one_head(q, k, v)` takes `[t, dh]` arrays and returns the causal
# attention output `[t, dh]`. The attempt below forgets something in the formula at the top.

# %%
def one_head(q, k, v):
    scores = q @ k.T + np.triu(np.full((len(q), len(k)), -np.inf), 1)
    w = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ v


result = check_causal_attention(one_head)
print(result)
assert not result
