"""What MTP speculative decoding buys once drafting and verifying are paid for: a small cost model.

One round of ``generate(..., mtp=True, draft_depth=k)`` (model/generate.py) drafts k tokens with the MTP
head, verifies them with one backbone pass over k+1 tokens, and keeps the agreed prefix plus one token of
the backbone's own. With ``a_j`` = the share of rounds in which drafts 1..j were all accepted (exactly
``stats["acceptance_per_depth"][j-1]`` of a GenerationResult, so a_1 >= a_2 >= ...):

    tokens(k) = 1 + a_1 + ... + a_k                  tokens one round produces, on average
    cost(k)   = c_verify(k) + k r                    in units of one plain decode step
    speedup   = tokens(k) / cost(k)                  plain decoding makes 1 token per unit of cost

with ``r`` = (one draft step) / (one backbone decode step), the draft-to-backbone cost ratio, and
``c_verify(k)`` = (one verify pass over k+1 tokens) / (one decode step). Both ratios can be measured on a
loaded model (``measure_costs``: wall clock on this machine) or derived from the bytes each step reads
(``byte_costs``: batch-1 decoding on a GPU is bound by weight reads, so cost ~ bytes; params.py's formats).

Deviation: a round's first draft step also catches the MTP stream up on the tokens accepted in the
previous round (several positions at once). The model prices it as one step, which a GPU nearly does.
"""

from __future__ import annotations

import time

import numpy as np

from ..checkpoint.modelopt import recipe_formats
from ..config import NemotronConfig
from ..errors import InputError
from ..params import tensor_bytes


