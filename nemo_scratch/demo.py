"""``nemo-scratch demo`` (what ``make demo`` runs): the bundled tiny trained model on the NumPy reference.

It generates from a prompt twice, plain greedy and with MTP speculative decoding, streams the text, and prints
tokens/s, the MTP acceptance and whether the two greedy outputs agree (they must: speculative decoding with
greedy verification is lossless).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from . import DEFAULT_CHECKPOINT, load
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
    print(f"\n[{plain.tokens_per_s:.1f} tokens/s, {plain.stats['forward_passes']} forward passes]", file=out)

    spec = model.generate(ids, max_new_tokens, mtp=True, draft_depth=draft_depth,
                          on_token=_stream(model, f"MTP speculative decoding, draft depth {draft_depth}", prompt))
    s = spec.stats
    print(f"\n[{spec.tokens_per_s:.1f} tokens/s, {s['forward_passes']} main-model forward passes "
          f"({s['forward_passes_saved']} saved)]", file=out)
    print(f"MTP acceptance: {s['accepted']}/{s['proposed']} drafts ({100 * s['acceptance_rate']:.0f}%), "
          f"per depth: {', '.join(f'{100 * a:.0f}%' for a in s['acceptance_per_depth'])}", file=out)
    print("first rounds (accepted drafts in [brackets]):", file=out)
    print("\n".join(show_speculation(spec, model.tokenizer).splitlines()[:6]), file=out)
    same = np.array_equal(plain.ids, spec.ids)
    print(f"greedy outputs with and without MTP agree: {'yes' if same else 'NO'}", file=out)
    if not same:
        raise SystemExit("speculative decoding changed the greedy output (a bug: please report it)")
    return plain, spec
