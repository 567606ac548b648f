"""Tensor and expert parallelism, part 3: the sharded model, one rank of it per process (or per thread).

Each rank holds its cut of the parameters (shard.py), a per-rank config and a per-rank cache, and runs

    h = embed(ids)                                  # vocab-parallel: own rows, zeros elsewhere, all-reduce
    for each block:
        h = h + all_reduce(mixer(rms_norm(h), p_r, cfg_r))     # the mixers of model/blocks.py, unchanged
    h = rms_norm(h, norm_f)
    logits = all_gather(h @ lm_head_r.T, axis=-1)   # [b,t,v/R] per rank -> [b,t,v] on every rank

A replicated block (EP_n: the dense parts whole on every rank) runs whole with no collective. Two mixers
need more than the unchanged code: a Mamba layer whose norm group spans ranks (n_groups divides R) all-reduces
its sum of squares inside the gated norm (``SpanNorm``), and an EP MoE layer runs only its own experts
(``ep_moe_parts``). Every collective goes through ``comm`` (comm.py), so the same rank code runs under
LocalComm (threads, CPU tests), ProcessComm and NcclComm.

``RankModel`` is model.Model with these pieces swapped in, so forward, hidden (chunked prefill) and cached
decode are the Model's own code, and generate (greedy, sampling, MTP speculative decoding) runs
model/generate.py's loops with one change: the random draws come from ``RankZeroRng`` (rank 0 draws and
broadcasts), so every rank takes the same token.
``LocalShardedModel`` runs all R ranks in one process and answers with rank 0's results.
"""

from __future__ import annotations

import numpy as np

from ..guards import FiniteTrail, check_logits
from ..model.blocks import MIXERS, block, mamba_mixer
from ..model.cache import Cache
from ..model.model import Model, embedding_rows
from ..model.mtp import MTPHead
from ..model.weights import as_dense
from ..ops.common import get_xp
from ..ops.norm import silu
from .comm import LocalComm, run_ranks
from .shard import Layout, shard_params


class SpanNorm:
    """The backend as a Mamba rank sees it when its gated-norm group is spread over R / n_groups ranks: every
    op is the backend's, except that the norm's sum of squares is all-reduced over the group's ranks."""

    def __init__(self, be, comm, span):
        self._be, self._comm, self._span = be, comm, span

    def __getattr__(self, name):
        return getattr(self._be, name)

    def gated_rms_norm(self, y, z, weight, n_groups, eps):  # [..., i/R], [..., i/R], [i/R] -> [..., i/R]
        xp, s = get_xp(y, z, weight), self._span
        # g = y * silu(z)                     (gate before the norm, as ops/norm.py::gated_rms_norm)
        g = y * silu(z)
        # this rank's share of its group's sum of g^2, in the group's slot; the all-reduce adds the shares
        part = xp.zeros((*g.shape[:-1], s.groups), dtype=g.dtype)
        part[..., s.group] = xp.sum(g * g, axis=-1)
        ss = self._comm.all_reduce(part)[..., s.group:s.group + 1]                   # [..., 1]
        # out = weight * g * rsqrt(sum g^2 / width + eps)
        return weight * (g * (1 / xp.sqrt(ss / g.dtype.type(s.width) + g.dtype.type(eps))))


