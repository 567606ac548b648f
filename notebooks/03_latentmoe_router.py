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
# # 03 · The LatentMoE router
#
# Nearly half of Nemotron 3's layers are mixture-of-experts (MoE) layers (23 of Nano's 52). A router picks $k$
# of $e$ small experts for every token (Super and Ultra: 22 of 512). It reads the block-normed input
# $x \in \mathbb{R}^d$ at full width:
#
# $$
# s = \sigma(W_g x) \in (0,1)^e, \qquad
# \mathcal{I} = \mathrm{top}k\,(s + b), \qquad
# w_i = \gamma\,\frac{s_i}{\sum_{j\in\mathcal{I}} s_j} \quad (i \in \mathcal{I}),
# $$
#
# with sigmoid scores $s$, the `e_score_correction_bias` $b$ and `routed_scaling_factor` $\gamma$. The bias
# $b$ only *selects*: it is the auxiliary-loss-free load balancing of DeepSeek-V3, nudged during training so
# that every expert gets a similar share of tokens. The weights $w$ use the unbiased $s$.
#
# **LatentMoE**: the routed experts do not run at width $d$ but in a latent width $l < d$,
#
# $$
# \mathrm{MoE}(x) = W_{fc2} \sum_{i\in\mathcal{I}} w_i\, W^{down}_i\,\mathrm{relu}\big(W^{up}_i W_{fc1} x\big)^2
#   \;+\; W^{down}_{sh}\,\mathrm{relu}\big(W^{up}_{sh} x\big)^2 ,
# $$
#
# plus a shared expert that every token uses, at full width and unscaled.

# %%
import matplotlib

if "inline" not in matplotlib.get_backend():  # Jupyter renders inline; anywhere else draw off-screen (Agg)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import keyword
import re

import nemo_scratch
from nemo_scratch.exercises import check_load_cv, check_route
from nemo_scratch.model.blocks import block, moe_mixer
from nemo_scratch.ops.linear import linear
from nemo_scratch.ops.moe import latent_moe, mlp, route
from nemo_scratch.ops.norm import rms_norm, sigmoid

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                     "ytick.labelsize": 8, "legend.fontsize": 8})

# %% [markdown]
# ## 1. Route a text through the trained model
#
# We run the bundled model block by block and, at each MoE layer, route the block-normed input exactly as the
# mixer does.

# %%
model = nemo_scratch.load()
cfg = model.cfg
e, topk, gamma = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.routed_scaling_factor
print(model, f"\n{e} routed experts, top-{topk}, routed_scaling_factor {gamma}, latent width "
      f"l={cfg.moe_latent_size} of d={cfg.hidden_size}")

text = ("Return a new list of the items in the dictionary.\n\n    If the key is not found, raise KeyError. "
        "The default value is None.\n    # Check that the file is open before reading from it.\n")
ids = np.array([model.tokenizer.encode(text)])
T = ids.shape[1]
ROUTER = dict(top_k=topk, n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
              routed_scaling_factor=gamma)                              # route()'s settings from the config
moe_in = {}                                                             # layer -> block-normed input [T,d]
hs = model.embed(ids)
for li, p_layer in enumerate(model.params["layers"]):
    if p_layer["type"] == "moe":
        moe_in[li] = rms_norm(hs, p_layer["norm"], cfg.layer_norm_epsilon)[0]
    hs = block(hs, p_layer, cfg, model.backend, None, model.dt_limit)
moe_layers = list(moe_in)
routes = {li: route(moe_in[li], model.params["layers"][li]["gate"], model.params["layers"][li]["gate_bias"],
                    **ROUTER) for li in moe_layers}
print("MoE layers:", moe_layers, f"  {T} tokens")

# %% [markdown]
# ## 2. Router invariants
#
# Every token gets $k$ *distinct* experts, ordered by their biased score; the weights are positive and sum to
# $\gamma$ (`norm_topk_prob`); and they are the formula above evaluated on the unbiased sigmoid scores.

