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
from nemo_scratch.model.generate import token_probs
from nemo_scratch.ops.linear import linear
from nemo_scratch.ops.quant import (E2M1_VALUES, NVFP4Weight, e2m1_decode, e4m3_decode, nvfp4_dequantize,
                                    nvfp4_quantize)
from nemo_scratch.params import tensor_bytes

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

fig, axes = plt.subplots(1, 2, figsize=(8, 2.4))
axes[0].plot(E2M1_VALUES[:8], np.zeros(8), "o")
axes[0].set(title="E2M1 magnitudes", yticks=[], xlabel="value")
pos = e4m3[1:0x7F]
axes[1].semilogy(np.arange(1, 0x7F), pos, ".", ms=3)
axes[1].set(title="E4M3 positive values (log scale)", xlabel="code")
for ax in axes:
    ax.title.set_fontsize(9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Quantize a trained weight
#
# We take the routed experts' up-projections of the first MoE layer of the bundled model, the kind of tensor
# Ultra stores in NVFP4. Stacked as `[e, f, l]`, each expert gets its own per-tensor scale $g$.

# %%
model = nemo_scratch.load()
cfg = model.cfg
moe = cfg.layers_block_type.index("moe")
w = model.params["layers"][moe]["experts_up"]                            # [e, f, l] float32
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

fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
axes[0].hist(np.log2(block_value.ravel()), bins=40)
axes[0].set(title="block scales e4m3(s), log2", xlabel="log2 value")
axes[1].hist((err / S16).ravel(), bins=81)
axes[1].set(title="error in units of the block scale S", xlabel="(W^ - W) / S")
for ax in axes:
    ax.title.set_fontsize(9)
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
# ## 3. Quantize the whole model
#
# `quantize_checkpoint` writes a ModelOpt checkpoint. The `ultra` recipe follows what NVIDIA did for Ultra:
# routed experts NVFP4, shared experts and Mamba projections FP8, the rest BF16. The `nano` recipe makes almost
# every linear layer NVFP4. We load each back (`nemo_scratch.load` keeps the weights packed and decodes them
# inside the matmuls) and compare its logits with the BF16 model's on a text: relative error, how often the
# top-1 token agrees, and the KL divergence of the next-token distributions.

# %%
text = "Return the number of bytes in the buffer. If the file is closed, raise ValueError."
ids = np.array([model.tokenizer.encode(text)])
ref = model.forward(ids)[0]                                              # [t,v]
p_ref = token_probs(ref)
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
            assert isinstance(qmodel.params["layers"][moe]["experts_up"], NVFP4Weight)
bf16_mb = sum(f.stat().st_size for f in Path(model.path).glob("*.safetensors")) / 1e6
print(f"{'recipe':8s}{'MB':>7s}{'bits/param':>12s}{'rel. logit err':>16s}{'top-1 agree':>13s}"
      f"{'KL nats/token':>15s}")
print(f"{'bf16':8s}{bf16_mb:7.2f}{inspect_checkpoint(model.path)['bits_per_param']:12.2f}")
for recipe, r in results.items():
    print(f"{recipe:8s}{r['MB']:7.2f}{r['bits/param']:12.2f}{r['rel. logit error']:16.4f}"
          f"{r['top-1 agreement']:13.1%}{r['KL (nats/token)']:15.2e}   {r['formats']}")
    assert r["MB"] < bf16_mb and r["rel. logit error"] < 0.05 and r["top-1 agreement"] >= 0.95
