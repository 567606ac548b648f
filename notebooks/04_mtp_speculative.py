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
# 1. the head drafts $K$ tokens $d_1..d_K$ (cheap: two blocks instead of the whole backbone);
# 2. the backbone checks all of them in **one** forward pass over $[x_{new}, d_1, \dots, d_K]$;
# 3. it keeps the longest prefix it agrees with, plus its own next token, and rolls its cache back to there.
#
# With greedy verification a draft is kept only if it is exactly the backbone's argmax, so the output is
# exactly plain greedy decoding: only the number of backbone passes changes.

# %%
import matplotlib

if "inline" not in matplotlib.get_backend():  # Jupyter renders inline; anywhere else draw off-screen (Agg)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import nemo_scratch
from nemo_scratch.model.generate import show_speculation

model = nemo_scratch.load()
tok = model.tokenizer
print(model)

# %% [markdown]
# ## 1. Speculative decoding is lossless
#
# Generate the same continuation greedily, then with MTP drafts of depth 1, 2 and 3. The token ids must be
# identical; what changes is how many backbone forward passes were needed. (A 2.5M-parameter model soon loops
# on a phrase, which makes its continuation easy to guess: its acceptance says little about a real model's.)

# %%
prompt = "Return the "
ids = tok.encode(prompt)
N = 48
plain = model.generate(ids, N)
print(repr(prompt + tok.decode(plain.ids[0])))

runs = {}
for depth in (1, 2, 3):
    spec = model.generate(ids, N, mtp=True, draft_depth=depth)
    assert np.array_equal(spec.ids, plain.ids), f"draft depth {depth} changed the greedy output"
    assert spec.stats["forward_passes"] + spec.stats["forward_passes_saved"] == N
    assert spec.stats["forward_passes"] < plain.stats["forward_passes"]      # drafts were accepted
    runs[depth] = spec

print(f"\n{'':10s}{'accepted':>12s}{'backbone passes':>17s}   acceptance per depth")
print(f"{'greedy':10s}{'':>12s}{plain.stats['forward_passes']:>17d}")
for depth, spec in runs.items():
    s = spec.stats
    per = "  ".join(f"{a:.0%}" for a in s["acceptance_per_depth"])
    print(f"{'depth ' + str(depth):10s}{s['accepted']:>5d}/{s['proposed']:<6d}{s['forward_passes']:>17d}   {per}")

# %% [markdown]
# Acceptance at depth $j$ counts rounds where drafts $1..j$ were all accepted, out of rounds that drafted at
# least $j$ tokens. Deeper drafts chain on the head's own guesses, so they are accepted less often.

# %%
fig, ax = plt.subplots(figsize=(4.5, 2.6))
for depth, spec in runs.items():
    acc = spec.stats["acceptance_per_depth"]
    ax.bar(np.arange(1, depth + 1) + 0.25 * (depth - 2), acc, width=0.25, label=f"draft_depth={depth}")
ax.set(xlabel="draft position j", ylabel="acceptance", xticks=[1, 2, 3], ylim=(0, 1))
ax.set_title("accepted drafts per position", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

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