# %%
for li in moe_layers:
    p_layer, x = model.params["layers"][li], moe_in[li]
    idx, w = routes[li]
    assert idx.shape == (T, topk) and idx.dtype == np.int64 and w.shape == (T, topk) and w.dtype == np.float32
    assert np.all((idx >= 0) & (idx < e))
    assert all(len(set(row)) == topk for row in idx.tolist())               # k distinct experts
    assert np.all(w > 0) and np.allclose(w.sum(axis=1), gamma, rtol=1e-6)
    s = sigmoid(linear(x, p_layer["gate"]))                                 # [T,e] unbiased scores
    biased = np.take_along_axis(s + p_layer["gate_bias"], idx, axis=1)
    assert np.all(np.diff(biased, axis=1) <= 0)                             # descending biased score
    s_sel = np.take_along_axis(s, idx, axis=1)
    assert np.allclose(w, gamma * s_sel / s_sel.sum(axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
print("router invariants hold on every MoE layer")

# %% [markdown]
# ## 3. What the correction bias changes
#
# Route the same inputs again with $b = 0$. The bias changes *which* experts are picked for some tokens. Where
# the selected set is the same, the weights are identical: the bias never enters them.

# %%
loads_bias, loads_plain = {}, {}
print("layer  tokens with another set  experts swapped/token  bias range         load CV (bias / no bias)")
for li in moe_layers:
    p_layer, x = model.params["layers"][li], moe_in[li]
    idx_b, w_b = routes[li]
    idx_0, w_0 = route(x, p_layer["gate"], None, **ROUTER)
    same = np.sort(idx_b, axis=1) == np.sort(idx_0, axis=1)
    same_set = same.all(axis=1)
    swapped = np.array([topk - len(set(a) & set(c)) for a, c in zip(idx_b.tolist(), idx_0.tolist())])
    # same set -> same weights (compare in expert order)
    ob, o0 = np.argsort(idx_b, axis=1), np.argsort(idx_0, axis=1)
    assert np.allclose(np.take_along_axis(w_b, ob, 1)[same_set], np.take_along_axis(w_0, o0, 1)[same_set],
                       rtol=1e-6, atol=1e-7)
    loads_bias[li] = np.bincount(idx_b.ravel(), minlength=e)
    loads_plain[li] = np.bincount(idx_0.ravel(), minlength=e)
    assert loads_bias[li].sum() == loads_plain[li].sum() == T * topk
    cv = [lo.std() / lo.mean() for lo in (loads_bias[li], loads_plain[li])]
    assert cv[0] < cv[1], f"layer {li}: the trained bias should balance the expert load"
    bias = p_layer["gate_bias"]
    print(f"{li:5d} {(~same_set).sum():12d} / {T:<4d} {swapped.mean():18.2f}      "
          f"[{bias.min():+.3f}, {bias.max():+.3f}]   {cv[0]:.2f} / {cv[1]:.2f}")

fig, axes = plt.subplots(1, len(moe_layers), figsize=(3.6 * len(moe_layers), 3.0), sharey=True)
for ax, li in zip(np.atleast_1d(axes), moe_layers):
    ax.bar(np.arange(e) - 0.2, loads_bias[li], width=0.4, label="trained bias (as the model runs)")
    ax.bar(np.arange(e) + 0.2, loads_plain[li], width=0.4, label="control: bias switched off")
    ax.axhline(T * topk / e, color="k", lw=0.8, ls="--", label="perfect balance T k / e")
    ax.set_title(f"layer {li}: load CV {loads_bias[li].std() / loads_bias[li].mean():.2f} with bias, "
                 f"{loads_plain[li].std() / loads_plain[li].mean():.2f} without")
    ax.set_xlabel("expert id")
np.atleast_1d(axes)[0].set_ylabel(f"tokens routed (of T k = {T * topk})")
handles, names = np.atleast_1d(axes)[0].get_legend_handles_labels()
fig.legend(handles, names, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1.0))
fig.tight_layout(rect=(0, 0, 1, 0.9))
plt.show()

# %% [markdown]
# The dashed line is the perfectly balanced load $Tk/e$; the coefficient of variation (CV = std / mean of the
# loads) measures how far each layer is from it. Without its bias the router crowds a few favourite experts;
# the trained bias spreads the same tokens much more evenly, on every layer (asserted above).
#
# ## 4. Do experts specialise?
#
# Balance says nothing about *what* each expert does. Label every byte of a longer text, half docstring, half
# code, by its class: letters, letters inside a Python **keyword** (`def`, `return`, `if`, `None`, ...),
# digits, spaces, newlines and punctuation, and count, per class, how often each expert is among the $k$
# picks. If experts ignored content, every class would spread like the average token. As a number: the
# mutual information $I(\text{class};\text{expert})$ in bits, against a **control** where the same labels
# are shuffled across tokens (any dependence destroyed), and against the router with its bias switched off.

# %%
code = ('def read(self, size=-1):\n    """Read at most size bytes, returned as a bytes object.\n\n'
        '    If the size argument is negative, read until EOF is reached.\n    Return an empty bytes object at '
        'EOF.\n    """\n    if size is None or size < 0:\n        return self.readall()\n'
        '    for i in range(0, 4096, 512):\n        if not self._buffer:\n            break\n'
        '    return None  # 3 retries, timeout 2.5 s, port 8080\n')
cids = np.array([model.tokenizer.encode(code)])
Tc = cids.shape[1]
in_keyword = np.zeros(Tc, bool)
for m in re.finditer(r"\b(%s)\b" % "|".join(keyword.kwlist), code):
    in_keyword[m.start():m.end()] = True
CLASSES = ["letter", "keyword", "digit", "space", "newline", "punctuation"]


def byte_class(i):
    ch = code[i]
    if in_keyword[i]:
        return "keyword"
    return ("letter" if ch.isalpha() else "digit" if ch.isdigit() else "space" if ch == " " else
            "newline" if ch == "\n" else "punctuation")


label = np.array([CLASSES.index(byte_class(i)) for i in range(Tc)])     # [Tc]
counts = np.bincount(label, minlength=len(CLASSES))

moe_in_code = {}
hs = model.embed(cids)
for li, p_layer in enumerate(model.params["layers"]):
    if p_layer["type"] == "moe":
        moe_in_code[li] = rms_norm(hs, p_layer["norm"], cfg.layer_norm_epsilon)[0]
    hs = block(hs, p_layer, cfg, model.backend, None, model.dt_limit)


def share_by_class(idx):  # [Tc,k] -> [classes, e]: share of a class's tokens that pick each expert
    out = np.zeros((len(CLASSES), e))
    for c, row in zip(label, idx):
        out[c, row] += 1
    return out / counts[:, None]


def mutual_information(lab, idx):  # bits between a token's class and each of its k experts
    joint = np.zeros((len(CLASSES), e))
    for c, row in zip(lab, idx):
        joint[c, row] += 1
    joint /= joint.sum()
    indep = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log2(joint[nz] / indep[nz])))


