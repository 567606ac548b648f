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
# # 06 · The full model, end to end
#
# A Nemotron 3 model is a stack of residual blocks, each with exactly one mixer (Mamba-2 `M`, attention `*`,
# MoE `E`, or a dense MLP `-`), between an embedding table and an untied output head:
#
# $$
# h^{(0)} = E[x], \qquad h^{(i+1)} = h^{(i)} + \mathrm{mixer}_i\big(\mathrm{RMSNorm}_i(h^{(i)})\big), \qquad
# \mathrm{logits} = \mathrm{RMSNorm}_f(h^{(n)})\, W_{head}^\top .
# $$
#
# This notebook runs the bundled tiny model as a whole (forward, cached decoding, generation), then does the
# accounting for the real sizes, from their configs alone: parameters, checkpoint bytes and GPU memory of
# Nano, Super and Ultra, next to NVIDIA's published figures.

# %%
import matplotlib

if "inline" not in matplotlib.get_backend():  # Jupyter renders inline; anywhere else draw off-screen (Agg)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import nemo_scratch
from nemo_scratch.checkpoint.convert import inspect_checkpoint
from nemo_scratch.exercises import check_bits_per_byte, check_mamba_layer_params
from nemo_scratch.model.generate import token_probs
from nemo_scratch.params import PUBLISHED, count_params, format_plan, plan

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                     "ytick.labelsize": 8, "legend.fontsize": 8})

# %% [markdown]
# ## 1. Load and run forward
#
# The bundled model has every ingredient at toy size. It was trained on the docstrings and comments of Python's
# standard library (`nemo_scratch/data/nemotron3-tiny/TRAINING.md`). Its tokenizer is byte-level (token id =
# byte value), so the next-token loss in bits is directly *bits per byte*; a model that knows nothing scores
# $\log_2 256 = 8$.

