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
# # 05 · NVFP4: 4-bit weights with two levels of scales
#
# Nemotron 3 Ultra ships its routed experts in **NVFP4**, NVIDIA's 4-bit block floating point format
# (ModelOpt layout). A weight $W$ is stored as
#
# $$
# W_{r,16j+i} \approx \underbrace{\mathrm{e2m1}(q_{r,16j+i})}_{\text{4-bit code}} \cdot
#   \underbrace{\mathrm{e4m3}(s_{r,j})}_{\text{8-bit block scale}} \cdot \underbrace{g}_{\text{fp32, per tensor}},
# \qquad g = \frac{\max|W|}{6 \cdot 448}, \quad
# s_{r,j} = \mathrm{e4m3}\Big(\frac{\max_i |W_{r,16j+i}|}{6\,g}\Big),
# $$
#
# so each block of 16 consecutive weights in a row shares one FP8 scale, chosen so that its largest weight maps
# to the largest 4-bit value, 6. Storage: 4 bits per weight plus 8 bits per 16 weights = **4.5 bits**, plus a
# few bytes per tensor.

# %%
import tempfile
from pathlib import Path

import matplotlib

if "inline" not in matplotlib.get_backend():  # Jupyter renders inline; anywhere else draw off-screen (Agg)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import nemo_scratch
from nemo_scratch.checkpoint.convert import format_inspection, inspect_checkpoint, quantize_checkpoint
from nemo_scratch.exercises import check_e2m1_decode, check_nvfp4_dequantize
from nemo_scratch.formats import FORMATS
from nemo_scratch.model.generate import token_probs
from nemo_scratch.ops.linear import linear
from nemo_scratch.ops.quant import (E2M1_VALUES, NVFP4Weight, e2m1_decode, e4m3_decode, nvfp4_dequantize,
                                    nvfp4_quantize)
from nemo_scratch.params import tensor_bytes

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                     "ytick.labelsize": 8, "legend.fontsize": 8})

# %% [markdown]
# ## 1. The two number formats
#
# **E2M1** (FP4): 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit. Only 8 magnitudes:
# $\{0, 0.5, 1, 1.5, 2, 3, 4, 6\}$, and the code with the sign bit set is the negative (code 8 is $-0$).

# %%
codes4 = np.arange(16, dtype=np.uint8)
e2m1 = e2m1_decode(codes4)
spec_e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
assert e2m1.dtype == np.float32 and np.array_equal(e2m1, spec_e2m1)
assert np.array_equal(np.signbit(e2m1), codes4 >= 8)                     # code 8 is -0, not +0
for c in range(8):
    print(f"{c:04b} -> {e2m1[c]:+4.1f}     {c + 8:04b} -> {e2m1[c + 8]:+4.1f}")

# %% [markdown]
# **E4M3FN** (FP8, for the block scales): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, with
# subnormals, no infinities, and NaN at `0x7F`/`0xFF`. With $e$ = exponent bits, $m$ = mantissa bits:
#
# $$
# \mathrm{e4m3} = (-1)^{s} \cdot \begin{cases} 2^{e-7}\,(1 + m/8) & e > 0 \\ 2^{-6}\,m/8 & e = 0 \end{cases}
# \qquad\text{largest finite: } 2^{8}\cdot 1.75 = 448 .
# $$
#
# We evaluate this formula on all 256 bit patterns and compare with the package's decode table, bit for bit.

# %%
codes8 = np.arange(256, dtype=np.uint8)
sign, exp_bits, man = codes8 >> 7, (codes8 >> 3) & 0xF, codes8 & 0x7
formula = np.where(exp_bits > 0, 2.0 ** (exp_bits.astype(np.int32) - 7) * (1 + man / 8), 2.0 ** -6 * man / 8)
formula = np.where(sign == 1, -formula, formula).astype(np.float32)
e4m3 = e4m3_decode(codes8)
nan = np.isnan(e4m3)
assert np.array_equal(np.flatnonzero(nan), [0x7F, 0xFF])
assert np.array_equal(e4m3[~nan].view(np.uint32), formula[~nan].view(np.uint32))   # bit-exact, -0 included
landmarks = {0x00: 0.0, 0x01: 2.0 ** -9, 0x07: 7 * 2.0 ** -9, 0x08: 2.0 ** -6, 0x38: 1.0, 0x7E: 448.0,
             0xFE: -448.0}
for c, value in landmarks.items():
    assert e4m3[c] == value
    print(f"0x{c:02X} = {c:08b} -> {e4m3[c]:g}")

fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
axes[0].plot(E2M1_VALUES[:8], np.zeros(8), "o")
for c, v in enumerate(E2M1_VALUES[:8]):
    axes[0].annotate(f"{c:03b}", (v, 0), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
axes[0].set(title="E2M1: the 8 magnitudes (3-bit codes)", yticks=[], xlabel="value", xticks=range(7))
pos = e4m3[1:0x7F]
axes[1].semilogy(np.arange(1, 0x7F), pos, ".", ms=3)
axes[1].axvline(8, color="k", lw=0.8, ls=":", label="subnormals below code 8")
axes[1].set(title="E4M3: positive values by code (log scale)", xlabel="code (0x01..0x7E)", ylabel="value")
axes[1].legend(loc="lower right")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Quantize a trained weight
#
# We take the routed experts' up-projections of the first MoE layer of the bundled model, the kind of tensor
# Ultra stores in NVFP4. The model keeps a layer's experts as an `ExpertBank`, one `[f, l]` weight per expert
# left where the checkpoint has it (`bank[x]`); we stack them here as `[e, f, l]`, and each expert gets its own
# per-tensor scale $g$.

# %%
model = nemo_scratch.load()
cfg = model.cfg
moe = cfg.layers_block_type.index("moe")
bank = model.params["layers"][moe]["experts_up"]                         # ExpertBank: e weights [f, l]
w = np.stack([bank[x] for x in range(len(bank))])                        # [e, f, l] float32
qw = nvfp4_quantize(w)
for name in ("packed", "block_scale", "global_scale"):
    a = getattr(qw, name)
    print(f"{name:13s} {a.dtype}  {list(a.shape)}")
assert qw.shape == w.shape and qw.packed.shape == (*w.shape[:-1], w.shape[-1] // 2)

w_hat = nvfp4_dequantize(qw.packed, qw.block_scale, qw.global_scale)      # [e, f, l] float32
block_value = e4m3_decode(qw.block_scale)                                # [e, f, l/16]
S = block_value * qw.global_scale[:, None, None]                         # the step unit of each block
S16 = np.repeat(S, 16, axis=-1)                                          # per element
err = w_hat - w
print(f"relative error |W^ - W| / |W| = {np.linalg.norm(err) / np.linalg.norm(w):.3%}")

# %% [markdown]
# **The format's error bound.** In units of its block's scale $S = \mathrm{e4m3}(s)\,g$ a weight becomes
# $|w|/S$ and is rounded to the nearest E2M1 value. The grid has spacing 0.5 below 2, 1 between 2 and 4 and 2
# between 4 and 6, so the rounding error is at most half of that: $0.25\,S$, $0.5\,S$ or $1\,S$. Because the
# block scale itself is rounded to E4M3, a block's largest weight can land slightly above $6S$ and saturate
# to 6; its error is then $|w| - 6S$.

# %%
a = np.abs(w) / S16
half_step = np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0))
bound = np.maximum(half_step * S16, np.abs(w) - 6 * S16)
assert np.all(np.abs(err) <= bound * (1 + 1e-6))
print(f"largest |error| / bound: {np.max(np.abs(err) / bound):.3f}   "
      f"weights that saturated at 6 S: {np.sum(a > 6)}")

# the matmul decodes the packed weight inside (W4A16) and equals the dequantized matmul
x = np.random.default_rng(0).normal(size=(5, w.shape[-1])).astype(np.float32)
assert np.allclose(linear(x, qw[0]), x @ w_hat[0].T, rtol=1e-5, atol=1e-5)

fig, axes = plt.subplots(1, 2, figsize=(9, 2.9))
axes[0].hist(np.log2(block_value.ravel()), bins=40)
axes[0].set(title="block scales e4m3(s)", xlabel="log2 of the block scale value", ylabel="blocks")
axes[1].hist((err / S16).ravel(), bins=81)
for edge in (-1, -0.5, -0.25, 0.25, 0.5, 1):
    axes[1].axvline(edge, color="k", lw=0.6, ls=":")
axes[1].set(title="error in units of the block's step S (dotted: the bounds)", xlabel="(W^ - W) / S",
            ylabel="weights", yscale="log")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Bytes.** Packed codes take $\tfrac12$ byte per weight, block scales $\tfrac1{16}$ byte, the per-tensor
# scale $g$ 4 bytes (`NVFP4Weight.nbytes`, what sits in memory); ModelOpt's checkpoint adds a 4-byte
# `input_scale` per tensor. So a tensor of $N$ weights costs $4.5 + 64/N$ bits per weight on disk, 4.5 in the
# limit.

# %%
numel = qw[0].packed.size * 2                                            # one expert's weights
assert qw[0].nbytes == numel / 2 + numel / 16 + 4
on_disk = tensor_bytes(numel, "nvfp4")                                   # + input_scale in the checkpoint
assert on_disk == qw[0].nbytes + 4 and 8 * on_disk / numel == 4.5 + 64 / numel
print(f"one expert [{w.shape[1]}x{w.shape[2]}]: {qw[0].nbytes} bytes in memory, {on_disk:g} on disk = "
      f"{8 * on_disk / numel:.4f} bits/weight (BF16: {2 * numel} bytes)")
