"""Multi-token prediction (MTP) head, as vLLM's nemotron_h_mtp.py and Megatron build it (spec section 6).

transformers drops the ``mtp.*`` weights, so this is where they run. One depth k (k = 1..K, the SAME
weights reused at every depth):

    e_k = Emb[token at position t+k]                      # position t sees the token k ahead
    a   = eh_proj(concat([enorm(e_k), hnorm(h_{k-1})]))   # ORDER: embedding first, hidden second
    a   = a + Attn(norm0(a))                              # causal over the MTP stream, its own KV cache
    a   = a + MoE(norm1(a))
    h_k = final_layernorm(a)
    logits_k = h_k @ lm_head.T                            # predicts the token at position t+k+1

h_0 is the backbone output after norm_f; h_k chains from depth to depth. Embedding and lm_head are shared
with the backbone.
"""

from __future__ import annotations

from .blocks import block
from .cache import Cache
from .weights import as_dense


class MTPHead:
    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg
        self.place = model.place
        self.be = model.place.backend("mtp")
        self.p = model.params["mtp"]

    def new_cache(self, batch=1, kv_capacity=None):
        return Cache(self.cfg.mtp_layers_block_type, self.cfg, batch, self.model.dtype, self.place.xp("mtp"),
                     kv_capacity)

    def step(self, hidden, next_ids, cache=None):  # [b,t,d], [b,t] -> ([b,t,v], [b,t,d])
        """One MTP depth over t positions: hidden at each position and the id of the token one ahead."""
        be, cfg, p, place = self.be, self.cfg, self.p, self.place
        eps = cfg.layer_norm_epsilon
        e = self.model.embed(next_ids)                                                  # [b,t,d]
        with place.use("mtp"):
            e, hidden = place.hop(e, "mtp"), place.hop(hidden, "mtp")
            # a = eh_proj(concat[enorm(e), hnorm(h)])   (embedding first)
            a = be.xp.concatenate([be.rms_norm(e, as_dense(p["enorm"], e.dtype), eps),
                                   be.rms_norm(hidden, as_dense(p["hnorm"], e.dtype), eps)], axis=-1)
            a = be.linear(a, p["eh_proj"])                                              # [b,t,d]
            for j, layer in enumerate(p["layers"]):
                a = block(a, layer, cfg, be, None if cache is None else cache.layers[j])
            if cache is not None:
                cache.length += a.shape[1]
            h = be.rms_norm(a, as_dense(p["final_layernorm"], a.dtype), eps)            # [b,t,d]
        return self.model.logits(h), h

    def predict(self, hidden, next_ids, depth=1):  # [b,t,d], [b,t] -> list of [b,t-k+1,v] for k = 1..depth
        """Draft logits for depths 1..depth over a whole sequence (no cache; each depth its own causal stream).

        hidden[:, j] is the backbone output at position j; next_ids[:, j] is the token at position j+1.
        Depth k's logits at index j predict the token at position j+k+1.
        """
        out, h = [], hidden
        for k in range(1, depth + 1):
            logits, h = self.step(h, next_ids[:, k - 1:])
            out.append(self.be.to_numpy(logits))
            h = h[:, :-1]
        return out
