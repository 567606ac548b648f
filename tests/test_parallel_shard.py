"""The sharding rules of nemo_scratch/parallel/shard.py, one layer at a time: for every mixer type the R cut
layers, run by rank_block over LocalComm, add up to the unsharded block (float64, the sharded_layer
tolerance), in every weight format (float, BF16Weight, packed NVFP4 and FP8, experts in an ExpertBank);
Mamba with n_groups 1, 2 and 8 at R = 2 and 4, prefill and a cached decode step; and the errors."""

import numpy as np
import pytest
from tolerances import assert_close

from nemo_scratch.backends import get_backend
from nemo_scratch.checkpoint.safetensors_io import float32_to_bf16
from nemo_scratch.checkpoint.writer import random_tensors
from nemo_scratch.config import preset
from nemo_scratch.errors import InputError, PlanError
from nemo_scratch.model.blocks import block
from nemo_scratch.model.cache import new_layer_state
from nemo_scratch.model.weights import build_params
from nemo_scratch.ops.formats import BF16Weight, ExpertBank, FP8Weight, NVFP4Weight
from nemo_scratch.ops.quant import fp8_quantize, nvfp4_quantize
from nemo_scratch.parallel.comm import LocalComm, run_ranks
from nemo_scratch.parallel.shard import (Layout, check_layout, mamba_in_proj_rows, shard_layer, shard_params,
                                         take_cols, take_rows)
from nemo_scratch.parallel.tensor import rank_block