ultra = nemo_scratch.preset("ultra")
f_u, l_u = ultra.moe_intermediate_size, ultra.moe_latent_size              # an Ultra expert up_proj: [f, l]
print(f"an Ultra expert [{f_u}x{l_u}]: {8 * tensor_bytes(f_u * l_u, 'nvfp4') / (f_u * l_u):.6f} bits/weight")

# %% [markdown]
# ## 3. Against the alternatives at the same bits
#
# Is NVFP4 a good use of 4.5 bits? The same trained expert weights through its competitors
# (`nemo_scratch/formats.py`), each as a quantize-dequantize round trip:
# - **INT4** in NVFP4's exact layout (E4M3 scale per 16, fp32 per tensor) but with uniform integer codes
#   $-7..7$ instead of E2M1's grid: the **same 4.5 bits**, only the code grid differs;
# - **MXFP4** (OCP microscaling): E2M1 codes with a power-of-two scale per 32 weights, 4.25 bits;
# - **FP8** E4M3 with one scale per tensor, 8 bits: what the `ultra` recipe uses for the Mamba and shared
#   expert projections.
#
# Two measures: the relative weight error $\lVert\hat W - W\rVert / \lVert W\rVert$ over every routed expert
# of the model, and what it does to the model: the KL divergence of the next-token distributions from the
# unquantized model's, with only the routed experts replaced.

# %%
text = "Return the number of bytes in the buffer. If the file is closed, raise ValueError."
ids = np.array([model.tokenizer.encode(text)])
ref = model.forward(ids)[0]                                              # [t,v]
p_ref = token_probs(ref)
moe_layers = [i for i, p_layer in enumerate(model.params["layers"]) if p_layer["type"] == "moe"]
expert_w = {(i, key): np.stack(list(model.params["layers"][i][key].experts))     # [e, out, in] float32
            for i in moe_layers for key in ("experts_up", "experts_down")}
compare = {}
for name, (roundtrip, bits, what) in FORMATS.items():
    fake = nemo_scratch.load()                                           # a fresh copy whose experts we replace
    num = den = 0.0
    for (i, key), w_e in expert_w.items():
        w_q = roundtrip(w_e)
        assert w_q.shape == w_e.shape and w_q.dtype == np.float32
        num, den = num + np.sum((w_q - w_e) ** 2), den + np.sum(w_e ** 2)
        fake.params["layers"][i][key] = w_q
    got = fake.forward(ids)[0]
    p_q = token_probs(got)
    compare[name] = {"bits": bits, "what": what, "weight error": np.sqrt(num / den),
                     "KL": np.mean(np.sum(p_ref * (np.log(p_ref) - np.log(p_q)), axis=-1)),
                     "top-1": np.mean(got.argmax(-1) == ref.argmax(-1))}
print(f"{'format':7s}{'bits/weight':>12s}{'weight error':>14s}{'KL nats/token':>15s}{'top-1 agree':>13s}   layout")
for name, r in compare.items():
    print(f"{name:7s}{r['bits']:12.2f}{r['weight error']:14.2%}{r['KL']:15.2e}{r['top-1']:13.1%}   {r['what']}")
nv, i4, mx, f8 = (compare[k] for k in ("nvfp4", "int4", "mxfp4", "fp8"))
assert f8["weight error"] < min(nv["weight error"], i4["weight error"], mx["weight error"])
assert nv["weight error"] < mx["weight error"]
assert np.allclose(compare["nvfp4"]["bits"], 4.5)

fig, axes = plt.subplots(1, 2, figsize=(9, 2.9))
names = list(compare)
colors = ["C3" if n == "nvfp4" else "C0" for n in names]
for ax, key, label in ((axes[0], "weight error", "relative weight error"),
                       (axes[1], "KL", "KL(full || quantized), nats/token")):
    ax.bar(range(len(names)), [compare[n][key] for n in names], color=colors)
    ax.set_xticks(range(len(names)), [f"{n}\n{compare[n]['bits']:g} bits" for n in names])
    ax.set(ylabel=label, yscale="log")
axes[0].set_title("routed expert weights, all MoE layers")
axes[1].set_title("effect on the model's next-token distribution")
fig.tight_layout()
plt.show()

# %%
same_bits = "beats" if i4["weight error"] < nv["weight error"] else "loses to"
print(f"At the same 4.5 bits, INT4 {same_bits} NVFP4 on these weights: weight error {i4['weight error']:.2%} "
      f"against {nv['weight error']:.2%}, KL {i4['KL']:.1e} against {nv['KL']:.1e}.")
print(f"NVFP4 beats MXFP4 ({mx['weight error']:.2%} at {mx['bits']:g} bits): a block of 16 with a "
      f"fine-grained E4M3 scale fits each block's range better than a block of 32 with a power-of-two scale.")