def ep_moe_parts(x, p, cfg, be, shard):  # [b,t,d] -> (partial [b,t,d], local [b,t,d] or None)
    """The MoE mixer under expert parallelism: the replicated router picks the same experts on every rank;
    this rank runs the ones it owns. -> (what the all-reduce adds up, what is added after it: the shared
    expert when it is replicated, else None).

    Deviation: vLLM and SGLang move EP tokens by all-gather / all-to-all. Here every rank holds every token
    (batch 1 has nothing to spread), so the experts' outputs ride on the block's one all-reduce: exact at any
    batch, cheap only while the tokens are few."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    xp = get_xp(xf)
    idx, w = be.route(xf, p["gate"], as_dense(p["gate_bias"], x.dtype), cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                      cfg.norm_topk_prob, cfg.routed_scaling_factor)                  # [bt,k], [bt,k]
    # u = fc1 x; r = sum over this rank's selected experts of w * expert(u); out = fc2 r
    u = xf if p.get("fc1") is None else be.linear(xf, p["fc1"])                      # [bt,l]
    r = xp.zeros_like(u)
    local = {ex: j for j, ex in enumerate(shard.expert_ids)}
    for ex in sorted(set(be.to_numpy(idx).ravel().tolist()) & local.keys()):
        tok, slot = xp.nonzero(idx == ex)            # each token selects an expert at most once
        r[tok] += w[tok, slot][:, None] * be.mlp(u[tok], p["experts_up"][local[ex]], p["experts_down"][local[ex]])
    out = r if p.get("fc2") is None else be.linear(r, p["fc2"])                     # [bt,d]
    if p.get("shared_up") is None:
        return out.reshape(b, t, d), None
    shared = be.mlp(xf, p["shared_up"], p["shared_down"])
    if shard.shared == "tp":
        return (out + shared).reshape(b, t, d), None
    return out.reshape(b, t, d), shared.reshape(b, t, d)


def rank_block(h, p, shard, cfg, be, comm, state=None, dt_limit=(0.0, float("inf"))):  # [b,t,d] -> [b,t,d]
    """One residual block on one rank: h + all_reduce(partial mixer(rms_norm(h))), or the whole block when
    the layer is replicated."""
    if shard.split == "replicated":
        return block(h, p, cfg, be, state, dt_limit)
    x = be.rms_norm(h, as_dense(p["norm"], h.dtype), cfg.layer_norm_epsilon)
    if shard.type == "mamba":
        nbe = be if shard.norm is None else SpanNorm(be, comm, shard.norm)
        return h + comm.all_reduce(mamba_mixer(x, p, cfg, nbe, state, dt_limit))
    if shard.type == "moe" and shard.experts == "ep":
        part, local = ep_moe_parts(x, p, cfg, be, shard)
        y = comm.all_reduce(part)
        return h + (y if local is None else y + local)
    return h + comm.all_reduce(MIXERS[shard.type](x, p, cfg, be, state))


class RankZeroRng(np.random.Generator):
    """The generator every rank samples with: rank 0 draws from ``default_rng(seed)`` and broadcasts, the other
    ranks take its draw. model/generate.py calls ``choice`` and ``random`` only, so rank 0 consumes the very
    stream a single-device run with the same seed does."""

    def __init__(self, seed, comm):
        super().__init__(np.random.PCG64(0))          # the base stream is never used
        self._inner, self._comm = np.random.default_rng(seed), comm

    def _shared(self, draw, size, dtype):
        mine = np.asarray(draw() if self._comm.rank == 0 else np.zeros(() if size is None else size, dtype),
                          dtype=dtype)
        out = self._comm.broadcast(np.atleast_1d(mine), 0)
        return out.reshape(mine.shape)[()] if size is None else out.reshape(mine.shape)

    def choice(self, a, size=None, replace=True, p=None, axis=0, shuffle=True):
        return self._shared(lambda: self._inner.choice(a, size, replace, p, axis, shuffle), size, np.int64)

    def random(self, size=None, dtype=np.float64, out=None):
        return self._shared(lambda: self._inner.random(size, dtype), size, np.float64)


class RankModel(Model):
    """One rank of a sharded model, with the Model API (embed, hidden, logits, forward, new_cache, mtp,
    generate). Build it with ``RankModel.from_params(cfg, params, layout, comm)``."""

    def __init__(self, cfg, rank_params, plan, comm, **model_options):
        super().__init__(cfg, rank_params, **model_options)         # one device: this rank's
        self.plan, self.comm = plan, comm
        self.rank_cfg, self.layout = plan["cfg"], plan["layout"]

    @classmethod
    def from_params(cls, cfg, params, layout, comm, **kwargs):
        """Rank ``comm.rank`` of ``layout`` cut from a whole parameter tree (model/weights.py::build_params)."""
        rank_params, plan = shard_params(params, cfg, layout, comm.rank)
        return cls(cfg, rank_params, plan, comm, **kwargs)

    def new_cache(self, batch=1, kv_capacity=None):
        """This rank's cache: its Mamba heads' conv/SSM states and its kv heads' K/V."""
        return Cache(self.cfg.layers_block_type, self.rank_cfg, batch, self.dtype, self.backend.xp, kv_capacity)

    def embed(self, ids):  # [b,t] -> [b,t,d]
        idx = self.check_ids(ids)
        be, table = self.backend, self.params["embeddings"]
        if self.layout.dense == "replicated":
            return embedding_rows(table, be.asarray(idx), self.dtype)
        v = self.plan["vocab"]
        # rows of the ids in this rank's vocabulary slice, zeros for the others; the all-reduce adds the one
        # rank that holds each id
        local = idx - v.start
        mine = (local >= 0) & (local < v.stop - v.start)
        rows = embedding_rows(table, be.asarray(np.where(mine, local, 0)), self.dtype)
        return self.comm.all_reduce(be.xp.where(be.asarray(mine[..., None]), rows, self.dtype.type(0)))

    def _hidden(self, ids, cache):  # [b,t] (checked) -> [b,t,d]
        trail = FiniteTrail(self, ids)               # the finiteness hook of model/model.py (nemo_scratch/guards.py)
        h = self.embed(ids)
        if self.layout.dense == "replicated":        # a cut table cannot be searched by global ids: layer 0 says
            trail.record("embeddings", h)
        for i, (p, shard) in enumerate(zip(self.params["layers"], self.plan["layers"])):
            h = trail.record(i, rank_block(h, p, shard, self.rank_cfg, self.backend, self.comm,
                                           None if cache is None else cache.layers[i], self.dt_limit))
        if cache is not None:
            cache.length += ids.shape[1]
        return trail.check(self.backend.rms_norm(h, as_dense(self.params["norm_f"], self.dtype),
                                                 self.cfg.layer_norm_epsilon))

    def logits(self, h):  # [b,t,d] -> [b,t,v]
        part = self.backend.linear(h, self.params["lm_head"])                        # [b,t,v/R]
        out = part if self.layout.dense == "replicated" else self.comm.all_gather(part, axis=-1)
        return check_logits(self, out, h)

    @property
    def mtp(self):
        if self._mtp is None and self.params.get("mtp") is not None:
            self._mtp = RankMTPHead(self)
        return self._mtp

    def random_draws(self, seed):
        """Rank 0 draws and broadcasts (RankZeroRng), so every rank decodes the same tokens."""
        return RankZeroRng(seed, self.comm)


