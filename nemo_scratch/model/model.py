"""The full model: embeddings -> blocks -> norm_f -> lm_head (spec section 2), prefill and cached decode.

    h = embeddings[ids]                                  # [b,t,d]
    for each layer:  h = h + mixer(rms_norm(h))           # mamba | attention | moe | mlp
    h = rms_norm(h, norm_f)
    logits = h @ lm_head.T                               # [b,t,v]

The model never imports a kernel: every op goes through ``self.backend`` (nemo_scratch.backends).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ..backends import get_backend
from ..errors import InputError
from ..guards import FiniteTrail, check_logits
from ..memory import check_forward_memory
from ..ops.formats import BF16Weight
from ..ops.quant import bf16_decode
from .blocks import block
from .cache import Cache
from .weights import as_dense, map_tree

DT_FLOOR_HELP = (
    "dt floor of the Mamba layers: 'config' (default) follows the checkpoint's time_step_limit, (0, inf) when "
    "absent, as vLLM and NVIDIA's kernels do; 'transformers' reproduces transformers 5.x, which floors dt at "
    "time_step_min (0.001); or a number")


def check_prefill_chunk(prefill_chunk):
    """None (the whole prompt at once) or a positive integer number of tokens; InputError otherwise."""
    if prefill_chunk is None:
        return None
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1:
        raise InputError(f"prefill_chunk must be a positive integer (tokens a prefill chunk) or None, got "
                         f"{prefill_chunk!r}")
    return int(prefill_chunk)


def embedding_rows(table, idx, dtype):  # [v,d] (float or BF16Weight), [b,t] -> [b,t,d]
    """Rows ``idx`` of the embedding table, in ``dtype``; a stored BF16 table decodes only the rows read."""
    if isinstance(table, BF16Weight):
        return bf16_decode(table.bits[idx]).astype(dtype, copy=False)
    return table[idx]


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


class OneDevice:
    """Where a Model's units run (units: "embedding", "layer i", "head", "mtp"): here all of them on one
    backend. parallel/pipeline.py's placement puts them on several devices behind the same four methods."""

    def __init__(self, backend):
        self._backend = backend

    def backend(self, unit):
        """The backend that runs ``unit``."""
        return self._backend

    def use(self, unit):
        """A context in which ``unit``'s device is current."""
        return contextlib.nullcontext()

    def hop(self, x, unit):
        """``x`` (an activation) on ``unit``'s device: a stage boundary moves it, here nothing does."""
        return x

    def xp(self, unit):
        """The array module that allocates on ``unit``'s device (its cache lives there)."""
        return self._backend.xp