# %%
model = nemo_scratch.load()
cfg = model.cfg
tok = model.tokenizer
print(model)
print(f"layers '{cfg.hybrid_override_pattern}' + MTP '{cfg.mtp_hybrid_override_pattern}', d={cfg.hidden_size}, "
      f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, latent l={cfg.moe_latent_size}")

text = "Return the number of bytes in the buffer. If the file is closed, raise ValueError."
ids = np.array([tok.encode(text)])                                       # [1, t]
logits = model.forward(ids)                                              # [1, t, v]
assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and logits.dtype == np.float32
p_next = token_probs(logits[0, :-1])                                     # [t-1, v] float64
nll_bits = -np.log2(p_next[np.arange(ids.shape[1] - 1), ids[0, 1:]])     # bits per byte at each position
print(f"next-byte loss on the text: {nll_bits.mean():.2f} bits per byte (uniform guess: 8)")
assert nll_bits.mean() < 4, "the trained model should need far fewer than 8 bits per byte"

half = (len(text) + 1) // 2
fig, axes = plt.subplots(2, 1, figsize=(11, 4.2), sharey=True)
for ax, lo, hi in ((axes[0], 1, half), (axes[1], half, len(text))):
    pos = np.arange(lo, hi)
    ax.bar(pos, nll_bits[pos - 1], width=0.9)
    ax.axhline(8, color="k", lw=0.8, ls="--", label="uniform guess: 8 bits")
    ax.axhline(nll_bits.mean(), color="C3", lw=0.8, ls=":", label=f"mean {nll_bits.mean():.2f} bits")
    ax.set_xticks(pos, ["␣" if c == " " else repr(c)[1:-1] for c in text[lo:hi]], fontsize=8)
    ax.set(xlim=(lo - 0.6, hi - 0.4), ylabel="bits")
axes[0].set_title("surprise -log2 p(byte | the bytes before it), byte by byte")
axes[0].legend(loc="upper right")
axes[1].set_xlabel("byte of the text (the first has no context and is not scored)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Cached decoding equals the full forward
#
# Generation runs one token at a time with a cache: per Mamba layer the last conv inputs and the SSM state,
# per attention layer the keys and values. A prefill of the first half followed by single-token steps must give
# the logits of one forward over the whole text.

# %%
cache = model.new_cache(1)
half = ids.shape[1] // 2
stepped = [model.forward(ids[:, :half], cache)]
for s in range(half, ids.shape[1]):
    stepped.append(model.forward(ids[:, s:s + 1], cache))
stepped = np.concatenate(stepped, axis=1)
print(f"max |cached - full| = {np.abs(stepped - logits).max():.1e}")
assert cache.length == ids.shape[1]
assert np.allclose(stepped, logits, rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## 3. Generation
#
# Greedy decoding takes the argmax at every step. `Model.generate` uses the cache; the naive loop below
# recomputes the whole sequence for every new token. They must pick the same tokens. Sampling at a
# temperature with nucleus (top-p) truncation is one argument away.

# %%
prompt = "If the file "
pids = tok.encode(prompt)
greedy = model.generate(pids, 32)
naive = list(pids)
for _ in range(32):
    naive.append(int(model.forward([naive])[0, -1].argmax()))
assert greedy.ids[0].tolist() == naive[len(pids):]
print("greedy :", repr(prompt + tok.decode(greedy.ids[0])))
sampled = model.generate(pids, 32, greedy=False, temperature=0.8, top_p=0.9, seed=0)
print("sampled:", repr(prompt + tok.decode(sampled.ids[0])))
print(f"{greedy.tokens_per_s:.0f} tokens/s greedy on the NumPy reference")

# %% [markdown]
# ## 4. Counting parameters and bytes
#
# `params.plan` needs only a config: it lists every tensor the config implies (the same list the loader
# checks checkpoints against) and adds up parameters, bytes under a storage recipe, and an even split over
# GPUs. *Active* parameters count the routed experts at $k/e$ (only $k$ of $e$ run per token) and leave out
# the embedding lookup. First the bundled model, where the count must equal what is actually in its
# checkpoint.

# %%
tiny = count_params(cfg)
stored = inspect_checkpoint(model.path)
assert tiny["total_with_mtp"] == stored["total_params"]
print(f"bundled model: {tiny['total']:,} parameters ({tiny['total_with_mtp']:,} with MTP), "
      f"{tiny['active']:,} active per token; checkpoint {stored['file_bytes'] / 1e6:.2f} MB")

# %% [markdown]
# Then the real models. Recipes: `bf16` stores everything in 16 bits; `nano`, `super` and `ultra` are
# NVIDIA's NVFP4 recipes (4.5-bit routed experts, FP8 or NVFP4 elsewhere, some layers kept in BF16).

# %%
GB, GIB = 1e9, 2 ** 30


def human(x, unit=""):
    """1.9M, 31.58B, 352.3G: three significant figures with a suffix."""
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}{unit}"
    return f"{x:.4g}{unit}"


rows = [(cfg, "bf16")] + [(name, recipe) for name in ("nano", "super", "ultra") for recipe in ("bf16", name)]
reports = {}
print(f"{'model':7s}{'recipe':7s}{'total':>9s}{'active':>9s}{'checkpoint':>12s}{'bits/param':>12s}"
      f"{'per GPU of 8 x 80 GiB':>26s}")
for model_cfg, recipe in rows:
    r = plan(model_cfg, recipe, gpus=8, gpu_mem_gib=80)
    name = "tiny" if r["model"] == "custom config" else r["model"]
    reports[name, recipe] = r
    p, b, g = r["params"], r["bytes"], r["gpus"]
    print(f"{name:7s}{recipe:7s}{human(p['total']):>9s}{human(p['active']):>9s}{human(b['total'], 'B'):>12s}"
          f"{b['bits_per_param']:12.2f}{g['per_gpu_gib']:16.2f} GiB {'fits' if g['fits'] else 'NO':>4s}")

# %% [markdown]
# ### Against the published figures
#
# NVIDIA publishes total and active parameters (and, for Ultra, the NVFP4 checkpoint size). Our counts come
# only from the configs in `nemo_scratch.config.PRESETS` (Ultra's config is partly reconstructed, see there).

# %%
for name in ("nano", "super", "ultra"):
    p = reports[name, "bf16"]["params"]
    for key in ("total", "active"):
        ref = PUBLISHED[name][key]
        print(f"{name:6s} {key:7s} {p[key] / GB:8.2f}B   published {ref / GB:6.1f}B   {p[key] / ref - 1:+.1%}")
        assert abs(p[key] / ref - 1) < 0.025, (name, key)

print()
print(format_plan(reports["ultra", "ultra"]))

# %% [markdown]
# **Ultra on one node.** The `ultra` recipe stores most weights as 4.5-bit routed experts and the rest in FP8
# or BF16. Split over 8 GPUs of 80 GiB, how much room is left for the KV cache, the SSM states and the
# activations?

# %%
ultra = reports["ultra", "ultra"]
bits = ultra["bytes"]["bits_per_param"]
print(f"Ultra, recipe ultra: {ultra['params']['total'] / GB:.0f}B parameters in {ultra['bytes']['total'] / GB:.1f} "
      f"GB = {bits:.2f} bits per parameter; {ultra['gpus']['per_gpu_gib']:.1f} GiB of weights per GPU of 8, "
      f"{80 - ultra['gpus']['per_gpu_gib']:.1f} GiB left on each")
assert ultra["gpus"]["fits"] and ultra["gpus"]["per_gpu_gib"] < 80
assert 4.9 < bits < 5.1, bits
assert abs(ultra["bytes"]["total"] / PUBLISHED["ultra"]["bytes"]["ultra"] - 1) < 0.01

colors = {"bf16": "C0", "f32": "C1", "fp8": "C2", "nvfp4": "C3"}
fig, ax = plt.subplots(figsize=(6, 2.4))
labelled = set()
for y, recipe in enumerate(("bf16", "ultra")):
    left = 0.0
    for fmt, row in reports["ultra", recipe]["bytes"]["by_format"].items():
        ax.barh(y, row["bytes"] / GB, left=left, color=colors[fmt], label=None if fmt in labelled else fmt)
        labelled.add(fmt)
        left += row["bytes"] / GB
ax.axvline(8 * 80 * GIB / GB, color="k", ls="--", lw=0.8)
ax.text(8 * 80 * GIB / GB, 1.45, " 8 x 80 GiB", fontsize=8, va="center")
ax.set(yticks=[0, 1], yticklabels=["bf16", "ultra (NVFP4)"], xlabel="checkpoint size (GB)", ylim=(-0.5, 1.7))
ax.set_title("Nemotron 3 Ultra checkpoint by storage format")
ax.legend(title="format", loc="upper right")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Exercises
#
# Each checker from `nemo_scratch.exercises` runs your answer against the package and says whether it is right,
# and where it first goes wrong. The starting points below have one mistake each; fix them.
#
# **1. Bits per byte.** `my_bpb(model, text)` returns the mean next-byte loss of `model` on `text` in bits,
# over positions 1 to t-1 (as in section 1). The attempt below reports it in the wrong unit.

# %%
def my_bpb(model, text):
    ids = np.array([model.tokenizer.encode(text)])
    p = token_probs(model.forward(ids)[0, :-1])
    return -np.log(p[np.arange(ids.shape[1] - 1), ids[0, 1:]]).mean()


result = check_bits_per_byte(my_bpb, model)
print(result)
assert not result

# %% [markdown]
# **2. Count a Mamba layer.** `my_mamba_params(cfg)` returns the parameter count of one Mamba mixer of `cfg`
# (in_proj, conv1d weight and bias, A_log, D, dt_bias, the gated norm, out_proj), checked on the tiny, Nano,
# Super and Ultra configs. The attempt below sizes the mixer with `expand * hidden_size`, the Mamba-1 habit
# (spec pitfall 1).

# %%
def my_mamba_params(cfg):
    d, h, n, g, w = cfg.hidden_size, cfg.mamba_num_heads, cfg.ssm_state_size, cfg.n_groups, cfg.conv_kernel
    i = 2 * d                                                   # expand = 2
    conv = i + 2 * g * n
    return d * (i + conv + h) + conv * w + conv + 3 * h + i + i * d


result = check_mamba_layer_params(my_mamba_params)
print(result)
assert not result