shuffle_rng = np.random.default_rng(0)
shares, mi = {}, {}
print(f"{Tc} bytes: " + ", ".join(f"{n} {c}" for c, n in zip(CLASSES, counts)))
print("layer   I(class; expert) bits   shuffled labels (mean of 20)   bias switched off")
for li in moe_layers:
    p_layer = model.params["layers"][li]
    idx_c, _ = route(moe_in_code[li], p_layer["gate"], p_layer["gate_bias"], **ROUTER)
    idx_off, _ = route(moe_in_code[li], p_layer["gate"], None, **ROUTER)
    shares[li] = share_by_class(idx_c)
    control = [mutual_information(shuffle_rng.permutation(label), idx_c) for _ in range(20)]
    mi[li] = (mutual_information(label, idx_c), np.mean(control), mutual_information(label, idx_off))
    print(f"{li:5d} {mi[li][0]:18.2f} {mi[li][1]:24.2f} {mi[li][2]:25.2f}")
    assert mi[li][0] > 3 * mi[li][1], f"layer {li}: routing should depend on the byte class"

fig, axes = plt.subplots(len(moe_layers), 1, figsize=(10, 2.3 * len(moe_layers)), sharex=True,
                         layout="constrained")
for ax, li in zip(np.atleast_1d(axes), moe_layers):
    im = ax.imshow(shares[li], cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(CLASSES)), [f"{c} ({n})" for c, n in zip(CLASSES, counts)])
    ax.set_title(f"layer {li}: share of each class's bytes routed to each expert "
                 f"(I = {mi[li][0]:.2f} bits, shuffled {mi[li][1]:.2f})")
np.atleast_1d(axes)[-1].set_xticks(range(e))
np.atleast_1d(axes)[-1].set_xlabel("expert id")
fig.colorbar(im, ax=axes, shrink=0.8, label=f"share of the class's bytes (each picks {topk} experts)")
plt.show()

# %%
first = moe_layers[0]
for c, name in enumerate(CLASSES):
    top = int(np.argmax(shares[first][c]))
    others = np.delete(np.arange(len(CLASSES)), c)
    print(f"layer {first}: {name:11s} -> expert {top:2d} for {shares[first][c, top]:4.0%} of them "
          f"(other classes: {np.average(shares[first][others, top], weights=counts[others]):4.0%})")
digit, newline = CLASSES.index("digit"), CLASSES.index("newline")
assert shares[first][digit].max() > 0.5 and shares[first][newline].max() > 0.5


def similarity(a, b):  # cosine similarity of two classes' expert shares on the first MoE layer
    u, v = shares[first][CLASSES.index(a)], shares[first][CLASSES.index(b)]
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


print(f"routing similarity to letters: keyword {similarity('keyword', 'letter'):.2f}, "
      f"space {similarity('space', 'letter'):.2f}, digit {similarity('digit', 'letter'):.2f}")
assert similarity("keyword", "letter") > max(similarity("digit", "letter"), similarity("space", "letter"))
kept = [mi[li][2] / mi[li][0] for li in moe_layers]
print(f"with the bias switched off the router keeps {min(kept):.0%} to {max(kept):.0%} of that information")