class Model:
    """A loaded Nemotron-H / Nemotron 3 model. Build it with ``nemo_scratch.load(path)``.

    ``place`` says where each unit runs (OneDevice, or a pipeline placement over several devices, whose params
    are already on their devices); the computation, and so every number, is the same either way.
    """

    def __init__(self, cfg, params, backend="numpy", dt_floor="config", info=None, tokenizer=None, path=None,
                 place=None):
        self.cfg = cfg
        if place is None:
            self.backend = get_backend(backend)
            self.place = OneDevice(self.backend)
            self.params = map_tree(params, self.backend.asarray)
        else:
            self.place, self.params = place, params
            self.backend = place.backend("head")     # where the logits come from
        norm_f = self.params["norm_f"]
        self.dtype = np.dtype((info or {}).get("dtype") or getattr(norm_f, "dtype", np.float32))
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

    def new_cache(self, batch=1, kv_capacity=None):
        """An empty decode cache, each layer's state on that layer's device; ``kv_capacity`` preallocates the
        attention K/V for that many positions (they grow by doubling past it)."""
        return Cache(self.cfg.layers_block_type, self.cfg, batch, self.dtype,
                     [self.place.xp(f"layer {i}") for i in range(self.cfg.num_hidden_layers)], kv_capacity)

    # ---------------------------------------------------------------- forward
    def embed(self, ids):  # [b,t] -> [b,t,d]
        """The embedding rows of ``ids`` in the compute dtype (a stored BF16 table decodes only those rows)."""
        with self.place.use("embedding"):
            idx = self.place.backend("embedding").asarray(self.check_ids(ids))
            return embedding_rows(self.params["embeddings"], idx, self.dtype)

    def hidden(self, ids, cache=None, prefill_chunk=None):  # [b,t] -> [b,t,d]
        """The backbone output after norm_f (what lm_head and the MTP head read).

        ``prefill_chunk=N`` runs the tokens N at a time, carrying the cache from chunk to chunk (one is made
        when none is given), so the activations are bounded by N tokens, not by the prompt.
        """
        return self.backend.xp.concatenate(list(self._chunks(ids, cache, prefill_chunk, False)), axis=1)

    def _chunks(self, ids, cache, prefill_chunk, last_only):  # yields [b,<=N,d] in order
        ids = self.check_ids(ids)
        chunk = check_prefill_chunk(prefill_chunk)
        if cache is not None and cache.batch != ids.shape[0]:
            raise InputError(f"ids have batch {ids.shape[0]} but the cache was made for batch {cache.batch}")
        t = ids.shape[1]
        check_forward_memory(self, ids, cache, last_only, chunk)        # hook: nemo_scratch/memory.py
        if chunk is None or chunk >= t:
            yield self._hidden(ids, cache)
            return
        cache = self.new_cache(ids.shape[0]) if cache is None else cache
        for i in range(0, t, chunk):
            yield self._hidden(ids[:, i:i + chunk], cache)

    def _hidden(self, ids, cache):  # [b,t] (checked) -> [b,t,d]
        trail = FiniteTrail(self, ids)                                  # hook: nemo_scratch/guards.py
        h = trail.record("embeddings", self.embed(ids))
        for i, p in enumerate(self.params["layers"]):
            unit = f"layer {i}"
            with self.place.use(unit):
                h = block(self.place.hop(h, unit), p, self.cfg, self.place.backend(unit),
                          None if cache is None else cache.layers[i], self.dt_limit)
                h = trail.record(i, h)
        if cache is not None:
            cache.length += ids.shape[1]
        with self.place.use("head"):
            return trail.check(self.backend.rms_norm(self.place.hop(h, "head"),
                                                     as_dense(self.params["norm_f"], self.dtype),
                                                     self.cfg.layer_norm_epsilon))

    def logits(self, h):  # [b,t,d] -> [b,t,v]
        with self.place.use("head"):
            h = self.place.hop(h, "head")
            return check_logits(self, self.backend.linear(h, self.params["lm_head"]), h)   # hook: guards.py

    def forward(self, ids, cache=None, last_only=False, prefill_chunk=None):  # [b,t] -> [b,t,v] (host array)
        """Logits for every position (or the last one only), float32 (float64 in oracle mode).

        ``prefill_chunk=N``: the tokens run N at a time (see ``hidden``); with ``last_only`` only the last
        chunk's last position reaches lm_head.
        """
        if last_only:
            for h in self._chunks(ids, cache, prefill_chunk, True):  # keep only the last chunk's hidden
                pass
            return self.backend.to_numpy(self.logits(h[:, -1:]))
        return np.concatenate([self.backend.to_numpy(self.logits(h))
                               for h in self._chunks(ids, cache, prefill_chunk, False)], axis=1)

    __call__ = forward

    # ---------------------------------------------------------------- MTP and generation
    @property
    def mtp(self):
        """The MTP head (model/mtp.py), or None when the checkpoint has none."""
        if self._mtp is None and self.params.get("mtp") is not None:
            from .mtp import MTPHead

            self._mtp = MTPHead(self)
        return self._mtp

    def random_draws(self, seed):
        """The generator every random draw of one generate() call comes from (a sharded rank overrides it)."""
        return np.random.default_rng(seed)

    def generate(self, ids, max_new_tokens, greedy=True, temperature=1.0, top_p=1.0, seed=None, mtp=False,
                 draft_depth=1, stop_at_eos=False, on_token=None, prefill_chunk=None):
        """Generate ``max_new_tokens`` after ``ids``; see model/generate.py. Returns a GenerationResult."""
        from .generate import generate

        return generate(self, ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                        seed=seed, mtp=mtp, draft_depth=draft_depth, stop_at_eos=stop_at_eos, on_token=on_token,
                        prefill_chunk=prefill_chunk)

    def __repr__(self):
        c = self.cfg
        return (f"Model({c.num_hidden_layers} layers '{c.hybrid_override_pattern}', d={c.hidden_size}, "
                f"v={c.vocab_size}, backend={self.backend.name}, dtype={self.dtype}, "
                f"weights={self.info.get('weights', 'float32')}, "
                f"mtp={'yes' if self.params.get('mtp') else 'no'})")
