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
# # 01 · The selective scan (Mamba-2 SSD)
#
# Nearly half of Nemotron 3's layers are Mamba-2 layers (23 of Nano's 52). Their core is a linear recurrence
# over time whose decay and input gates depend on the input ("selective"). Per head $h$ it reads
#
# $$
# S_t = e^{\Delta_t A}\, S_{t-1} + \Delta_t\, x_t B_t^\top, \qquad y_t = S_t C_t + D\, x_t ,
# $$
#
# with a state $S_t \in \mathbb{R}^{p\times n}$, a scalar $A<0$ per head, a step size
# $\Delta_t = \mathrm{clip}(\mathrm{softplus}(\Delta^{raw}_t + b_\Delta))$ and input-dependent
# $B_t, C_t \in \mathbb{R}^n$ shared by the heads of one group.
#
# This notebook checks that the token-by-token recurrence and the chunked *state space duality* (SSD) form
# compute the same thing, draws the decay matrix $L$ that makes SSD a matrix product, then opens up the
# bundled trained model: how fast each head forgets, and how big its state grows over a prompt.
# Everything is imported from `nemo_scratch`; the notebook only calls it.

# %%
import matplotlib

if "inline" not in matplotlib.get_backend():  # Jupyter renders inline; anywhere else draw off-screen (Agg)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import nemo_scratch
from nemo_scratch.model.blocks import block
from nemo_scratch.ops.linear import linear
from nemo_scratch.ops.norm import rms_norm
from nemo_scratch.ops.ssd import discretize_dt, segsum, ssd_scan_chunked, ssd_scan_sequential

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Recurrence vs chunked SSD
#
# `ssd_scan_sequential` is the definition above, one token at a time. `ssd_scan_chunked` cuts the sequence
# into chunks of $Q$ tokens: inside a chunk the recurrence is unrolled into a matrix product, and only one
# state per chunk is carried from chunk to chunk. Any chunk size must give the same result, including chunks
# that do not divide $t$ and a chunk longer than the sequence. We use float64 (the oracle mode), so "the
# same" means equal to rounding.

# %%
b, t, h, p, g, n = 2, 40, 4, 8, 2, 16
x = rng.normal(size=(b, t, h, p))
dt = discretize_dt(rng.normal(size=(b, t, h)), rng.normal(size=h) - 1.0)   # softplus(raw + bias) > 0
A = -np.exp(rng.normal(size=h))                                            # A = -exp(A_log) < 0
B, C = rng.normal(size=(b, t, g, n)), rng.normal(size=(b, t, g, n))
D = rng.normal(size=h)

y_ref, state_ref = ssd_scan_sequential(x, dt, A, B, C, D=D)
for chunk in (1, 3, 8, 16, 40, 64):
    y, state = ssd_scan_chunked(x, dt, A, B, C, chunk, D=D)
    err = np.abs(y - y_ref).max()
    print(f"chunk {chunk:3d}: max |y_chunked - y_sequential| = {err:.1e}")
    assert y.dtype == np.float64 and y.shape == (b, t, h, p)
    assert np.allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    assert np.allclose(state, state_ref, rtol=1e-10, atol=1e-12)

# %% [markdown]
# ## 2. The decay matrix $L$ and the semiseparable form
#
# Write $a_s = \Delta_s A$. Unrolling the recurrence from step $s$ to step $l \ge s$ multiplies the state by
#
# $$
# L_{ls} = \exp\Big(\sum_{k=s+1}^{l} a_k\Big) = \exp(\mathrm{segsum}(a))_{ls},
# \qquad L_{ls} = 0 \text{ for } s > l .
# $$
#
# `segsum` returns the exponent, with $-\infty$ above the diagonal so that $\exp$ gives exactly 0 (causality).
# Within one chunk (and without $D$) the scan is then one matrix product,
#
# $$
# y = M\,(\Delta \odot x), \qquad M_{ls} = (C_l \cdot B_s)\, L_{ls},
# $$
#
# a lower-triangular *semiseparable* matrix: this is the "duality" between the SSM and a masked, attention-like
# product.

