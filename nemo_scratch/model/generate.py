"""Generation: greedy / temperature + top-p sampling, and lossless speculative decoding with the MTP head.

Speculative decoding (``mtp=True``), one round:
1. the MTP head proposes K tokens: depth 1 from the backbone hidden of the last accepted position and the
   embedding of the newest token, depths 2..K chained on its own hidden;
2. the backbone verifies them in ONE forward over the K+1 positions [newest, d1..dK] (Mamba layers continue
   from their cached conv/SSM state and record every intermediate state);
3. the longest prefix that the backbone agrees with is accepted, plus the backbone's own next token; the cache
   rolls back to the last accepted position (Cache.accept).
Greedy mode is lossless (the output equals plain greedy decoding). Sampling mode uses the standard rejection
rule (accept d with probability min(1, p(d)/q(d)), else resample from max(p - q, 0)), so the output
distribution is the backbone's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..guards import check_generate


@dataclass
class GenerationResult:
    ids: np.ndarray                 # [b, new] the generated token ids (prompt excluded)
    seconds: float                  # wall time of the whole call (prefill + decode)
    prefill_seconds: float
    stats: dict = field(default_factory=dict)   # MTP: proposed, accepted, per-depth acceptance, passes saved

    @property
    def tokens_per_s(self) -> float:
        return self.ids.size / self.seconds if self.seconds > 0 else float("inf")


def token_probs(logits, temperature=1.0, top_p=1.0):  # [b,v] -> [b,v] float64
    """Softmax at ``temperature`` restricted to the smallest set of tokens whose mass reaches ``top_p``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # keep a token if the mass strictly before it is < top_p (the top token is always kept)
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def pick(logits, greedy, rng, temperature, top_p):  # [b,v] -> [b]
    """Greedy: argmax (ties -> lowest id). Otherwise one sample per row."""
    if greedy:
        return np.argmax(logits, axis=-1)
    probs = token_probs(logits, temperature, top_p)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def _check_args(model, max_new_tokens, temperature, top_p, mtp, draft_depth, batch):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if mtp:
        if model.mtp is None:
            raise InputError("mtp=True but this checkpoint has no MTP layers (config num_nextn_predict_layers "
                             "= 0, or no mtp.* tensors)")
        if not isinstance(draft_depth, (int, np.integer)) or draft_depth < 1:
            raise InputError(f"draft_depth must be a positive integer, got {draft_depth!r}")
        if batch != 1:
            raise InputError(f"speculative decoding with mtp=True supports batch 1, got batch {batch}")


def generate(model, ids, max_new_tokens, greedy=True, temperature=1.0, top_p=1.0, seed=None, mtp=False,
             draft_depth=1, stop_at_eos=False, on_token=None):
    """Generate after ``ids`` ([t] or [b, t]). ``on_token(list_of_new_ids)`` is called as tokens arrive."""
    prompt = model.check_ids(ids)
    _check_args(model, max_new_tokens, temperature, top_p, mtp, draft_depth, prompt.shape[0])
    check_generate(model, prompt.shape, max_new_tokens, seed, mtp, draft_depth)   # hook: nemo_scratch/guards.py
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    if mtp:
        out, prefill_s, stats = _speculative(model, prompt, max_new_tokens, greedy, rng, temperature, top_p,
                                             draft_depth, stop_at_eos, on_token)
    else:
        out, prefill_s, stats = _plain(model, prompt, max_new_tokens, greedy, rng, temperature, top_p,
                                       stop_at_eos, on_token)
    return GenerationResult(np.asarray(out, dtype=np.int64).reshape(prompt.shape[0], -1),
                            time.perf_counter() - start, prefill_s, stats)


def _plain(model, prompt, max_new, greedy, rng, temperature, top_p, stop_at_eos, on_token):
    cache = model.new_cache(prompt.shape[0])
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache, last_only=True)[:, -1]                      # [b,v]
    prefill_s = time.perf_counter() - t0
    out = []
    for step in range(max_new):
        tok = pick(logits, greedy, rng, temperature, top_p)                            # [b]
        out.append(tok)
        if on_token:
            on_token(tok.tolist())
        if (stop_at_eos and np.all(tok == model.cfg.eos_token_id)) or step == max_new - 1:
            break
        logits = model.forward(tok[:, None], cache)[:, -1]
    return np.stack(out, axis=1), prefill_s, {"forward_passes": len(out)}


