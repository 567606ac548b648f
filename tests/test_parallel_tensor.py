"""The sharded model (nemo_scratch/parallel/tensor.py) against the single-device model, on random tiny and small
checkpoints in float64, at TP2, TP4, EP4 and TP2+EP2 (and TP1): logits, the experts every MoE layer selects,
cached decode, chunked prefill, greedy / sampled / MTP speculative generation, every rank bitwise in
agreement, and the collectives counted per forward and per generated token."""

import numpy as np
import pytest
from tolerances import assert_close

from nemo_scratch.backends import get_backend
from nemo_scratch.checkpoint import load_tensors, make_random_checkpoint
from nemo_scratch.checkpoint.convert import quantize_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import PlanError
from nemo_scratch.model.model import Model
from nemo_scratch.model.weights import build_params
from nemo_scratch.ops.formats import BF16Weight, FP8Weight, NVFP4Weight
from nemo_scratch.parallel.shard import Layout
from nemo_scratch.parallel.tensor import LocalShardedModel
from nemo_scratch.parallel.tensor_cost import collectives_per_forward, collectives_per_token

LAYOUTS = {"TP1": Layout.of(tp=1), "TP2": Layout.of(tp=2), "TP4": Layout.of(tp=4), "EP4": Layout.of(ep=4),
           "TP2+EP2": Layout.of(tp=2, ep=2)}
PROMPT = np.array([[5, 77, 3, 201, 18, 9, 140]])


class Routes:
    """A backend that records the experts every route() call selects (the same call order on every rank)."""

    def __init__(self, be):
        self.be, self.seen = be, []

    def __getattr__(self, name):
        return getattr(self.be, name)

    def route(self, *args, **kwargs):
        idx, w = self.be.route(*args, **kwargs)
        self.seen.append(np.asarray(idx).copy())
        return idx, w


def pair(cfg, params, layout, info=None):
    """(single-device model, sharded model), both recording their routes."""
    ref = Model(cfg, params, backend=Routes(get_backend("numpy")), info=info)
    sharded = LocalShardedModel(cfg, params, layout, info=info)
    for m in sharded.ranks:
        m.backend = Routes(m.backend)
    return ref, sharded


def same_routes(ref, sharded):
    assert ref.backend.seen, "no MoE layer ran"
    for m in sharded.ranks:
        assert len(m.backend.seen) == len(ref.backend.seen)
        for a, b in zip(m.backend.seen, ref.backend.seen):
            np.testing.assert_array_equal(a, b)
        m.backend.seen.clear()
    ref.backend.seen.clear()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    tiny = make_random_checkpoint(root / "tiny", preset("tiny"), seed=3)
    quantize_checkpoint(tiny, root / "tiny-ultra", "ultra")
    small = make_random_checkpoint(root / "small", preset("small"), seed=4)
    return {"tiny": tiny, "tiny-ultra": root / "tiny-ultra", "small": small}


def params_of(path, weights="float32"):
    cfg, tensors, info = load_tensors(path, dtype="float64", weights=weights)
    return cfg, build_params(cfg, tensors, dtype=np.float64), info


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tiny_logits_routes_decode_and_counts(checkpoints, name):
    cfg, params, info = params_of(checkpoints["tiny"])
    layout = LAYOUTS[name]
    ref, sharded = pair(cfg, params, layout, info)
    want = ref.forward(PROMPT)
    outs = sharded.run(lambda m: m.forward(PROMPT))
    assert outs[0].shape == (1, 7, cfg.vocab_size) and outs[0].dtype == np.float64
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])                  # every rank: the same logits, bitwise
    assert_close(outs[0], want, "sharded_model", what=f"tiny {name} logits")
    same_routes(ref, sharded)
    assert sharded.counts == collectives_per_forward(cfg, layout)
    # prefill in chunks of 3, then three cached decode steps
    cache, rcache = sharded.new_cache(), ref.new_cache()
    assert_close(sharded.forward(PROMPT, cache, prefill_chunk=3), ref.forward(PROMPT, rcache, prefill_chunk=3),
                 "sharded_model", what="chunked prefill")
    for tok in (11, 250, 0):
        sharded.reset_counts()
        step = sharded.forward([[tok]], cache)
        assert sharded.counts == collectives_per_forward(cfg, layout)          # one decode step
        assert_close(step, ref.forward([[tok]], rcache), "sharded_model", what=f"decode step {tok}")
    same_routes(ref, sharded)


