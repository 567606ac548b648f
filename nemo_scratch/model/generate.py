"""Generation: greedy / temperature + top-p sampling, and lossless speculative decoding with the MTP head.

Speculative decoding (``mtp=True``), one round:
1. the MTP head proposes K tokens: depth 1 from the backbone hidden of the last accepted position and the
   embedding of the newest token, depths 2..K chained on its own hidden;
2. the backbone verifies them in ONE forward over the K+1 positions [newest, d1..dK] (Mamba layers continue
   from their cached conv/SSM state and record every intermediate state);
3. the drafts are accepted or rejected by ONE rule, speculative sampling (Leviathan et al. 2023, Chen et
   al. 2023): accept draft j with probability min(1, p_j(d_j) / q_j(d_j)) (p the backbone's distribution, q
   the draft's); at the first rejection the next token is drawn from max(p_j - q_j, 0), renormalised; after
   all k are accepted, from p_k. The cache rolls back to the last accepted position (Cache.accept).
The output distribution is exactly the backbone's. Greedy decoding is the temperature-0 limit of the same
rule: p and q are then one-hot at their argmax, a draft is accepted exactly when it is the backbone's argmax,
and the next token is the backbone's argmax, so greedy speculative decoding equals plain greedy decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..guards import check_generate
from .model import check_prefill_chunk


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
    """Softmax at ``temperature`` restricted to the smallest set of tokens whose mass reaches ``top_p``.

    temperature 0 is greedy decoding's distribution: all the mass on the argmax (ties -> the lowest id).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, np.argmax(logits, axis=-1)[..., None], 1.0, axis=-1)
        return probs
    z = logits / temperature
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


def sample(probs, rng):  # [b,v] -> [b] int64
    """One token per row of ``probs`` (a one-hot row always gives its token)."""
    return np.array([rng.choice(row.size, p=row) for row in probs], dtype=np.int64)


def _check_args(model, max_new_tokens, temperature, top_p, mtp, draft_depth, batch):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0 for sampling (greedy=False), got {temperature!r}; "
                         "greedy=True is temperature 0")
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
             draft_depth=1, stop_at_eos=False, on_token=None, prefill_chunk=None):
    """Generate after ``ids`` ([t] or [b, t]). ``on_token(list_of_new_ids)`` is called as tokens arrive.

    ``prefill_chunk=N`` runs the prompt N tokens at a time (model.Model.hidden): bounded memory for long prompts.
    """
    prompt = model.check_ids(ids)
    chunk = check_prefill_chunk(prefill_chunk)
    _check_args(model, max_new_tokens, 1.0 if greedy else temperature, top_p, mtp, draft_depth, prompt.shape[0])
    check_generate(model, prompt.shape, max_new_tokens, seed, mtp, draft_depth, chunk)   # hook: guards.py
    # the next-token distribution of every step: greedy is temperature 0 (one-hot at the argmax)
    dist = (lambda logits: token_probs(logits, 0.0)) if greedy else (
        lambda logits: token_probs(logits, temperature, top_p))
    rng = model.random_draws(seed)   # every draw of the run comes from this one generator
    start = time.perf_counter()
    if mtp:
        out, prefill_s, stats = _speculative(model, prompt, max_new_tokens, dist, rng, draft_depth, stop_at_eos,
                                             on_token, prefill_chunk)
    else:
        out, prefill_s, stats = _plain(model, prompt, max_new_tokens, dist, rng, stop_at_eos, on_token,
                                       prefill_chunk)
    return GenerationResult(np.asarray(out, dtype=np.int64).reshape(prompt.shape[0], -1),
                            time.perf_counter() - start, prefill_s, stats)


def _plain(model, prompt, max_new, dist, rng, stop_at_eos, on_token, prefill_chunk):
    cache = model.new_cache(prompt.shape[0])
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache, last_only=True, prefill_chunk=prefill_chunk)[:, -1]   # [b,v]
    prefill_s = time.perf_counter() - t0
    out = []
    for step in range(max_new):
        tok = sample(dist(logits), rng)                                                # [b]
        out.append(tok)
        if on_token:
            on_token(tok.tolist())
        if (stop_at_eos and np.all(tok == model.cfg.eos_token_id)) or step == max_new - 1:
            break
        logits = model.forward(tok[:, None], cache)[:, -1]
    return np.stack(out, axis=1), prefill_s, {"forward_passes": len(out)}


