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
# # 04 · Multi-token prediction and speculative decoding
#
# Nemotron 3 Super and Ultra ship a small **MTP head**: one attention block and one MoE block that guess the
# token *after* the next one. With $h_0$ the backbone's output (after `norm_f`) and $E$ the shared embedding,
# depth $k$ of the head computes
#
# $$
# a = W_{eh}\,[\,\mathrm{RMSNorm}(E[x_{t+k}]) \,;\, \mathrm{RMSNorm}(h_{k-1})\,], \quad
# a \mathrel{+}= \mathrm{Attn}(\mathrm{RMSNorm}(a)), \quad a \mathrel{+}= \mathrm{MoE}(\mathrm{RMSNorm}(a)), \quad
# h_k = \mathrm{RMSNorm}(a),
# $$
#
# and $h_k W_{head}^\top$ are the logits of $x_{t+k+1}$. The same weights serve every depth, chained on $h_k$.
#
# **Speculative decoding** turns these guesses into speed without changing the output. One round:
# 1. the head drafts $K$ tokens $d_1..d_K$ (two blocks instead of the whole backbone);
# 2. the backbone checks all of them in **one** forward pass over $[x_{new}, d_1, \dots, d_K]$;
# 3. it keeps the longest prefix it agrees with, plus its own next token, and rolls its cache back to there.
#
# With greedy verification a draft is kept only if it is exactly the backbone's argmax, so the output is
# exactly plain greedy decoding: only the number of backbone passes changes. Whether that makes decoding
# *faster* depends on what a draft step and a verify pass cost next to a plain decode step: sections 3 to 5
# measure that, model it, and say what the model predicts for Ultra.

# %%
import tempfile

import matplotlib

if "inline" not in matplotlib.get_backend():  # Jupyter renders inline; anywhere else draw off-screen (Agg)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import nemo_scratch
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.exercises import check_expected_tokens, check_speedup
from nemo_scratch.model import mtp_cost
from nemo_scratch.model.generate import show_speculation

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                     "ytick.labelsize": 8, "legend.fontsize": 8})
model = nemo_scratch.load()
tok = model.tokenizer
print(model)

# %% [markdown]
# ## 1. Speculative decoding is lossless
#
# Generate the same continuation greedily, then with MTP drafts of depth 1, 2 and 3. The token ids must be
# identical; what changes is how many backbone forward passes were needed, and the wall-clock speed. (A
# 2.5M-parameter model soon loops on a phrase, which makes its continuation easy to guess: its acceptance
# says little about a real model's.) `mtp_cost.measure_speedups` runs each mode five times, in turns, and keeps
# the fastest run of each (other processes can only slow a run down), and measures the costs of section 3 in
# the same turns.

# %%
prompt = "Return the "
ids = tok.encode(prompt)
N = 48
bundled = mtp_cost.measure_speedups(model, ids, N, depths=(1, 2, 3))
plain, runs, cost = bundled["plain"], bundled["spec"], bundled["costs"]
print(repr(prompt + tok.decode(plain.ids[0])))
for depth, spec in runs.items():
    assert np.array_equal(spec.ids, plain.ids), f"draft depth {depth} changed the greedy output"
    assert spec.stats["forward_passes"] + spec.stats["forward_passes_saved"] == N
    assert spec.stats["forward_passes"] < plain.stats["forward_passes"]      # drafts were accepted

print(f"\n{'':9s}{'accepted':>10s}{'backbone passes':>17s}{'tokens/s':>10s}{'speed vs plain':>16s}   "
      "acceptance per depth")
print(f"{'greedy':9s}{'':>10s}{plain.stats['forward_passes']:>17d}{plain.tokens_per_s:>10.0f}{1:>15.2f}x")
measured = bundled["measured"]
for depth, spec in runs.items():
    s = spec.stats
    per = "  ".join(f"{a:.0%}" for a in s["acceptance_per_depth"])
    print(f"{'depth ' + str(depth):9s}{s['accepted']:>4d}/{s['proposed']:<5d}{s['forward_passes']:>17d}"
          f"{spec.tokens_per_s:>10.0f}{measured[depth]:>15.2f}x   {per}")
