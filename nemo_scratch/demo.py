"""``nemo-scratch demo`` (what ``make demo`` runs): the bundled tiny trained model on the NumPy reference.

It generates from a prompt twice, plain greedy and with MTP speculative decoding, streams the text, and prints
for both modes the wall-clock tokens/s beside the backbone forward passes, the MTP acceptance, and whether the
two greedy outputs agree (they must: speculative decoding with greedy verification is lossless).

Fewer passes is not the same as faster: a round also pays for its draft steps and for a verify pass over
several tokens. The demo measures both costs against one plain decode step (model/mtp_cost.py), shows the
speedup they predict next to the measured one, and what the same model of costs predicts for Ultra, where
the draft head is 2 blocks against 108 (weight bytes from params.py).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from . import DEFAULT_CHECKPOINT, load, preset
from .model import mtp_cost
from .model.generate import show_speculation

DEFAULT_PROMPT = "Return the "


def _stream(model, label, prompt):
    """Print a header and the prompt; return an on_token callback that prints decoded text as it arrives."""
    print(f"\n--- {label} ---\n{prompt}", end="", flush=True)

    def on_token(new):
        print(model.tokenizer.decode(new), end="", flush=True)

    return on_token


def run_demo(prompt=None, max_new_tokens=64, draft_depth=2, out=sys.stdout):
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    t0 = time.perf_counter()
    model = load(DEFAULT_CHECKPOINT)
    print(f"loaded {DEFAULT_CHECKPOINT.name}: {model} in {time.perf_counter() - t0:.2f} s", file=out)
    ids = model.tokenizer.encode(prompt)
    print(f"prompt: {prompt!r} ({len(ids)} tokens), {max_new_tokens} new tokens, greedy", file=out)

    plain = model.generate(ids, max_new_tokens, on_token=_stream(model, "plain greedy decoding", prompt))
    print(f"\n[{plain.tokens_per_s:.1f} tokens/s wall clock, {plain.stats['forward_passes']} forward passes]",
          file=out)

    spec = model.generate(ids, max_new_tokens, mtp=True, draft_depth=draft_depth,
                          on_token=_stream(model, f"MTP speculative decoding, draft depth {draft_depth}", prompt))
    s = spec.stats
    print(f"\n[{spec.tokens_per_s:.1f} tokens/s wall clock, {s['forward_passes']} main-model forward passes "
          f"({s['forward_passes_saved']} saved)]", file=out)
    print(f"MTP acceptance: {s['accepted']}/{s['proposed']} drafts ({100 * s['acceptance_rate']:.0f}%), "
          f"per depth: {', '.join(f'{100 * a:.0f}%' for a in s['acceptance_per_depth'])}", file=out)
    print("first rounds (accepted drafts in [brackets]):", file=out)
    print("\n".join(show_speculation(spec, model.tokenizer).splitlines()[:6]), file=out)
    same = np.array_equal(plain.ids, spec.ids)
    print(f"greedy outputs with and without MTP agree: {'yes' if same else 'NO'}", file=out)
    if not same:
        raise SystemExit("speculative decoding changed the greedy output (a bug: please report it)")
    _explain_cost(model, ids, plain, spec, draft_depth, out)
    return plain, spec


def _explain_cost(model, ids, plain, spec, depth, out):
    """Why fewer passes need not mean faster: measured costs, the speedup they predict, and Ultra's case."""
    acc = spec.stats["acceptance_per_depth"]
    cost = mtp_cost.measure_costs(model, depth, ids)
    k = len(acc)
    model_x = mtp_cost.modelled_speedup(acc, cost["draft_ratio"], cost["verify_cost"][k])
    measured_x = mtp_cost.measured_speedup(plain, spec) if plain.ids.size > 1 else float("nan")
    n_mtp, n_layers = len(model.cfg.mtp_layers_block_type), model.cfg.num_hidden_layers
    rows = [("one backbone decode step", cost["step_s"], 1.0, "what plain decoding pays per token"),
            ("one MTP draft step", cost["draft_s"], cost["draft_ratio"],
             f"{n_mtp} blocks against {n_layers}; both end in lm_head"),
            (f"one verify pass over {k + 1} tokens", cost["verify_s"][k], cost["verify_cost"][k],
             "Mamba layers step token by token; more tokens hit more experts")]
    print("\ncost of a speculative round, in plain decode steps (measured on this machine):", file=out)
    for label, sec, ratio, why in rows:
        print(f"  {label:<32}{1e3 * sec:7.2f} ms = {ratio:4.2f}   ({why})", file=out)
    tokens = mtp_cost.expected_tokens_per_round(acc)
    per_round = mtp_cost.round_cost(k, cost["draft_ratio"], cost["verify_cost"][k])
    print(f"speedup = (1 + sum of acceptance) / (verify + {k} x draft) = {tokens:.2f} / {per_round:.2f} = "
          f"{model_x:.2f}x modelled, {measured_x:.2f}x measured", file=out)
    ultra = mtp_cost.byte_costs(preset("ultra"), "ultra", depth=k)
    ultra_x = mtp_cost.modelled_speedup(acc, ultra["draft_ratio"], ultra["verify_cost"][k])
    print(f"Ultra (weight bytes read per step, recipe ultra): draft {ultra['draft_ratio']:.3f}, verify over "
          f"{k + 1} tokens {ultra['verify_cost'][k]:.2f} -> {ultra_x:.2f}x at this acceptance", file=out)