@pytest.mark.parametrize("name", ["TP2", "TP4", "EP4", "TP2+EP2"])
def test_tiny_generation_greedy_sampled_and_speculative(checkpoints, name):
    cfg, params, info = params_of(checkpoints["tiny"])
    layout = LAYOUTS[name]
    ref, sharded = pair(cfg, params, layout, info)
    sharded.reset_counts()
    res = sharded.generate(PROMPT[0], 6)
    assert res.ids.shape == (1, 6) and res.ids.dtype == np.int64
    np.testing.assert_array_equal(res.ids, ref.generate(PROMPT[0], 6).ids)
    assert sharded.counts == {k: 6 * n for k, n in collectives_per_token(cfg, layout).items()}
    same_routes(ref, sharded)
    kw = dict(greedy=False, temperature=0.8, top_p=0.9, seed=7)          # rank 0 draws, the others follow
    np.testing.assert_array_equal(sharded.generate(PROMPT[0], 6, **kw).ids, ref.generate(PROMPT[0], 6, **kw).ids)
    spec = sharded.run(lambda m: m.generate(PROMPT[0], 7, mtp=True, draft_depth=2))
    np.testing.assert_array_equal(spec[0].ids, ref.generate(PROMPT[0], 7).ids)  # greedy MTP = plain greedy
    assert all(s.stats["trace"] == spec[0].stats["trace"] for s in spec)         # the same drafts everywhere
    assert spec[0].stats["trace"] == ref.generate(PROMPT[0], 7, mtp=True, draft_depth=2).stats["trace"]
    sampled = dict(kw, mtp=True, draft_depth=2)
    np.testing.assert_array_equal(sharded.generate(PROMPT[0], 6, **sampled).ids,
                                  ref.generate(PROMPT[0], 6, **sampled).ids)


@pytest.mark.parametrize("name", ["TP2+EP2", "EP4"])
def test_quantized_tiny_with_stored_weights(checkpoints, name):
    """The `quantize --recipe ultra` copy, weights as stored: NVFP4 experts, FP8 Mamba and shared expert, BF16
    attention and head (their cuts keep the formats)."""
    cfg, params, info = params_of(checkpoints["tiny-ultra"], weights="stored")
    assert isinstance(params["layers"][0]["in_proj"], FP8Weight) and isinstance(params["lm_head"], BF16Weight)
    assert isinstance(params["layers"][2]["experts_up"][0], NVFP4Weight)
    ref, sharded = pair(cfg, params, LAYOUTS[name], info)
    assert isinstance(sharded.ranks[1].params["layers"][0]["out_proj"], FP8Weight)
    assert_close(sharded.forward(PROMPT), ref.forward(PROMPT), "sharded_model", what=f"quantized tiny {name}")
    same_routes(ref, sharded)
    np.testing.assert_array_equal(sharded.generate(PROMPT[0], 4, mtp=True).ids, ref.generate(PROMPT[0], 4).ids)
    # TP-sliced NVFP4 experts would cut moe_intermediate_size 16 into 8-column halves: not on a 16-block
    with pytest.raises(PlanError, match=r"layer 2 experts down_proj \(moe_intermediate_size = 16, R = 2\)"):
        LocalShardedModel(cfg, params, LAYOUTS["TP2"], info=info)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TP2", "TP4", "EP4", "TP2+EP2"])
def test_small_logits_routes_decode_and_greedy(checkpoints, name):
    """small (n_groups 4, 2 kv heads, 32 experts): short sequences, its forward is ~50x tiny's."""
    cfg, params, info = params_of(checkpoints["small"])
    ref, sharded = pair(cfg, params, LAYOUTS[name], info)
    prompt = PROMPT[:, :4] * 37
    cache, rcache = sharded.new_cache(), ref.new_cache()
    assert_close(sharded.forward(prompt, cache), ref.forward(prompt, rcache), "sharded_model", what=f"small {name}")
    assert_close(sharded.forward([[8191]], cache), ref.forward([[8191]], rcache), "sharded_model",
                 what=f"small {name} decode")
    same_routes(ref, sharded)
    np.testing.assert_array_equal(sharded.generate(prompt[0], 2).ids, ref.generate(prompt[0], 2).ids)


def test_documented_collectives_per_token():
    """One all-reduce per block, one for the vocab-parallel embedding, one per Mamba block whose norm group
    spans ranks, the logits' all-gather, and the sampled id's broadcast; EP alone: one per MoE block."""
    tiny, ultra = preset("tiny"), preset("ultra")        # tiny: M*E-ME (2 Mamba, n_groups 2)
    assert collectives_per_token(tiny, LAYOUTS["TP2"]) == {"all_reduce": 7, "all_gather": 1, "broadcast": 1}
    assert collectives_per_token(tiny, LAYOUTS["TP4"]) == {"all_reduce": 9, "all_gather": 1, "broadcast": 1}
    assert collectives_per_token(tiny, LAYOUTS["EP4"]) == {"all_reduce": 2, "broadcast": 1}
    assert collectives_per_token(ultra, Layout.of(8, 8)) == {"all_reduce": 109, "all_gather": 1, "broadcast": 1}
    assert collectives_per_forward(ultra, Layout.of(ep=8)) == {"all_reduce": 48}