best = max(measured, key=measured.get)
saved = runs[best].stats["forward_passes_saved"]
verdict = "faster than" if measured[best] > 1.05 else "slower than" if measured[best] < 0.95 else "about as fast as"
print(f"\nbest: depth {best} saves {saved} of {N} backbone passes ({saved / N:.0%}) and decodes at "
      f"{measured[best]:.2f}x the plain speed: {verdict} plain decoding in wall-clock time on this machine")

# %% [markdown]
# Acceptance at depth $j$ is the share of rounds in which drafts $1..j$ were *all* accepted, out of the rounds
# that drafted at least $j$ tokens. Deeper drafts chain on the head's own guesses, so they are accepted less
# often.

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.0))
for depth, spec in runs.items():
    acc = spec.stats["acceptance_per_depth"]
    ax.bar(np.arange(1, depth + 1) + 0.25 * (depth - 2), acc, width=0.25, label=f"draft_depth = {depth}")
ax.set(xlabel="draft position j", ylabel="share of rounds with drafts 1..j accepted", xticks=[1, 2, 3],
       ylim=(0, 1.05))
ax.set_title("acceptance by draft position (greedy verification)")
ax.legend(loc="upper right")
fig.tight_layout()
plt.show()

# %%
a2 = {depth: runs[depth].stats["acceptance_per_depth"][1] for depth in (2, 3)}
rounds = {depth: runs[depth].stats["rounds"] for depth in (2, 3)}
print(f"position 2 is accepted in {a2[3]:.0%} of rounds with draft_depth=3 ({rounds[3]} rounds) and in "
      f"{a2[2]:.0%} with draft_depth=2 ({rounds[2]} rounds).")
print("The two runs produce the same text but cut it into rounds at different places (a round ends where a "
      "draft fails), so 'position 2' falls on different bytes of the loop in each run"
      + (": the same head, sampled at different places." if abs(a2[3] - a2[2]) > 0.1 else "."))
for depth, spec in runs.items():
    acc = spec.stats["acceptance_per_depth"]
    assert all(a >= b for a, b in zip(acc, acc[1:])), "drafts 1..j accepted is never commoner than 1..j-1"

# %% [markdown]
# `show_speculation` prints every round: accepted drafts in `[brackets]`, rejected ones marked `x`,
# then the backbone's own token that ends the round.

# %%
print("\n".join(show_speculation(runs[3], tok).splitlines()[:10]))

# %% [markdown]
# ## 2. How good is the head? Depth-1 accuracy on a text
#
# `MTPHead.predict` runs the head over a whole sequence at once (teacher forcing): from the backbone output
# $h_j$ and the true token $x_{j+1}$ it predicts $x_{j+2}$. The fair comparison is the backbone itself on the
# same targets: at position $j+1$ it has seen exactly the same tokens. A draft is accepted when the head agrees
# with the backbone, so the agreement rate is what speculative decoding can hope for at depth 1.
# A trivial baseline: always guess the most frequent byte of the text.

# %%
text = ("Return the value of the attribute. If the object has no such attribute, raise AttributeError. "
        "The default is used when the value is None.")
x = np.array([tok.encode(text)])
T = x.shape[1]
h0 = model.hidden(x)                                                   # [1,T,d] backbone output after norm_f
bb_logits = model.forward(x)[0]                                        # [T,v]
mtp_logits = model.mtp.predict(h0[:, :-1], x[:, 1:], depth=1)[0][0]    # [T-1,v]: index j predicts x[j+2]

target = x[0, 2:]                                                      # x_{j+2}, j = 0..T-3
mtp_pred = mtp_logits[: T - 2].argmax(-1)
bb_pred = bb_logits[1: T - 1].argmax(-1)                               # backbone at j+1 predicts x_{j+2}
acc = {"MTP depth 1 (h_j, x_{j+1})": np.mean(mtp_pred == target),
       "backbone (x_0..x_{j+1})": np.mean(bb_pred == target),
       "most frequent byte": np.mean(target == np.bincount(x[0]).argmax())}
for name, a in acc.items():
    print(f"{name:28s} accuracy {a:6.1%}")