class RankMTPHead(MTPHead):
    """The MTP head of one rank: enorm, hnorm, eh_proj and final_layernorm whole; its layers sharded."""

    def new_cache(self, batch=1, kv_capacity=None):
        return Cache(self.cfg.mtp_layers_block_type, self.model.rank_cfg, batch, self.model.dtype, self.be.xp,
                     kv_capacity)

    def step(self, hidden, next_ids, cache=None):  # [b,t,d], [b,t] -> ([b,t,v], [b,t,d])
        be, p, m = self.be, self.p, self.model
        eps, dense = self.cfg.layer_norm_epsilon, (lambda key: as_dense(p[key], m.dtype))
        e = m.embed(next_ids)                                                           # [b,t,d]
        # a = eh_proj(concat[enorm(e), hnorm(h)])   (embedding first; model/mtp.py)
        a = be.xp.concatenate([be.rms_norm(e, dense("enorm"), eps), be.rms_norm(hidden, dense("hnorm"), eps)],
                              axis=-1)
        a = be.linear(a, p["eh_proj"])
        for j, (layer, shard) in enumerate(zip(p["layers"], m.plan["mtp_layers"])):
            a = rank_block(a, layer, shard, m.rank_cfg, be, m.comm, None if cache is None else cache.layers[j])
        if cache is not None:
            cache.length += a.shape[1]
        h = be.rms_norm(a, dense("final_layernorm"), eps)
        return m.logits(h), h


class LocalShardedModel:
    """All ranks of ``layout`` in this process, one thread each over LocalComm; the Model API answers with
    rank 0's result. ``run(fn)`` gives every rank's ``fn(rank_model)``; a cache is a list of per-rank caches."""

    def __init__(self, cfg, params, layout, backend="numpy", dt_floor="config", info=None, tokenizer=None):
        layout = layout if isinstance(layout, Layout) else Layout.of(*layout)
        self.cfg, self.layout, self.tokenizer = cfg, layout, tokenizer
        self.comms = LocalComm.group(layout.ranks)
        self.ranks = [RankModel.from_params(cfg, params, layout, c, backend=backend, dt_floor=dt_floor, info=info,
                                            tokenizer=tokenizer) for c in self.comms]

    def run(self, fn):
        return run_ranks(self.comms, lambda c: fn(self.ranks[c.rank]))

    def new_cache(self, batch=1):
        return [m.new_cache(batch) for m in self.ranks]

    def _cache(self, cache, m):
        return None if cache is None else cache[m.comm.rank]

    def forward(self, ids, cache=None, last_only=False, prefill_chunk=None):  # [b,t] -> [b,t,v]
        return self.run(lambda m: m.forward(ids, self._cache(cache, m), last_only, prefill_chunk))[0]

    __call__ = forward

    def hidden(self, ids, cache=None, prefill_chunk=None):  # [b,t] -> [b,t,d]
        return self.run(lambda m: m.backend.to_numpy(m.hidden(ids, self._cache(cache, m), prefill_chunk)))[0]

    def generate(self, ids, max_new_tokens, **kwargs):
        return self.run(lambda m: m.generate(ids, max_new_tokens, **kwargs))[0]

    def reset_counts(self):
        for c in self.comms:
            c.reset_counts()

    @property
    def counts(self):
        """Collectives per kind run by rank 0 (every rank runs the same ones)."""
        return dict(self.comms[0].counts)