# ------------------------------------------------------------------------------------------ speculative decoding

def draft(head, mcache, hidden, next_ids, k, dist, rng, chunk=None):  # [1,m,d], [1,m] -> (k drafts, q [k,v])
    """The MTP head proposes k tokens: depth 1 from the true backbone hiddens (``hidden`` pairs position j
    with the token at j+1 in ``next_ids``, which brings the head's own KV cache up to date, ``chunk`` positions
    at a time when given), depths 2..k chained on its own last hidden. The KV entries written from chained
    hiddens are dropped afterwards."""
    step = chunk or hidden.shape[1]
    for i in range(0, hidden.shape[1], step):
        logits, h = head.step(hidden[:, i:i + step], next_ids[:, i:i + step], mcache)
    committed = mcache.length
    drafts, q = [], []
    for j in range(k):
        q.append(dist(head.model.backend.to_numpy(logits[:, -1]))[0])                          # [v]
        drafts.append(int(sample(q[-1][None], rng)[0]))
        if j + 1 < k:
            logits, h = head.step(h[:, -1:], np.array([[drafts[-1]]]), mcache)
    mcache.truncate(committed)
    return drafts, np.array(q)


def verify(model, cache, newest, drafts, dist):  # -> (hidden [1,k+1,d], p [k+1,v])
    """ONE backbone forward over [newest, d_1..d_k] that records every Mamba state; p_j is the backbone's
    distribution after position j (for the draft d_{j+1}, and p_k for the token after the last draft)."""
    cache.record()
    hidden = model.hidden(np.array([[newest] + drafts]), cache)                        # [1,k+1,d]
    return hidden, dist(model.backend.to_numpy(model.logits(hidden))[0])


def accept(drafts, q, p, rng):  # k drafts, q [k,v], p [k+1,v] -> (accepted, next token)
    """The speculative-sampling rule (module docstring): how many drafts survive, and the token after them."""
    for j, d in enumerate(drafts):
        # accept d_j with probability min(1, p_j(d_j) / q_j(d_j))
        if not rng.random() < min(1.0, p[j, d] / q[j, d]):
            # rejected: the next token comes from the residual max(p_j - q_j, 0), renormalised
            resid = np.maximum(p[j] - q[j], 0.0)
            return j, int(sample((resid / resid.sum() if resid.sum() > 0 else p[j])[None], rng)[0])
    return len(drafts), int(sample(p[len(drafts)][None], rng)[0])


def _speculative(model, prompt, max_new, dist, rng, depth, stop_at_eos, on_token, prefill_chunk):
    head = model.mtp
    cache, mcache = model.new_cache(1), head.new_cache(1)
    t0 = time.perf_counter()
    hid = model.hidden(prompt, cache, prefill_chunk)                                    # [1,n,d]
    out = [int(sample(dist(model.backend.to_numpy(model.logits(hid[:, -1:]))[:, -1]), rng)[0])]
    prefill_s = time.perf_counter() - t0
    if on_token:
        on_token(out[-1:])
    # MTP stream input: position j pairs the backbone hidden at j with the token at j+1.
    pend_h, pend_ids = hid, np.concatenate([prompt[:, 1:], [[out[-1]]]], axis=1)
    stats = {"rounds": 0, "proposed": 0, "accepted": 0, "proposed_per_depth": [0] * depth,
             "accepted_per_depth": [0] * depth, "forward_passes": 1, "trace": []}
    while len(out) < max_new and not (stop_at_eos and out[-1] == model.cfg.eos_token_id):
        k = min(depth, max_new - len(out) - 1)
        drafts, q = draft(head, mcache, pend_h, pend_ids, k, dist, rng, prefill_chunk)
        vh, p = verify(model, cache, out[-1], drafts, dist)
        accepted, nxt = accept(drafts, q, p, rng)
        cache.accept(accepted + 1, k + 1)
        new = drafts[:accepted] + [nxt]
        # bookkeeping: depth j+1 counts as accepted only when every shallower draft was accepted too
        stats["forward_passes"] += 1
        for j in range(k):
            stats["proposed_per_depth"][j] += 1
            stats["accepted_per_depth"][j] += int(j < accepted)
        stats["trace"].append({"drafts": drafts, "accepted": accepted, "next": nxt})
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