agree = np.mean(mtp_pred == bb_pred)
print(f"{'MTP agrees with backbone':28s}          {agree:6.1%}")
assert acc["MTP depth 1 (h_j, x_{j+1})"] > 2 * acc["most frequent byte"] and agree > 0.5

# %% [markdown]
# The same agreement, position by position, *is* the acceptance of greedy speculative decoding. Replaying the
# depth-1 run on its own output (prompt + generated tokens): a round whose newest token sits at position $m$
# drafts $x_{m+1}$ from $h_{m-1}$ and $x_m$, and keeps it iff the teacher-forced head predicts the token the
# backbone actually produced there. The counts must match those of `generate`.

# %%
full = np.concatenate([ids, plain.ids[0]])[None]                       # [1, P+N]
P = len(ids)
head1 = model.mtp.predict(model.hidden(full)[:, :-1], full[:, 1:], depth=1)[0][0].argmax(-1)
m, proposed, accepted = P, 0, 0                                        # m: position of the newest token
while m - P + 1 < N:                                                   # tokens so far: m - P + 1
    if m - P + 1 <= N - 2:                                             # room to draft one token
        proposed += 1
        ok = head1[m - 1] == full[0, m + 1]
        accepted += int(ok)
        m += 2 if ok else 1
    else:
        m += 1
s1 = runs[1].stats
print(f"replayed: {accepted}/{proposed} accepted; generate(draft_depth=1): {s1['accepted']}/{s1['proposed']}")
assert (accepted, proposed) == (s1["accepted"], s1["proposed"])

# %% [markdown]
# ## 3. What a round costs
#
# Fewer backbone passes is not the same as less time. A round with $k$ drafts pays for $k$ draft steps and
# for one verify pass over $k+1$ tokens. In units of one plain decode step, with the **draft-to-backbone cost
# ratio** $r$ = (draft step) / (decode step) and $c_k$ = (verify pass over $k+1$ tokens) / (decode step),
#
# $$
# \text{tokens per round} = 1 + \sum_{j=1}^{k} a_j, \qquad
# \text{cost per round} = c_k + k\,r, \qquad
# \text{speedup} = \frac{1 + \sum_j a_j}{c_k + k\,r},
# $$
#
# where $a_j$ is the acceptance at depth $j$ above (`nemo_scratch/model/mtp_cost.py`). Plain decoding makes one
# token per unit of cost, so speculative decoding wins only when the accepted drafts outweigh what they cost.
# `measure_costs` times the three steps on this machine; `byte_costs` estimates them from the weight bytes each
# step reads (what bounds batch-1 decoding on a GPU), from the config and `params.py` alone. The measured costs
# below were taken in turns with the runs of section 1.

# %%
by_bytes = mtp_cost.byte_costs(model.cfg, "bf16", depth=3)
n_mtp, n_layers = len(model.cfg.mtp_layers_block_type), model.cfg.num_hidden_layers
print(f"{'':28s}{'measured (CPU)':>16s}{'from weight bytes':>19s}")
print(f"{'decode step':28s}{1e3 * cost['step_s']:>13.2f} ms{by_bytes['step_bytes'] / 1e6:>16.2f} MB")
print(f"{'draft step / decode step':28s}{cost['draft_ratio']:>16.2f}{by_bytes['draft_ratio']:>19.2f}")
for k in (1, 2, 3):
    print(f"{f'verify {k + 1} tokens / decode step':28s}{cost['verify_cost'][k]:>16.2f}"
          f"{by_bytes['verify_cost'][k]:>19.2f}")
assert 0 < cost["draft_ratio"] < 1
assert all(b >= a for a, b in zip(by_bytes["verify_cost"], by_bytes["verify_cost"][1:]))

# %%
print(f"The draft head is {n_mtp} blocks ({', '.join(model.cfg.mtp_layers_block_type)}) against the backbone's "
      f"{n_layers}, and both end in the same lm_head. By weight bytes a draft step reads "
      f"{by_bytes['draft_ratio']:.0%} of a decode step; measured here it costs {cost['draft_ratio']:.0%}.")
print(f"Verifying 2 tokens costs {cost['verify_cost'][1]:.2f} decode steps measured, "
      f"{by_bytes['verify_cost'][1]:.2f} by bytes.")