print(f"FP8 costs {f8['bits'] / nv['bits']:.2f}x the bits for {nv['weight error'] / f8['weight error']:.1f}x "
      f"less weight error.")

# %% [markdown]
# Which grid wins depends on how weights are distributed inside a block of 16: E2M1 spends its codes near zero,
# a uniform grid spreads them evenly up to the block's largest weight. The printout says which way it goes for
# this model's experts; do not carry it over to other weights without measuring. NVIDIA's case for E2M1 rests
# also on hardware: Blackwell's tensor cores take NVFP4 operands natively, for weights and activations (W4A4).
#
# ## 4. Quantize the whole model
#
# `quantize_checkpoint` writes a ModelOpt checkpoint. The `ultra` recipe follows what NVIDIA did for Ultra:
# routed experts NVFP4, shared experts and Mamba projections FP8, the rest BF16. The `nano` recipe makes almost
# every linear layer NVFP4. We load each back (`nemo_scratch.load` keeps the weights packed and decodes them
# inside the matmuls) and compare its logits with the BF16 model's on a text: relative error, how often the
# top-1 token agrees, and the KL divergence of the next-token distributions.

# %%
results = {}
with tempfile.TemporaryDirectory() as tmp:
    for recipe in ("ultra", "nano"):
        dst = Path(tmp) / recipe
        counts = quantize_checkpoint(model.path, dst, recipe=recipe)
        report = inspect_checkpoint(dst)
        qmodel = nemo_scratch.load(dst)
        got = qmodel.forward(ids)[0]
        p_q = token_probs(got)
        results[recipe] = {
            "formats": dict(counts), "bits/param": report["bits_per_param"], "MB": report["file_bytes"] / 1e6,
            "rel. logit error": np.linalg.norm(got - ref) / np.linalg.norm(ref),
            "top-1 agreement": np.mean(got.argmax(-1) == ref.argmax(-1)),
            "KL (nats/token)": np.mean(np.sum(p_ref * (np.log(p_ref) - np.log(p_q)), axis=-1)),
        }
        if recipe == "ultra":
            print(format_inspection(report), "\n")
            assert qmodel.params["layers"][moe]["experts_up"].format is NVFP4Weight      # a bank of NVFP4 experts
bf16_mb = sum(f.stat().st_size for f in Path(model.path).glob("*.safetensors")) / 1e6
print(f"{'recipe':8s}{'MB':>7s}{'bits/param':>12s}{'rel. logit err':>16s}{'top-1 agree':>13s}"
      f"{'KL nats/token':>15s}")
print(f"{'bf16':8s}{bf16_mb:7.2f}{inspect_checkpoint(model.path)['bits_per_param']:12.2f}")
for recipe, r in results.items():
    print(f"{recipe:8s}{r['MB']:7.2f}{r['bits/param']:12.2f}{r['rel. logit error']:16.4f}"
          f"{r['top-1 agreement']:13.1%}{r['KL (nats/token)']:15.2e}   {r['formats']}")
    assert r["MB"] < bf16_mb and r["rel. logit error"] < 0.05 and r["top-1 agreement"] >= 0.95

# %% [markdown]
# ## Exercises
#
# Each checker from `nemo_scratch.exercises` runs your answer against the package and says whether it is right,
# and where it first goes wrong. The starting points below have one mistake each; fix them.
#
# **1. Decode E2M1.** `my_e2m1(codes)` maps the 16 codes `uint8 [16]` to their float32 values (bit 3 the sign,
# bits 2-1 the exponent with bias 1, bit 0 the mantissa; exponent 0 is subnormal: $0.5\,m$). The attempt
# below gets the bias wrong.

# %%
def my_e2m1(codes):
    mag = codes & 7
    e, m = (mag >> 1).astype(np.int32), mag & 1
    value = np.where(e == 0, 0.5 * m, 2.0 ** e * (1 + 0.5 * m))
    return np.where(codes >= 8, -value, value).astype(np.float32)


result = check_e2m1_decode(my_e2m1)
print(result)
assert not result

# %% [markdown]
# **2. Dequantize NVFP4.** `my_dequantize(packed, block_scale, global_scale)` takes `packed [r, c/2]`,
# `block_scale [r, c/16]` (E4M3 codes) and the float32 per-tensor scale, and returns `W [r, c]` float32, bit for
# bit. You may use `e2m1_decode` and `e4m3_decode`. The attempt below unpacks the nibbles in the wrong order.

# %%
def my_dequantize(packed, block_scale, global_scale):
    codes = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(packed.shape[0], -1)
    return e2m1_decode(codes) * np.repeat(e4m3_decode(block_scale), 16, axis=-1) * np.float32(global_scale)


result = check_nvfp4_dequantize(my_dequantize)
print(result)
assert not result