# %%
q = 12
a = dt[0, :q, 0] * A[0]                                   # [q] one head's log-decay per step
L = np.exp(segsum(a))                                     # [q, q]
cum = np.cumsum(a)
expected = np.tril(np.exp(cum[:, None] - cum[None, :]))   # exp(a[s+1] + ... + a[l]) for l >= s
assert np.allclose(L, expected, rtol=1e-12, atol=0)
assert np.all(np.diag(L) == 1.0) and np.all(np.triu(L, 1) == 0.0)

# one head, one group: the whole scan as y = M (dt x)
x1, dt1, A1 = x[:1, :q, :1], dt[:1, :q, :1], A[:1]        # [1,q,1,p], [1,q,1], [1]
B1, C1 = B[:1, :q, :1], C[:1, :q, :1]                     # [1,q,1,n]
y1, _ = ssd_scan_chunked(x1, dt1, A1, B1, C1, chunk=q)
M = (C1[0, :, 0] @ B1[0, :, 0].T) * np.exp(segsum(dt1[0, :, 0] * A1[0]))   # [q, q]
assert np.allclose(y1[0, :, 0], M @ (dt1[0] * x1[0, :, 0]), rtol=1e-10, atol=1e-12)

fig, axes = plt.subplots(1, 2, figsize=(7, 3))
lim = np.abs(M).max()
for ax, mat, title, style in ((axes[0], L, "L = exp(segsum(dt A))", dict(cmap="viridis")),
                              (axes[1], M, "M = (C B^T) * L", dict(cmap="RdBu_r", vmin=-lim, vmax=lim))):
    im = ax.imshow(mat, **style)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("source step s")
    ax.set_ylabel("target step l")
    fig.colorbar(im, ax=ax, shrink=0.8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The bundled trained model
#
# `nemo_scratch.load()` with no argument loads the tiny Nemotron-3-shaped model shipped in
# `nemo_scratch/data/nemotron3-tiny` (byte-level tokenizer: one token per UTF-8 byte). It was trained for a few
# minutes on a CPU, on the docstrings and comments of Python's standard library (see its `TRAINING.md`), so
# our example texts read like docstrings.

# %%
model = nemo_scratch.load()
cfg = model.cfg
print(model)
mamba_layers = [i for i, bt in enumerate(cfg.layers_block_type) if bt == "mamba"]
print("Mamba layers:", mamba_layers, f"  h={cfg.mamba_num_heads} heads x p={cfg.mamba_head_dim}, "
      f"n={cfg.ssm_state_size}, g={cfg.n_groups}, dt clip {model.dt_limit}")

# %% [markdown]
# ### How fast does each head forget?
#
# With no input signal ($\Delta^{raw} = 0$) a head's step is $\Delta_0 = \mathrm{softplus}(b_\Delta)$ and each
# token multiplies its state by $e^{\Delta_0 A}$; after $k$ tokens what remains is $e^{k \Delta_0 A}$, so the
# *half-life* is $\ln 2 / (\Delta_0 |A|)$ tokens. Both $A = -e^{A_{log}}$ and $b_\Delta$ are trained
# per head. On real text $\Delta_t$ moves with the input: the second panel shows, per head, the mean decay per
# token over a prompt, using the layer's own `in_proj` on its block-normed input.

# %%
text = "Return the number of bytes in the buffer. If the file is closed, raise ValueError."
ids = np.array([model.tokenizer.encode(text)])                           # [1, t]
i_w, c_w = cfg.mamba_intermediate, cfg.conv_dim

decay_rest, decay_text = {}, {}
hs = model.embed(ids)                                                    # [1,t,d]
for li, p_layer in enumerate(model.params["layers"]):
    if p_layer["type"] == "mamba":
        dt0 = discretize_dt(np.zeros(cfg.mamba_num_heads, np.float32), p_layer["dt_bias"], *model.dt_limit)
        decay_rest[li] = np.exp(dt0 * p_layer["A"])                          # [h]
        xn = rms_norm(hs, p_layer["norm"], cfg.layer_norm_epsilon)
        dt_raw = linear(xn, p_layer["in_proj"])[..., i_w + c_w:]              # [1,t,h]  (z | xBC | dt)
        dt_text = discretize_dt(dt_raw, p_layer["dt_bias"], *model.dt_limit)
        decay_text[li] = np.exp(dt_text * p_layer["A"])[0].mean(axis=0)        # [h]
    hs = block(hs, p_layer, cfg, model.backend, None, model.dt_limit)

for li in mamba_layers:
    # a stable recurrence: every head's per-token decay lies strictly between 0 and 1
    assert np.all((decay_rest[li] > 0) & (decay_rest[li] < 1)), li
    half = np.log(2) / -np.log(decay_rest[li])
    print(f"layer {li}: half-life at rest (tokens) per head:", np.array2string(half, precision=1))

fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
k = np.arange(0, 64)
for li in mamba_layers:
    for hh, r in enumerate(decay_rest[li]):
        axes[0].plot(k, r ** k, color=f"C{mamba_layers.index(li)}", lw=0.8,
                     label=f"layer {li}" if hh == 0 else None)
    axes[1].plot(decay_text[li], "o-", ms=3, label=f"layer {li}")
axes[0].set(xlabel="tokens k", ylabel="exp(k dt0 A)", title="state kept after k tokens (at rest)")
axes[1].set(xlabel="head", ylabel="mean exp(dt_t A)", title="per-token decay on the prompt")
for ax in axes:
    ax.legend(fontsize=7)
    ax.title.set_fontsize(9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The SSM state over a prompt
#
# Decoding runs the recurrence one token at a time on a float32 state kept in the cache. We feed the prompt
# token by token through `Model.hidden` with a cache and read every Mamba layer's state
# $S \in \mathbb{R}^{h\times p\times n}$ after each token. The final states must equal those that one chunked
# prefill over the whole prompt leaves in a fresh cache: the two forms of section 1, inside the real model.

# %%
cache = model.new_cache(1)
norms = []                                                                # per token: [layers, h]
for s in range(ids.shape[1]):
    h_last = model.hidden(ids[:, s:s + 1], cache)
    norms.append([np.linalg.norm(cache.layers[li]["ssm"][0], axis=(1, 2)) for li in mamba_layers])
norms = np.array(norms)                                                   # [t, layers, h]

prefill = model.new_cache(1)
h_all = model.hidden(ids, prefill)
for li in mamba_layers:
    assert cache.layers[li]["ssm"].dtype == np.float32
    assert np.allclose(cache.layers[li]["ssm"], prefill.layers[li]["ssm"], rtol=1e-4, atol=1e-5), li
assert np.allclose(h_last[0, -1], h_all[0, -1], rtol=1e-4, atol=1e-4)

fig, axes = plt.subplots(1, len(mamba_layers), figsize=(3 * len(mamba_layers), 2.6), sharey=True)
for ax, j in zip(np.atleast_1d(axes), range(len(mamba_layers))):
    ax.plot(norms[:, j, :], lw=0.9)
    ax.set_title(f"layer {mamba_layers[j]}: |S| per head", fontsize=9)
    ax.set_xlabel("token")
np.atleast_1d(axes)[0].set_ylabel("Frobenius norm")
fig.tight_layout()
plt.show()

# %% [markdown]
# The state norms stay bounded: each step first shrinks the state by $e^{\Delta_t A} < 1$ and then adds one
# rank-one update $\Delta_t x_t B_t^\top$, so a head with a short half-life tracks only the last few bytes while
# a slow head accumulates context over the whole sentence.