# %% [markdown]
# Why the measured verify pass is dearer than the byte count says: the NumPy reference verifies by stepping the
# Mamba layers token by token (to keep every state for the rollback) and runs each routed expert the tokens hit
# as its own matmul, so on a CPU an extra verified token costs nearly what a decode step costs. On a GPU a
# batch-1 step is bound by reading the weights once, so an extra verified token costs only the extra experts it
# touches: that is what the byte column models.
#
# ## 4. The cost model against measurement
#
# Plug the measured acceptance and the measured costs into the formula and compare with the wall-clock
# speedup of section 1. Then the same on a **deeper random model**: a random checkpoint with a four times
# longer layer pattern, so the 2-block draft head is relatively cheaper. Its MTP head is random too, so it
# almost never agrees with its random backbone: there the model must predict the pure cost of drafting,
# $1/(c_k + k\,r)$.

# %%
deep_cfg = nemo_scratch.preset("tiny", hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*E")
tmp = tempfile.TemporaryDirectory()
deep = nemo_scratch.load(make_random_checkpoint(tmp.name, deep_cfg, seed=0))
deep_ids = list(range(1, 9))
print(deep)

compare = {}                                              # (model name, depth) -> (modelled, measured, a_1)
cases = ((f"bundled ({n_layers} layers)", bundled),
         (f"random ({deep_cfg.num_hidden_layers} layers)", mtp_cost.measure_speedups(deep, deep_ids, 32)))
for name, res in cases:
    for depth, spec in res["spec"].items():
        compare[name, depth] = (res["modelled"][depth], res["measured"][depth],
                                spec.stats["acceptance_per_depth"][0])
    print(f"{name}: draft / step {res['costs']['draft_ratio']:.2f}, verify costs "
          + ", ".join(f"{v:.2f}" for v in res["costs"]["verify_cost"][1:]))
print(f"\n{'model':20s}{'depth':>6s}{'acceptance a_1':>16s}{'modelled':>10s}{'measured':>10s}")
for (name, depth), (mod, mea, a1) in compare.items():
    print(f"{name:20s}{depth:>6d}{a1:>16.0%}{mod:>9.2f}x{mea:>9.2f}x")
gaps = np.array([abs(np.log(mod / mea)) for mod, mea, _ in compare.values()])
bias = np.mean([np.log(mod / mea) for mod, mea, _ in compare.values()])
print(f"\nthe model is within a factor {np.exp(np.median(gaps)):.2f} of the measurement in the median case and "
      f"{np.exp(gaps.max()):.2f} in the worst; on average it is {abs(np.exp(bias) - 1):.0%} "
      f"{'optimistic' if bias > 0 else 'pessimistic'}"
      + (" (it prices a round's catch-up step and the loop's own bookkeeping as free)" if bias > 0.1 else ""))
# loose bounds: wall-clock timing on a machine shared with other processes is noisy
assert np.median(gaps) < np.log(1.5) and gaps.max() < np.log(2.5), "the cost model should predict the measurement"

fig, ax = plt.subplots(figsize=(7, 3.2))
labels = [f"{name.split()[0]}\ndepth {depth}" for name, depth in compare]
xs = np.arange(len(compare))
ax.bar(xs - 0.2, [v[0] for v in compare.values()], width=0.4, label="modelled (measured costs, acceptance)")
ax.bar(xs + 0.2, [v[1] for v in compare.values()], width=0.4, label="measured (decode wall clock)")
ax.axhline(1.0, color="k", lw=0.8, ls="--", label="plain decoding (baseline)")
ax.set_xticks(xs, labels)
ax.set(ylabel="speedup over plain decoding (x)", title="speculative decoding on the NumPy reference (CPU)")
ax.legend(loc="upper right", fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. What the model predicts for Ultra
#
# Ultra's MTP head is the same 2 blocks, against 108 backbone layers. We have no Ultra weights to time, so the
# costs come from the bytes each step reads under the `ultra` recipe (NVFP4 routed experts, FP8 Mamba and
# shared experts, BF16 elsewhere, including the MTP head and `lm_head`): batch-1 decoding on a GPU streams the
# weights, so time follows bytes. A verify pass over $k+1$ tokens reads the dense weights once and the
# distinct experts its tokens hit. We do not know Ultra's acceptance either, so the figure sweeps it: each draft
# accepted with probability $\alpha$, i.e. $a_j = \alpha^j$.

# %%
ultra_cfg = nemo_scratch.preset("ultra")
ultra = mtp_cost.byte_costs(ultra_cfg, "ultra", depth=3)
print(f"Ultra, recipe ultra: a decode step reads {ultra['step_bytes'] / 1e9:.1f} GB, a draft step "
      f"{ultra['draft_bytes'] / 1e9:.2f} GB (draft / step = {ultra['draft_ratio']:.3f}); verify costs "
      + ", ".join(f"{k + 1} tokens {ultra['verify_cost'][k]:.2f}" for k in (1, 2, 3)))
alphas = np.linspace(0, 1, 101)
fig, ax = plt.subplots(figsize=(6, 3.2))
for depth in (1, 2, 3):
    curve = [mtp_cost.modelled_speedup([al ** j for j in range(1, depth + 1)], ultra["draft_ratio"],
                                       ultra["verify_cost"][depth]) for al in alphas]
    ax.plot(alphas, curve, label=f"draft_depth = {depth}")
    need = next(al for al, c in zip(alphas, curve) if c >= 1)
    print(f"depth {depth}: break-even at alpha = {need:.2f}; at alpha = 0.8: "
          f"{np.interp(0.8, alphas, curve):.2f}x, at alpha = 1: {curve[-1]:.2f}x")
ax.axhline(1.0, color="k", lw=0.8, ls="--", label="plain decoding")
own = [mtp_cost.modelled_speedup(runs[d].stats["acceptance_per_depth"], ultra["draft_ratio"],
                                 ultra["verify_cost"][d]) for d in (1, 2, 3)]
ax.set(xlabel="alpha: probability that each draft is accepted", ylabel="modelled speedup (x)",
       title="Nemotron 3 Ultra (weight bytes, recipe ultra)", ylim=(0, 3))
ax.legend(loc="upper left")
fig.tight_layout()
plt.show()
print("with the bundled model's own acceptance profiles Ultra would run at "
      + ", ".join(f"{x:.2f}x (depth {d})" for d, x in zip((1, 2, 3), own)))
assert ultra["draft_ratio"] < 0.1 and all(x > 1 for x in own)

# %%
here = [compare[cases[0][0], d][0] for d in (1, 2, 3)]
print(f"On the bundled model on this CPU the formula predicts {min(here):.2f}x to {max(here):.2f}x; on Ultra, "
      f"where a draft step reads {ultra['draft_ratio']:.1%} of a decode step's bytes and verifying 2 tokens "
      f"{ultra['verify_cost'][1]:.2f} steps, it predicts {min(own):.2f}x to {max(own):.2f}x for the same "
      f"acceptance.")

# %% [markdown]
# These are a model's numbers, with its assumptions stated in `mtp_cost.byte_costs`: weights dominate the
# memory traffic, tokens pick experts independently and uniformly, and a round's catch-up step is priced as one
# draft step.
#
# ## Exercises
#
# Each checker from `nemo_scratch.exercises` runs your answer against the package and says whether it is right,
# and where it first goes wrong. The starting points below have one mistake each; fix them.
#
# **1. Tokens per round.** `tokens_per_round(acceptance_per_depth)` returns the expected number of tokens one
# round produces, given the per-depth acceptance as `generate` reports it. The attempt below forgets a token.

# %%
def tokens_per_round(acceptance_per_depth):
    return sum(acceptance_per_depth)


result = check_expected_tokens(tokens_per_round)
print(result)
assert not result

# %% [markdown]
# **2. The speedup.** `speedup(acceptance_per_depth, draft_ratio, verify_cost)` returns the modelled speedup
# over plain decoding for rounds of `len(acceptance_per_depth)` drafts. The attempt below charges one draft
# step per round.

# %%
def speedup(acceptance_per_depth, draft_ratio, verify_cost):
    return (1 + sum(acceptance_per_depth)) / (verify_cost + draft_ratio)


result = check_speedup(speedup)
print(result)
assert not result