def _check_acceptance(acceptance_per_depth):  # [k] -> [k] float64
    a = np.asarray(acceptance_per_depth, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise InputError(f"acceptance_per_depth must be a non-empty list of shares, one per draft depth, got "
                         f"{acceptance_per_depth!r}")
    if np.any(~np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
        raise InputError(f"acceptance_per_depth must hold shares in [0, 1], got {a.tolist()}")
    if np.any(np.diff(a) > 1e-12):
        raise InputError(f"acceptance_per_depth must not increase with depth (drafts 1..j all accepted is "
                         f"rarer than drafts 1..j-1), got {a.tolist()}")
    return a


def _check_ratio(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value < np.inf:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def expected_tokens_per_round(acceptance_per_depth) -> float:
    """tokens(k) = 1 + sum_j a_j: the backbone's own token plus every accepted draft, on average."""
    return float(1.0 + _check_acceptance(acceptance_per_depth).sum())


def round_cost(depth, draft_ratio, verify_cost=1.0) -> float:
    """cost(k) = c_verify(k) + k r, in plain decode steps (r = draft / backbone step)."""
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise InputError(f"depth must be a positive integer (the number of drafts per round), got {depth!r}")
    return _check_ratio("verify_cost", verify_cost) + int(depth) * _check_ratio("draft_ratio", draft_ratio)


def modelled_speedup(acceptance_per_depth, draft_ratio, verify_cost=1.0) -> float:
    """tokens(k) / cost(k): > 1 when speculative decoding beats plain decoding, < 1 when it loses."""
    a = _check_acceptance(acceptance_per_depth)
    cost = round_cost(a.size, draft_ratio, verify_cost)
    if cost == 0:
        raise InputError("draft_ratio and verify_cost are both 0: a round would cost nothing")
    return expected_tokens_per_round(a) / cost


def break_even_acceptance(depth, draft_ratio, verify_cost=1.0) -> float:
    """The tokens(k) - 1 = sum_j a_j at which speculative decoding exactly pays for itself: cost(k) - 1."""
    return round_cost(depth, draft_ratio, verify_cost) - 1.0


def measured_speedup(plain, spec) -> float:
    """Wall-clock decode speedup of two GenerationResults of the same length: plain time / speculative time.

    Both count decode time only (``seconds - prefill_seconds``): the prefill is the same pass in both modes.
    """
    if plain.ids.size != spec.ids.size:
        raise InputError(f"measured_speedup: the runs generated {plain.ids.size} and {spec.ids.size} tokens; "
                         f"compare runs of the same length")
    t_plain, t_spec = plain.seconds - plain.prefill_seconds, spec.seconds - spec.prefill_seconds
    if not (t_plain > 0 and t_spec > 0):
        raise InputError("measured_speedup: a run has no decode time (generate at least 2 tokens)")
    return t_plain / t_spec


# ------------------------------------------------------------------------------------------ measured costs

def _best_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def measure_costs(model, depth, prompt_ids, repeats=15) -> dict:
    """Wall-clock costs on ``model`` after ``prompt_ids``: one decode step, one draft step, verify passes.

    Returns {"step_s", "draft_s", "verify_s": [k+1 tokens for k = 0..depth], "draft_ratio",
    "verify_cost": [c_verify(k) for k = 0..depth]}, each the fastest of ``repeats`` calls (the one least
    disturbed by other processes). Everything runs through the model's own cache, as ``generate`` runs it.
    """
    if model.mtp is None:
        raise InputError("measure_costs: this model has no MTP head (num_nextn_predict_layers = 0)")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise InputError(f"measure_costs: depth must be a positive integer, got {depth!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise InputError(f"measure_costs: repeats must be a positive integer, got {repeats!r}")
    prompt = model.check_ids(prompt_ids)[:1]                                   # [1,t]
    be, head = model.backend, model.mtp
    cache, mcache = model.new_cache(1), head.new_cache(1)
    hid = model.hidden(prompt, cache)                                          # [1,t,d]
    head.step(hid[:, :-1], prompt[:, 1:], mcache)
    last_h, last_id = hid[:, -1:], prompt[:, -1:]                              # [1,1,d], [1,1]

    def decode_step():  # what plain decoding does per token
        model.forward(last_id, cache)

    def draft_step():   # what drafting does per draft: one MTP depth on one position, then its logits
        be.to_numpy(head.step(last_h, last_id, mcache)[0])

    # verify real, different tokens (the prompt's last ones, cycled): identical tokens would all route to the
    # same experts and make the pass look cheaper than a verification of drafts is
    tail = np.resize(prompt[0], depth + 1)[None]                               # [1, depth+1]

    def verify(m):      # one recorded backbone pass over m tokens, then keep the first (as a rejection does)
        cache.record()
        model.forward(tail[:, :m], cache)
        cache.accept(1, m)

    decode_step(), draft_step()                                                # warm-up
    step_s = _best_seconds(decode_step, repeats)
    draft_s = _best_seconds(draft_step, repeats)
    verify_s = [_best_seconds(lambda m=m: verify(m), repeats) for m in range(1, depth + 2)]
    return {"step_s": step_s, "draft_s": draft_s, "verify_s": verify_s, "draft_ratio": draft_s / step_s,
            "verify_cost": [v / step_s for v in verify_s]}


def measure_speedups(model, prompt_ids, max_new_tokens, depths=(1, 2, 3), repeats=5) -> dict:
    """Modelled against measured speedup for each draft depth, from runs taken in turns.

    Each of ``repeats`` passes runs plain greedy decoding, then speculative decoding at every depth, then
    ``measure_costs``; every quantity keeps its fastest value over the passes. Taking turns makes a slow
    spell of the machine hit the runs and the cost measurements alike. Returns {"plain": GenerationResult,
    "spec": {depth: GenerationResult}, "costs": measure_costs-like dict, "modelled": {depth: x},
    "measured": {depth: x}}. Every speculative run must reproduce the plain greedy tokens.
    """
    depths = tuple(depths)
    if not depths or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in depths):
        raise InputError(f"measure_speedups: depths must be positive integers, got {depths!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 2:
        raise InputError(f"measure_speedups: max_new_tokens must be an integer >= 2, got {max_new_tokens!r}")
    best, costs = {}, None

    def decode_s(run):
        return run.seconds - run.prefill_seconds

    for _ in range(repeats):
        for depth in (0, *depths):
            run = model.generate(prompt_ids, max_new_tokens, mtp=depth > 0, draft_depth=max(depth, 1))
            if depth not in best or decode_s(run) < decode_s(best[depth]):
                best[depth] = run
        c = measure_costs(model, max(depths), prompt_ids, repeats=5)
        costs = c if costs is None else {k: (np.minimum(costs[k], c[k]).tolist() if isinstance(c[k], list)
                                             else min(costs[k], c[k])) for k in c}
    costs["draft_ratio"] = costs["draft_s"] / costs["step_s"]
    costs["verify_cost"] = [v / costs["step_s"] for v in costs["verify_s"]]
    plain = best.pop(0)
    for depth, run in best.items():
        if not np.array_equal(run.ids, plain.ids):
            raise AssertionError(f"speculative decoding at draft depth {depth} changed the greedy output")
    modelled = {d: modelled_speedup(r.stats["acceptance_per_depth"], costs["draft_ratio"],
                                    costs["verify_cost"][len(r.stats["acceptance_per_depth"])])
                for d, r in best.items()}
    return {"plain": plain, "spec": best, "costs": costs, "modelled": modelled,
            "measured": {d: measured_speedup(plain, r) for d, r in best.items()}}


# ------------------------------------------------------------------------------------------ byte costs

def _distinct_experts(n_experts, top_k, tokens):
    """Expected number of distinct experts ``tokens`` tokens hit, each picking top_k of n_experts uniformly."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def byte_costs(cfg: NemotronConfig, recipe: str = "bf16", depth: int = 1) -> dict:
    """Costs from the weight bytes each step reads (batch-1 GPU decoding is bound by them), under ``recipe``.

    - a decode step reads every backbone tensor once (the embedding table only one row, ignored), lm_head,
      and the top-k routed experts of each MoE layer;
    - a draft step reads the MTP head's tensors (top-k of its routed experts) and lm_head again (shared);
    - a verify pass over m tokens reads the same dense tensors once and the distinct experts its m tokens
      hit, E (1 - (1 - k/E)^m) per MoE layer when tokens pick experts independently and uniformly (what
      aux-loss-free balancing aims at; tokens that share experts make verifying cheaper than this).
    KV cache, SSM states and activations are left out (weights dominate at short contexts).
    Returns {"step_bytes", "draft_bytes", "draft_ratio", "verify_bytes": [m = 1..depth+1],
    "verify_cost": [c_verify(k) for k = 0..depth], "moe_layers", "expert_bytes"}.
    """
    if not isinstance(cfg, NemotronConfig):
        raise InputError(f"byte_costs: cfg must be a NemotronConfig, got {type(cfg).__name__}")
    if cfg.num_nextn_predict_layers < 1:
        raise InputError("byte_costs: the config has no MTP layers (num_nextn_predict_layers = 0)")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise InputError(f"byte_costs: depth must be a positive integer, got {depth!r}")
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    dense = {"backbone": 0.0, "mtp": 0.0}
    experts = {"backbone": 0.0, "mtp": 0.0}                 # bytes of ALL routed experts, per part
    layers = {"backbone": set(), "mtp": set()}
    head = 0.0
    for spec, fmt in recipe_formats(cfg, recipe, include_mtp=True):
        part = "mtp" if spec.mtp else "backbone"
        b = tensor_bytes(spec.numel, fmt)
        if spec.role == "embedding":
            continue                                         # one row per token: negligible
        if spec.role == "lm_head":
            head = b
        elif spec.expert is not None:
            experts[part] += b
            layers[part].add(spec.layer)
        else:
            dense[part] += b
    n_moe = len(layers["backbone"])
    per_expert = experts["backbone"] / (n_moe * e) if n_moe else 0.0      # one expert's up + down
    step = dense["backbone"] + head + n_moe * k * per_expert
    # a draft step runs one of the num_nextn_predict_layers MTP layer sets (Super/Ultra: one, reused)
    draft = (dense["mtp"] + experts["mtp"] * k / e) / cfg.num_nextn_predict_layers + head
    verify = [dense["backbone"] + head + n_moe * _distinct_experts(e, k, m) * per_expert
              for m in range(1, depth + 2)]
    return {"step_bytes": step, "draft_bytes": draft, "draft_ratio": draft / step, "verify_bytes": verify,
            "verify_cost": [v / step for v in verify], "moe_layers": n_moe, "expert_bytes": per_expert}