# %% [markdown]
# Read the heatmap row by row: a class with one bright cell has an expert of its own. The printout puts each
# class's favourite expert next to how often the *other* bytes go there, so a dedicated expert stands out from
# a generally busy one. Letters spread over many experts, and letters inside keywords route like other
# letters (a byte-level model sees `return` as six letters; the similarity above says how alike). The mutual
# information is several times the shuffled control on every layer (asserted), so the experts do specialise
# by the kind of byte they see.
#
# ## 5. The latent projection
#
# `fc1_latent_proj` is $W_{fc1} \in \mathbb{R}^{l\times d}$: the experts only ever see $W_{fc1}x$, the input
# projected on the $l$-dimensional row space of $W_{fc1}$. How much of the input's energy $\lVert x\rVert^2$
# survives that projection? For comparison: a random $l$-dimensional subspace keeps $l/d$ on average, and the
# best possible one (the top $l$ principal directions of these inputs) keeps the most (Eckart-Young).

# %%
l, d = cfg.moe_latent_size, cfg.hidden_size
print(f"fc1 {model.params['layers'][moe_layers[0]]['fc1'].shape} (l x d), fc2 "
      f"{model.params['layers'][moe_layers[0]]['fc2'].shape} (d x l)")
print("layer  kept by fc1  best l-dim (PCA)  random l-dim")
for li in moe_layers:
    x = moe_in[li].astype(np.float64)
    basis, _ = np.linalg.qr(model.params["layers"][li]["fc1"].T.astype(np.float64))   # [d,l] orthonormal
    kept_fc1 = np.sum((x @ basis) ** 2) / np.sum(x ** 2)
    sv = np.linalg.svd(x, compute_uv=False)
    kept_best = np.sum(sv[:l] ** 2) / np.sum(sv ** 2)
    assert 0 <= kept_fc1 <= kept_best + 1e-9 <= 1 + 1e-9
    print(f"{li:5d} {kept_fc1:12.1%} {kept_best:17.1%} {l / d:13.1%}")

# %% [markdown]
# The trained $W_{fc1}$ keeps only a little more than a random subspace would, far from the best $l$ directions:
# it is not trained to reconstruct $x$, only to give the experts what they need, and the shared expert still
# sees the full width.
#
# Finally, the MoE mixer of the model is exactly the sum of the two parts in the formula: the routed experts
# in latent space, $W_{fc2}\,\mathrm{experts}(W_{fc1}x)$ (`latent_moe`), plus the shared expert (`mlp`). The
# latent width also shrinks every routed expert: $2fl$ instead of $2fd$ weights each.

# %%
for li in moe_layers:
    p_layer, x = model.params["layers"][li], moe_in[li]
    idx, w = routes[li]
    parts = (latent_moe(x, idx, w, p_layer["experts_up"], p_layer["experts_down"], p_layer["fc1"], p_layer["fc2"])
             + mlp(x, p_layer["shared_up"], p_layer["shared_down"]))
    assert np.allclose(moe_mixer(x[None], p_layer, cfg, model.backend)[0], parts, rtol=1e-5, atol=1e-6)

f = cfg.moe_intermediate_size
latent_params = e * 2 * f * l + 2 * l * d
print(f"routed experts of one layer: {latent_params:,} weights with the latent (incl. fc1, fc2) vs "
      f"{e * 2 * f * d:,} at full width ({latent_params / (e * 2 * f * d):.0%})")

# %% [markdown]
# ## Exercises
#
# Each checker from `nemo_scratch.exercises` runs your answer against the package and says whether it is right,
# and where it first goes wrong. The starting points below have one mistake each; fix them.
#
# **1. Write the router.** `my_route(x, gate, bias, k, scale)` takes `x [t,d]`, `gate [e,d]`, the correction
# bias `[e]`, `k` and `routed_scaling_factor`, and returns `(idx [t,k], w [t,k])` as in the formula at the top
# (one group, `norm_topk_prob`). The attempt below lets the bias into the weights.

# %%
def my_route(x, gate, bias, k, scale):
    s = 1 / (1 + np.exp(-(x @ gate.T)))
    biased = s + bias
    idx = np.argsort(-biased, axis=1)[:, :k]
    w = np.take_along_axis(biased, idx, axis=1)
    return idx, scale * w / w.sum(axis=1, keepdims=True)


result = check_route(my_route)
print(result)
assert not result

# %% [markdown]
# **2. The load CV.** `my_cv(idx, n_experts)` returns std / mean of the number of tokens each of the
# `n_experts` experts receives, as in section 3. The attempt below forgets the experts nobody picked.

# %%
def my_cv(idx, n_experts):
    load = np.bincount(idx.ravel())
    return load.std() / load.mean()


result = check_load_cv(my_cv)
print(result)
assert not result