def _speculative(model, prompt, max_new, greedy, rng, temperature, top_p, depth, stop_at_eos, on_token):
    be, head = model.backend, model.mtp
    cache, mcache = model.new_cache(1), head.new_cache(1)
    t0 = time.perf_counter()
    hid = model.hidden(prompt, cache)                                                   # [1,n,d]
    logits = be.to_numpy(model.logits(hid[:, -1:]))[:, -1]
    prefill_s = time.perf_counter() - t0
    out = [int(pick(logits, greedy, rng, temperature, top_p)[0])]
    if on_token:
        on_token(out[-1:])
    # MTP stream input: position j pairs the backbone hidden at j with the token at j+1.
    pend_h, pend_ids = hid, np.concatenate([prompt[:, 1:], [[out[-1]]]], axis=1)
    stats = {"rounds": 0, "proposed": 0, "accepted": 0, "proposed_per_depth": [0] * depth,
             "accepted_per_depth": [0] * depth, "forward_passes": 1, "trace": []}
    while len(out) < max_new and not (stop_at_eos and out[-1] == model.cfg.eos_token_id):
        k = min(depth, max_new - len(out) - 1)
        # 1. bring the MTP stream up to date with true backbone hiddens, then draft k tokens
        mlogits, mh = head.step(pend_h, pend_ids, mcache)
        committed = mcache.length
        drafts, q_probs = [], []
        for j in range(k):
            row = be.to_numpy(mlogits[:, -1])                                           # [1,v]
            if greedy:
                drafts.append(int(np.argmax(row[0])))
            else:
                q = token_probs(row, temperature, top_p)[0]
                q_probs.append(q)
                drafts.append(int(rng.choice(q.size, p=q)))
            if j + 1 < k:
                mlogits, mh = head.step(mh[:, -1:], np.array([[drafts[-1]]]), mcache)
        mcache.truncate(committed)          # draft-time entries used chained hiddens: drop them
        # 2. verify [newest, d1..dk] with one backbone forward that records every Mamba state
        cache.record()
        vh = model.hidden(np.array([[out[-1]] + drafts]), cache)                      # [1,k+1,d]
        vlogits = be.to_numpy(model.logits(vh))[0]                                      # [k+1,v]
        stats["forward_passes"] += 1
        # 3. accept the agreed prefix, then the backbone's own next token
        accepted, new = 0, []
        for j in range(k):  # depth j+1 counts as accepted only when every shallower draft was accepted too
            stats["proposed_per_depth"][j] += 1
        for j, d in enumerate(drafts):
            if greedy:
                ok = int(np.argmax(vlogits[j])) == d
            else:
                p = token_probs(vlogits[j:j + 1], temperature, top_p)[0]
                ok = rng.random() < min(1.0, p[d] / q_probs[j][d])
            if not ok:
                break
            stats["accepted_per_depth"][j] += 1
            accepted += 1
            new.append(d)
        if greedy:
            new.append(int(np.argmax(vlogits[accepted])))
        else:
            p = token_probs(vlogits[accepted:accepted + 1], temperature, top_p)[0]
            if accepted < k:  # rejected: resample from the residual max(p - q, 0)
                resid = np.maximum(p - q_probs[accepted], 0.0)
                p = resid / resid.sum() if resid.sum() > 0 else p
            new.append(int(rng.choice(p.size, p=p)))
        cache.accept(accepted + 1, k + 1)
        stats["trace"].append({"drafts": drafts, "accepted": accepted, "next": new[-1]})
        stats["rounds"] += 1
        stats["proposed"] += k
        stats["accepted"] += accepted
        if stop_at_eos and model.cfg.eos_token_id in new:
            new = new[:new.index(model.cfg.eos_token_id) + 1]
        new = new[:max_new - len(out)]
        out += new
        if on_token:
            on_token(new)
        pend_h, pend_ids = vh[:, :accepted + 1], np.array([new[:accepted + 1]])
        if len(pend_ids[0]) < accepted + 1:  # output cut short by max_new/eos: nothing more to draft
            break
    stats["acceptance_rate"] = stats["accepted"] / stats["proposed"] if stats["proposed"] else 0.0
    stats["acceptance_per_depth"] = [a / p if p else 0.0 for a, p in
                                     zip(stats["accepted_per_depth"], stats["proposed_per_depth"])]
    stats["forward_passes_saved"] = len(out) - stats["forward_passes"]
    return np.array([out]), prefill_s, stats


def show_speculation(result, tokenizer=None):
    """One line per speculative round: drafted tokens, [accepted] ones marked, and the backbone's own token.

    For notebooks: ``print(show_speculation(model.generate(ids, 32, mtp=True, draft_depth=3), model.tokenizer))``
    """
    fmt = (lambda t: repr(tokenizer.decode([t]))) if tokenizer is not None else str
    lines = []
    for i, r in enumerate(result.stats.get("trace", [])):
        marks = [f"[{fmt(d)}]" if j < r["accepted"] else f" {fmt(d)}x" for j, d in enumerate(r["drafts"])]
        lines.append(f"round {i:3d}: drafts {' '.join(marks) or '-'}  -> next {fmt(r['next'])}")
    return "\n".join(lines)
