"""The full model: embeddings -> blocks -> norm_f -> lm_head (spec section 2), prefill and cached decode.

    h = embeddings[ids]                                  # [b,t,d]
    for each layer:  h = h + mixer(rms_norm(h))           # mamba | attention | moe | mlp
    h = rms_norm(h, norm_f)
    logits = h @ lm_head.T                               # [b,t,v]

The model never imports a kernel: every op goes through ``self.backend`` (nemo_scratch.backends).
"""

from __future__ import annotations

import math

import numpy as np

from ..backends import get_backend
from ..errors import InputError
from ..guards import FiniteTrail, check_logits
from ..memory import check_forward_memory
from .blocks import block
from .cache import Cache
from .weights import map_tree

DT_FLOOR_HELP = (
    "dt floor of the Mamba layers: 'config' (default) follows the checkpoint's time_step_limit, (0, inf) when "
    "absent, as vLLM and NVIDIA's kernels do; 'transformers' reproduces transformers 5.x, which floors dt at "
    "time_step_min (0.001); or a number")


def resolve_dt_limit(cfg, dt_floor="config"):
    """The (min, max) clip of dt. Deviation: transformers 5.x uses (time_step_min, inf) whatever the config
    says; vLLM, llama.cpp and NVIDIA's CUDA path use the config's time_step_limit, default (0, inf)."""
    lo, hi = cfg.time_step_limit
    if dt_floor in (None, "config"):
        return (float(lo), float(hi))
    if dt_floor == "transformers":
        return (float(cfg.time_step_min), math.inf)
    try:
        floor = float(dt_floor)
    except (TypeError, ValueError):
        raise InputError(f"dt_floor must be 'config', 'transformers' or a number, got {dt_floor!r}") from None
    if not 0.0 <= floor < math.inf:
        raise InputError(f"dt_floor must be a finite number >= 0, got {dt_floor!r}")
    return (floor, float(hi))


class Model:
    """A loaded Nemotron-H / Nemotron 3 model. Build it with ``nemo_scratch.load(path)``."""

    def __init__(self, cfg, params, backend="numpy", dt_floor="config", info=None, tokenizer=None, path=None):
        self.cfg = cfg
        self.backend = get_backend(backend)
        self.params = map_tree(params, self.backend.asarray)
        self.dtype = np.dtype(self.params["norm_f"].dtype)
        self.dt_limit = resolve_dt_limit(cfg, dt_floor)
        self.info = info or {}
        self.tokenizer = tokenizer
        self.path = path
        self._mtp = None

    # ---------------------------------------------------------------- inputs and caches
    def check_ids(self, ids):
        """Token ids as an int64 array [b, t]; InputError when empty, not integers, or outside the vocabulary."""
        arr = np.asarray(ids)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
            raise InputError(f"ids must be a non-empty list of token ids or a [batch, time] array, got shape "
                             f"{list(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"ids must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.cfg.vocab_size)
        if bad.any():
            raise InputError(f"token id {int(arr[bad][0])} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return arr.astype(np.int64)

    def new_cache(self, batch=1):
        return Cache(self.cfg.layers_block_type, self.cfg, batch, self.dtype, self.backend.xp)

    # ---------------------------------------------------------------- forward
    def embed(self, ids):  # [b,t] -> [b,t,d]
        idx = self.backend.asarray(self.check_ids(ids))
        return self.params["embeddings"][idx]

    def hidden(self, ids, cache=None):  # [b,t] -> [b,t,d]
        """The backbone output after norm_f (what lm_head and the MTP head read)."""
        ids = self.check_ids(ids)
        if cache is not None and cache.batch != ids.shape[0]:
            raise InputError(f"ids have batch {ids.shape[0]} but the cache was made for batch {cache.batch}")
        check_forward_memory(self, ids, cache)                          # hook: nemo_scratch/memory.py
        trail = FiniteTrail(self, ids)                                  # hook: nemo_scratch/guards.py
        h = trail.record("embeddings", self.embed(ids))
        for i, p in enumerate(self.params["layers"]):
            h = block(h, p, self.cfg, self.backend, None if cache is None else cache.layers[i], self.dt_limit)
            h = trail.record(i, h)
        if cache is not None:
            cache.length += ids.shape[1]
        return trail.check(self.backend.rms_norm(h, self.params["norm_f"], self.cfg.layer_norm_epsilon))

    def logits(self, h):  # [b,t,d] -> [b,t,v]
        return check_logits(self, self.backend.linear(h, self.params["lm_head"]), h)   # hook: guards.py

    def forward(self, ids, cache=None, last_only=False):  # [b,t] -> [b,t,v] (host array)
        """Logits for every position (or the last one only), float32 (float64 in oracle mode)."""
        check_forward_memory(self, ids, cache, last_only)               # hook: nemo_scratch/memory.py
        h = self.hidden(ids, cache)
        if last_only:
            h = h[:, -1:]
        return self.backend.to_numpy(self.logits(h))

    __call__ = forward

    # ---------------------------------------------------------------- MTP and generation
    @property
    def mtp(self):
        """The MTP head (model/mtp.py), or None when the checkpoint has none."""
        if self._mtp is None and self.params.get("mtp") is not None:
            from .mtp import MTPHead

            self._mtp = MTPHead(self)
        return self._mtp

    def generate(self, ids, max_new_tokens, greedy=True, temperature=1.0, top_p=1.0, seed=None, mtp=False,
                 draft_depth=1, stop_at_eos=False, on_token=None):
        """Generate ``max_new_tokens`` after ``ids``; see model/generate.py. Returns a GenerationResult."""
        from .generate import generate

        return generate(self, ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                        seed=seed, mtp=mtp, draft_depth=draft_depth, stop_at_eos=stop_at_eos, on_token=on_token)

    def __repr__(self):
        c = self.cfg
        return (f"Model({c.num_hidden_layers} layers '{c.hybrid_override_pattern}', d={c.hidden_size}, "
                f"v={c.vocab_size}, backend={self.backend.name}, dtype={self.dtype}, "
                f"mtp={'yes' if self.params.get('mtp') else 'no'})")
