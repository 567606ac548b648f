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
from nemo_scratch.exercises import check_half_lives, check_sequential_scan
from nemo_scratch.model.blocks import block
from nemo_scratch.ops.linear import linear
from nemo_scratch.ops.norm import rms_norm
from nemo_scratch.ops.ssd import discretize_dt, segsum, ssd_scan_chunked, ssd_scan_sequential

rng = np.random.default_rng(0)
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                     "ytick.labelsize": 8, "legend.fontsize": 8})

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

fig, axes = plt.subplots(1, 2, figsize=(8, 3.3))
lim = np.abs(M).max()
panels = ((axes[0], L, "decay L = exp(segsum(dt A))", dict(cmap="viridis", vmin=0, vmax=1),
           "share of state s kept at step l"),
          (axes[1], M, "SSD matrix M = (C B^T) * L", dict(cmap="RdBu_r", vmin=-lim, vmax=lim),
           "weight of input s in output l"))
for ax, mat, title, style, label in panels:
    im = ax.imshow(mat, **style)
    ax.set_title(title)
    ax.set(xlabel="source step s (token)", ylabel="target step l (token)", xticks=range(0, q, 2),
           yticks=range(0, q, 2))
    fig.colorbar(im, ax=ax, shrink=0.85, label=label)
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
# *half-life* is $\ln 2 / (\Delta_0 |A|)$ tokens. Both $A = -e^{A_{log}}$ and $b_\Delta$ are trained per
# head. That is the baseline. On real text $\Delta_t$ moves with the input ("selective"): below we compute,
# with each layer's own `in_proj` on its block-normed input, the decay $e^{\Delta_t A}$ of every head at every
# byte of a prompt, and its half-life $\ln 2 / (\Delta_t |A|)$.

# %%
text = ("Return the number of bytes in the buffer. If the file is closed, raise ValueError.\n"
        "    def read(self, size=-1):\n        return self._buffer[:size]\n")
ids = np.array([model.tokenizer.encode(text)])                           # [1, t]
i_w, c_w = cfg.mamba_intermediate, cfg.conv_dim

decay_rest, decay_text = {}, {}                                          # layer -> [h], [t, h]
hs = model.embed(ids)                                                    # [1,t,d]
for li, p_layer in enumerate(model.params["layers"]):
    if p_layer["type"] == "mamba":
        dt0 = discretize_dt(np.zeros(cfg.mamba_num_heads, np.float32), p_layer["dt_bias"], *model.dt_limit)
        decay_rest[li] = np.exp(dt0 * p_layer["A"])                          # [h]
        xn = rms_norm(hs, p_layer["norm"], cfg.layer_norm_epsilon)
        dt_raw = linear(xn, p_layer["in_proj"])[..., i_w + c_w:]              # [1,t,h]  (z | xBC | dt)
        dt_text = discretize_dt(dt_raw, p_layer["dt_bias"], *model.dt_limit)
        decay_text[li] = np.exp(dt_text * p_layer["A"])[0]                    # [t,h]
    hs = block(hs, p_layer, cfg, model.backend, None, model.dt_limit)

half_rest = {li: np.log(2) / -np.log(decay_rest[li]) for li in mamba_layers}   # tokens
half_text = {li: np.log(2) / -np.log(decay_text[li]) for li in mamba_layers}   # [t,h] tokens
for li in mamba_layers:
    # a stable recurrence: every head's per-token decay lies strictly between 0 and 1
    assert np.all((decay_rest[li] > 0) & (decay_rest[li] < 1)), li
    assert np.all((decay_text[li] > 0) & (decay_text[li] < 1)), li
    print(f"layer {li}: half-life at rest (tokens) per head:", np.array2string(half_rest[li], precision=1))

# %% [markdown]
# **Which bytes make a head forget?** Group the prompt's bytes by class and take each head's median half-life
# over the bytes of that class. The first column is the baseline at rest. Colour is on a log scale: dark =
# forgets within a token, bright = remembers for hundreds.

# %%
classes = {"letter": str.isalpha, "space": lambda c: c == " ", "newline": lambda c: c == "\n",
           "punct./digit": lambda c: not (c.isalpha() or c.isspace())}
byte_class = np.array([next(k for k, f in classes.items() if f(ch)) for ch in text])
rows = [(li, hh) for li in mamba_layers for hh in range(cfg.mamba_num_heads)]
table = np.array([[half_rest[li][hh]] + [np.median(half_text[li][byte_class == k, hh]) for k in classes]
                  for li, hh in rows])                                   # [layers*h, 1 + classes]

fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), gridspec_kw={"width_ratios": [1, 2.2]})
im = axes[0].imshow(np.log10(table), cmap="magma", aspect="auto", vmin=-1, vmax=np.log10(table.max()))
axes[0].set_xticks(range(1 + len(classes)), ["at rest"] + list(classes), rotation=30, ha="right")
axes[0].set_yticks(range(len(rows)), [f"L{li} h{hh}" for li, hh in rows], fontsize=7)
axes[0].set(title="median half-life by byte class", ylabel="Mamba layer, head")
cb = fig.colorbar(im, ax=axes[0], shrink=0.9)
cb.set_label("half-life (tokens, log10)")
shown = 64                                                               # the first 64 bytes, one tick each
im2 = axes[1].imshow(np.concatenate([decay_text[li][:shown].T for li in mamba_layers]), cmap="viridis",
                     aspect="auto", vmin=0, vmax=1)