BE = get_backend("numpy")
FORMATS = ("float", "bf16", "nvfp4", "fp8")
MATRICES = {"mamba": ("in_proj", "out_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
            "moe": ("experts_up", "experts_down", "shared_up", "shared_down", "fc1", "fc2"), "mlp": ("up", "down")}


def layer_cfg(**overrides):
    """Widths every split below can cut, NVFP4's 16-element column blocks included (R <= 4)."""
    kw = dict(hybrid_override_pattern="M*E-", num_nextn_predict_layers=0, hidden_size=32, mamba_num_heads=8,
              mamba_head_dim=8, n_groups=2, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
              moe_intermediate_size=64, moe_shared_expert_intermediate_size=64, intermediate_size=64)
    return preset("tiny", **{**kw, **overrides})


def layers(cfg, seed=0):
    tensors = {k: v.astype(np.float64) for k, v in random_tensors(cfg, seed).items()}
    return {p["type"]: p for p in build_params(cfg, tensors, with_mtp=False, dtype=np.float64)["layers"]}


def stored(w, fmt):  # float64 [out, in] -> the format
    if isinstance(w, ExpertBank):
        return ExpertBank([stored(e, fmt) for e in w.experts])
    if fmt == "bf16":
        return BF16Weight(float32_to_bf16(w.astype(np.float32)))
    return {"float": lambda a: a, "nvfp4": nvfp4_quantize, "fp8": fp8_quantize}[fmt](w)


def in_format(p, fmt):
    return {k: (stored(v, fmt) if k in MATRICES[p["type"]] and v is not None else v) for k, v in p.items()}


def sharded_block(h, p, cfg, layout, states=None):  # -> (every rank's output, the counts of rank 0)
    layout = check_layout(cfg, layout.checked(), with_mtp=False)
    from nemo_scratch.parallel.shard import rank_config

    cfg_r = rank_config(cfg, layout, with_mtp=False)
    cuts = [shard_layer(p, cfg, layout, r) for r in range(layout.ranks)]
    comms = LocalComm.group(layout.ranks)
    outs = run_ranks(comms, lambda c: rank_block(h, cuts[c.rank][0], cuts[c.rank][1], cfg_r, BE, c,
                                                 None if states is None else states[c.rank]))
    return outs, dict(comms[0].counts), cfg_r


def check_block(p, cfg, layout, h, what):
    ref = block(h, p, cfg, BE) - h
    outs, counts, _ = sharded_block(h, p, cfg, layout)
    assert outs[0].shape == h.shape and outs[0].dtype == np.float64
    for r, out in enumerate(outs):                     # every rank holds the same, complete output
        np.testing.assert_array_equal(out, outs[0], err_msg=f"{what}: rank {r} differs from rank 0")
    assert_close(outs[0] - h, ref, "sharded_layer", what=what)
    return counts


@pytest.fixture(scope="module")
def h():
    return np.random.default_rng(1).standard_normal((2, 5, 32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("groups,R", [(1, 2), (1, 4), (2, 2), (2, 4), (8, 2), (8, 4)])
def test_mamba_prefill_and_decode_step(groups, R, fmt, h):
    cfg = layer_cfg(n_groups=groups)
    p = in_format(layers(cfg)["mamba"], fmt)
    counts = check_block(p, cfg, Layout(R), h, f"mamba n_groups={groups} R={R} {fmt}")
    # one all-reduce; a second one inside the gated norm when a norm group spans ranks (n_groups < R)
    assert counts == {"all_reduce": 1 if groups % R == 0 else 2}
    # the cached path: prefill 4 tokens into per-rank states, then one decode step
    ref_state = new_layer_state("mamba", cfg, 2, np.float64)
    block(h[:, :4], p, cfg, BE, ref_state)
    ref = block(h[:, 4:], p, cfg, BE, ref_state) - h[:, 4:]
    layout = Layout(R)
    cfg_r = sharded_block(h[:, :1], p, cfg, layout)[2]
    states = [new_layer_state("mamba", cfg_r, 2, np.float64) for _ in range(R)]
    assert states[0].conv.shape == (2, cfg.mamba_intermediate // R + 2 * cfg_r.n_groups * cfg.ssm_state_size, 4)
    sharded_block(h[:, :4], p, cfg, layout, states)
    outs, _, _ = sharded_block(h[:, 4:], p, cfg, layout, states)
    assert_close(outs[0] - h[:, 4:], ref, "sharded_layer", what="mamba decode step")


def test_mamba_in_proj_rows_follow_the_segments():
    """z | x | B | C | dt, each cut by rank: not one contiguous block of rows."""
    cfg = layer_cfg(n_groups=2)
    i, n, h = cfg.mamba_intermediate, cfg.ssm_state_size, cfg.mamba_num_heads
    rows = mamba_in_proj_rows(cfg, 1, 2)
    z, x = np.arange(32, 64), i + np.arange(32, 64)
    b = 2 * i + np.arange(n, 2 * n)                      # rank 1 holds group 1 of B, then of C
    dt = 2 * i + 4 * n + np.arange(h // 2, h)
    np.testing.assert_array_equal(rows, np.concatenate([z, x, b, b + 2 * n, dt]))
    assert len(rows) == len(set(rows.tolist())) and rows.max() < cfg.in_proj_out
    # n_groups = 1 at R = 4: z_r and x_r are 16 rows each; the single group's B and C rows follow on every rank
    one = layer_cfg(n_groups=1)
    np.testing.assert_array_equal(mamba_in_proj_rows(one, 0, 4)[32:32 + 2 * n],
                                  mamba_in_proj_rows(one, 3, 4)[32:32 + 2 * n])
    np.testing.assert_array_equal(mamba_in_proj_rows(one, 3, 4)[32:32 + 2 * n], 2 * i + np.arange(2 * n))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kv,R", [(2, 2), (2, 4), (4, 4), (1, 2)])
def test_attention_splits_q_heads_and_splits_or_replicates_kv(kv, R, fmt, h):
    cfg = layer_cfg(num_key_value_heads=kv)
    p = in_format(layers(cfg)["attention"], fmt)
    assert check_block(p, cfg, Layout(R), h, f"attention kv={kv} R={R} {fmt}") == {"all_reduce": 1}
    cut = shard_layer(p, cfg, Layout(R), R - 1)[0]
    kv_rows = (kv // R if kv % R == 0 else 1) * cfg.head_dim
    assert cut["k_proj"].shape == (kv_rows, 32) and cut["q_proj"].shape == (4 // R * cfg.head_dim, 32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", [Layout(2), Layout(4), Layout(4, "tp", "ep"), Layout(2, "tp", "ep", "round_robin"),
                                    Layout(4, "replicated", "ep"), Layout(4, "replicated", "ep", "round_robin")],
                         ids=["TP2", "TP4", "TP4+EP4", "TP2+EP2-rr", "EP4", "EP4-rr"])
def test_moe_router_replicated_experts_tp_or_ep(layout, fmt, h):
    cfg = layer_cfg()
    p = in_format(layers(cfg)["moe"], fmt)
    assert check_block(p, cfg, layout, h, f"moe {layout.label} {fmt}") == {"all_reduce": 1}
    cuts = [shard_layer(p, cfg, layout, r) for r in range(layout.ranks)]
    assert all(q["gate"] is p["gate"] and q["fc1"] is p["fc1"] and q["fc2"] is p["fc2"] for q, _ in cuts)
    if layout.experts == "ep":                           # every expert on exactly one rank, whole
        owned = sorted(x for _, s in cuts for x in s.expert_ids)
        assert owned == list(range(cfg.n_routed_experts))
        assert cuts[0][0]["experts_up"][0] is p["experts_up"][cuts[0][1].expert_ids[0]]
        assert cuts[1][1].expert_ids[:2] == ((1, 1 + layout.ranks) if layout.assign == "round_robin" else (2, 3))
    else:
        assert cuts[0][0]["experts_up"].shape == (8, 64 // layout.ranks, cfg.moe_input_width)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("R", [2, 4])
def test_mlp_splits_up_rows_and_down_columns(R, fmt, h):
    cfg = layer_cfg()
    assert check_block(in_format(layers(cfg)["mlp"], fmt), cfg, Layout(R), h, f"mlp R={R} {fmt}") == {"all_reduce": 1}


def test_packed_weights_move_with_their_scales():
    w = np.random.default_rng(2).standard_normal((6, 64))
    q = nvfp4_quantize(w)
    rows = take_rows(q, np.array([4, 1]))
    assert isinstance(rows, NVFP4Weight) and rows.packed.shape == (2, 32) and rows.block_scale.shape == (2, 4)
    np.testing.assert_array_equal(rows.block_scale, q.block_scale[[4, 1]])
    assert rows.global_scale is q.global_scale                         # per-tensor scalars stay whole
    cols = take_cols(q, 16, 48, "w")
    assert cols.packed.shape == (6, 16) and cols.block_scale.shape == (6, 2)
    np.testing.assert_array_equal(cols.block_scale, q.block_scale[:, 1:3])
    f8 = take_cols(fp8_quantize(w), 3, 9, "w")
    assert isinstance(f8, FP8Weight) and f8.data.shape == (6, 6) and f8.data.flags.c_contiguous
    with pytest.raises(PlanError, match=r"^layer 3 experts down_proj .*columns 8:16 do not fall on NVFP4's 16"):
        take_cols(q, 8, 16, "layer 3 experts down_proj (moe_intermediate_size = 16, R = 2)")


def test_whole_tree_cuts_embedding_and_head_by_vocabulary():
    cfg = preset("tiny")
    params = build_params(cfg, random_tensors(cfg))
    cut, plan = shard_params(params, cfg, Layout(4), 2)
    assert plan["vocab"] == slice(128, 192) and cut["lm_head"].shape == (64, 32)
    np.testing.assert_array_equal(cut["embeddings"], params["embeddings"][128:192])
    assert plan["cfg"].mamba_num_heads == 1 and plan["cfg"].n_groups == 1 and plan["cfg"].num_key_value_heads == 1
    assert [s.type for s in plan["mtp_layers"]] == ["attention", "moe"] and cut["mtp"]["eh_proj"] is params["mtp"]["eh_proj"]
    whole, plan = shard_params(params, cfg, Layout.of(ep=4), 1)
    assert plan["vocab"] == slice(0, 256) and whole["layers"][0] is params["layers"][0]


@pytest.mark.parametrize("overrides,layout,message", [
    (dict(mamba_num_heads=6, n_groups=2), Layout(4), r"'mamba_num_heads' = 6 cannot be split over R = 4"),
    (dict(mamba_num_heads=12, n_groups=3), Layout(2), r"'n_groups' = 3 cannot be split over R = 2"),
    (dict(num_attention_heads=6, num_key_value_heads=2), Layout(4), r"'num_attention_heads' = 6 .* R = 4"),
    (dict(num_attention_heads=12, num_key_value_heads=3), Layout(2), r"'num_key_value_heads' = 3 .* R = 2"),
    (dict(moe_intermediate_size=6), Layout(4), r"'moe_intermediate_size' = 6 .* R = 4"),
    (dict(n_routed_experts=6), Layout.of(ep=4), r"'n_routed_experts' = 6 .* R = 4"),
    (dict(intermediate_size=30), Layout(4), r"'intermediate_size' = 30 .* R = 4"),
    (dict(vocab_size=250), Layout(4), r"'vocab_size' = 250 .* R = 4"),
])
def test_impossible_splits_name_the_field_and_R(overrides, layout, message):
    with pytest.raises(PlanError, match=message) as err:
        check_layout(preset("tiny", **overrides), layout)
    assert "\n" not in str(err.value)


def test_bad_layouts_and_ranks_are_refused():
    with pytest.raises(InputError, match="tp must be a positive integer"):
        Layout.of(tp=0)
    with pytest.raises(InputError, match="tp=2 and ep=4"):
        Layout.of(tp=2, ep=4)
    with pytest.raises(InputError, match="ranks must be a positive integer"):
        Layout(0).checked()
    with pytest.raises(InputError, match="layout experts must be one of"):
        Layout(2, experts="dp").checked()
    with pytest.raises(InputError, match="the routed experts must be 'ep'"):
        Layout(2, dense="replicated").checked()
    cfg = preset("tiny")
    with pytest.raises(InputError, match=r"rank must be an integer in \[0, 2\)"):
        shard_params(build_params(cfg, random_tensors(cfg)), cfg, Layout(2), 2)
    with pytest.raises(PlanError, match="experts down_proj .*moe_intermediate_size = 16, R = 2"):
        cfg = layer_cfg(moe_intermediate_size=16)
        shard_layer(in_format(layers(cfg)["moe"], "nvfp4"), cfg, Layout(2), 0, "layer 2")
    assert [Layout.of(tp=2).label, Layout.of(ep=4).label, Layout.of(2, 2).label] == ["TP2", "EP4", "TP2+EP2"]