axes[1].set_xticks(range(shown), [repr(ch)[1:-1] for ch in text[:shown]], fontsize=7)
axes[1].set_yticks(range(len(rows)), [f"L{li} h{hh}" for li, hh in rows], fontsize=7)
axes[1].set(title="per-token decay exp(dt_t A) over the prompt", xlabel="byte of the prompt")
fig.colorbar(im2, ax=axes[1], shrink=0.9, label="state kept per token")
fig.tight_layout()
plt.show()

# %%
# the heads whose state a space or a newline wipes out (half-life under one token there) but that keep
# several tokens inside words: word-boundary resets, learned, not built in
k_space, k_letter = 1 + list(classes).index("space"), 1 + list(classes).index("letter")
resets = [(rows[r], table[r, k_letter], table[r, k_space]) for r in range(len(rows))
          if table[r, k_space] < 1 < 4 < table[r, k_letter]]
for (li, hh), inside, at_space in resets:
    print(f"layer {li} head {hh}: half-life {inside:.1f} tokens inside words, {at_space:.2f} at a space "
          f"(at rest {half_rest[li][hh]:.1f})")
assert resets, "expected at least one head that resets at word boundaries"
spread = table[:, 0].max() / table[:, 0].min()
print(f"at rest the half-lives span a factor {spread:.0f}: from {table[:, 0].min():.1f} to "
      f"{table[:, 0].max():.0f} tokens")

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
    norms.append([np.linalg.norm(cache.layers[li].ssm[0], axis=(1, 2)) for li in mamba_layers])
norms = np.array(norms)                                                   # [t, layers, h]

prefill = model.new_cache(1)
h_all = model.hidden(ids, prefill)
for li in mamba_layers:
    assert cache.layers[li].ssm.dtype == np.float32
    assert np.allclose(cache.layers[li].ssm, prefill.layers[li].ssm, rtol=1e-4, atol=1e-5), li
assert np.allclose(h_last[0, -1], h_all[0, -1], rtol=1e-4, atol=1e-4)

fig, axes = plt.subplots(1, len(mamba_layers), figsize=(3.3 * len(mamba_layers), 2.9), sharey=True)
for ax, j in zip(np.atleast_1d(axes), range(len(mamba_layers))):
    for hh in range(cfg.mamba_num_heads):
        ax.plot(norms[:, j, hh], lw=0.9, label=f"h{hh}")
    ax.set_title(f"layer {mamba_layers[j]}: state norm per head")
    ax.set_xlabel("token position (bytes read)")
np.atleast_1d(axes)[0].set_ylabel("||S||_F (Frobenius norm)")
np.atleast_1d(axes)[-1].legend(ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
fig.tight_layout()
plt.show()

# %% [markdown]
# The state norms stay bounded: each step first shrinks the state by $e^{\Delta_t A} < 1$ and then adds one
# rank-one update $\Delta_t x_t B_t^\top$, so a head with a short half-life tracks only the last few bytes while
# a slow head accumulates context over the whole sentence.

# %% [markdown]
# ## Exercises
#
# Each exercise has a checker from `nemo_scratch.exercises` that runs your answer against the package and
# says whether it is right, and if not, where it first goes wrong. The starting points below are plausible
# first attempts with one mistake each; the cells show what the checker says about them. Fix them.
#
# **1. Write the sequential scan.** `my_scan(x, dt, A, B, C, D)` takes `x [b,t,h,p]`, `dt [b,t,h]`, `A [h]`,
# `B, C [b,t,g,n]`, `D [h]` and returns `(y [b,t,h,p], final_state [b,h,p,n])`, following the recurrence at
# the top of this notebook (head `hh` uses group `hh // (h // g)`). The attempt below forgets something.

# %%
def my_scan(x, dt, A, B, C, D):
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    state = np.zeros((b, h, p, n))
    y = np.zeros_like(x)
    for s in range(t):
        Bh = np.repeat(B[:, s], h // g, axis=1)                              # [b,h,n]
        Ch = np.repeat(C[:, s], h // g, axis=1)
        state = (np.exp(dt[:, s] * A)[..., None, None] * state
                 + dt[:, s, :, None, None] * x[:, s, :, :, None] * Bh[:, :, None, :])
        y[:, s] = np.einsum("bhpn,bhn->bhp", state, Ch)
    return y, state


result = check_sequential_scan(my_scan)
print(result)
assert not result, "the starting point is meant to be wrong"

# %% [markdown]
# **2. Half-lives at rest.** Return `{layer index: array of h half-lives}` for every Mamba layer of `model`:
# the number of tokens after which a head keeps half its state when $\Delta^{raw} = 0$ (use the clip
# `model.dt_limit`). The attempt below computes the mean lifetime $1/(\Delta_0|A|)$ instead.

# %%
def my_half_lives(model):
    out = {}
    for li, p_layer in enumerate(model.params["layers"]):
        if p_layer["type"] == "mamba":
            dt0 = np.maximum(np.log1p(np.exp(p_layer["dt_bias"])), model.dt_limit[0])
            out[li] = 1 / (dt0 * -p_layer["A"])
    return out


result = check_half_lives(my_half_lives(model), model)
print(result)
assert not result
