"""Hypothesis strategies of the oracle: sizes that cross the chunk, block, warp and tile sizes, and cases.

``crossing(lo, hi, *boundaries)`` draws integers with half the draws pinned next to a boundary
(k*B - 1, k*B, k*B + 1 for k = 1, 2): the sizes where a kernel's last, partial block or chunk goes wrong.
``DIMS[op](fixed)`` draws a dims dict for a golden op (nemo_scratch/golden.py::OPS) that the op accepts;
``fixed`` pins some dimensions (a kernel that only runs at dh=64, say). ``cases(op, fixed, names)`` draws a
``Case``: dims, one of the op's input cases (nemo_scratch/golden_cases.py) and a seed. All shrink toward
small sizes, the "random" case and seed 0.

The sizes stay small (a kernel author's test suite runs many examples on a CPU, or a simulator), while
still crossing one warp (32), the NVFP4 block (16), the SSD chunk and the attention query tile (16, 32, 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from ..golden_cases import NEEDS, case_names

WARP = 32          # threads of a warp: reductions and per-lane loops cross it
NVFP4_BLOCK = 16   # elements per E4M3 block scale (spec 9.3)
QUERY_TILES = (16, 32, 64)   # attention query / key tiles of flash-style kernels
ROW_TILE = 128     # output rows per tile of the reference NVFP4 matmul (rows_per_tile)


def crossing(lo, hi, *boundaries):
    """Integers in [lo, hi], half of the draws pinned next to a boundary: k*B - 1, k*B, k*B + 1 for k = 1, 2."""
    near = sorted({k * bnd + d for bnd in boundaries for k in (1, 2) for d in (-1, 0, 1)
                   if lo <= k * bnd + d <= hi})
    return st.one_of(st.sampled_from(near), st.integers(lo, hi)) if near else st.integers(lo, hi)


def _picker(draw, fixed):
    """pick(name, strategy): the fixed value of ``name`` when the caller pinned it, else a draw."""
    return lambda name, strategy: fixed[name] if name in fixed else draw(strategy)


@st.composite
def _norm(draw, fixed):
    pick = _picker(draw, fixed)
    return {"b": pick("b", st.integers(1, 2)), "t": pick("t", st.integers(1, 4)),
            "d": pick("d", crossing(1, 70, WARP, 64))}


@st.composite
def _gated(draw, fixed):
    pick = _picker(draw, fixed)
    g = pick("g", st.integers(1, 4))
    i = pick("i", st.builds(lambda w: g * w, crossing(1, 34, NVFP4_BLOCK, WARP)))   # g groups of i/g
    return {"b": pick("b", st.integers(1, 2)), "t": pick("t", st.integers(1, 4)), "i": i, "g": g}


@st.composite
def _conv(draw, fixed):
    pick = _picker(draw, fixed)
    return {"b": pick("b", st.integers(1, 2)), "t": pick("t", st.integers(1, 12)),
            "c": pick("c", crossing(1, 70, WARP, 64)), "w": pick("w", st.integers(1, 4))}


@st.composite
def _conv_step(draw, fixed):
    d = draw(_conv(fixed))
    return {k: d[k] for k in ("b", "c", "w")}


def _heads(pick):
    """(h, g): g groups, h a multiple of g (head hh reads group hh // (h/g))."""
    g = pick("g", st.integers(1, 2))
    return pick("h", st.builds(lambda r: g * r, st.integers(1, 3))), g


@st.composite
def _ssd(draw, fixed):
    pick = _picker(draw, fixed)
    h, g = _heads(pick)
    chunk = pick("chunk", crossing(1, 16, 4, 8))
    # t crosses 1, 2 and 3 chunks, with the ragged last chunks in between
    return {"b": pick("b", st.integers(1, 2)), "t": pick("t", crossing(1, 3 * chunk + 1, chunk)), "h": h,
            "p": pick("p", st.integers(1, 4)), "g": g, "n": pick("n", crossing(1, 40, NVFP4_BLOCK, WARP)),
            "chunk": chunk}


@st.composite
def _ssd_step(draw, fixed):
    pick = _picker(draw, fixed)
    h, g = _heads(pick)
    return {"b": pick("b", st.integers(1, 3)), "h": h, "p": pick("p", crossing(1, 10, 8)), "g": g,
            "n": pick("n", crossing(1, 40, NVFP4_BLOCK, WARP))}


@st.composite
def _attention(draw, fixed):
    pick = _picker(draw, fixed)
    s = pick("s", crossing(1, 70, *QUERY_TILES))
    # a prefill (t = s), a decode step (t = 1), or new tokens against a longer cache
    t = pick("t", st.one_of(st.just(s), st.just(1), st.integers(1, s)))
    kv = pick("kv", st.integers(1, 2))
    return {"b": pick("b", st.integers(1, 2)), "t": t, "s": s, "q": pick("q", st.builds(lambda r: kv * r,
                                                                                         st.integers(1, 3))),
            "kv": kv, "dh": pick("dh", crossing(1, 34, NVFP4_BLOCK, WARP))}


@st.composite
def _route(draw, fixed):
    pick = _picker(draw, fixed)
    n_group = pick("n_group", st.sampled_from([1, 2, 4]))
    e = pick("e", st.builds(lambda w: n_group * w, st.integers(1, 8)))
    topk_group = pick("topk_group", st.integers(1, n_group))
    k = pick("k", st.integers(1, max(1, topk_group * (e // n_group))))
    return {"t": pick("t", st.integers(1, 8)), "d": pick("d", crossing(1, 40, WARP)), "e": e, "k": k,
            "n_group": n_group, "topk_group": topk_group}


@st.composite
def _experts(draw, fixed):
    pick = _picker(draw, fixed)
    e = pick("e", st.integers(1, 8))
    return {"t": pick("t", st.integers(1, 9)), "e": e, "k": pick("k", st.integers(1, e)),
            "f": pick("f", crossing(1, 40, WARP)), "l": pick("l", crossing(1, 40, WARP))}


@st.composite
def _nvfp4_matmul(draw, fixed):
    pick = _picker(draw, fixed)
    return {"m": pick("m", st.integers(1, 4)), "out": pick("out", crossing(1, 140, WARP, ROW_TILE)),
            "in": pick("in", st.builds(lambda nb: NVFP4_BLOCK * nb, st.integers(1, 6)))}


@st.composite
def _nvfp4_dequantize(draw, fixed):
    pick = _picker(draw, fixed)
    return {"out": pick("out", crossing(1, 40, WARP)),
            "in": pick("in", st.builds(lambda nb: NVFP4_BLOCK * nb, st.integers(1, 6)))}


# golden op -> fixed dims -> strategy of a dims dict
DIMS = {
    "rms_norm": _norm,
    "gated_rms_norm": _gated,
    "causal_conv1d": _conv,
    "causal_conv1d_step": _conv_step,
    "ssd_scan_chunked": _ssd,
    "ssd_step": _ssd_step,
    "gqa_attention": _attention,
    "route": _route,
    "moe_experts": _experts,
    "nvfp4_matmul": _nvfp4_matmul,
    "nvfp4_dequantize": _nvfp4_dequantize,
}


@dataclass(frozen=True)
class Case:
    """One drawn test case: the golden op, its input case, its dims and the seed of its inputs.

    ``golden_command()`` is the ``nemo-scratch golden`` command that writes exactly these inputs to a file.
    """

    op: str
    case: str
    dims: dict = field(hash=False)
    seed: int

    def shape(self):
        return ",".join(f"{k}={v}" for k, v in self.dims.items())

    def golden_command(self, out="case.safetensors"):
        return (f"nemo-scratch golden --op {self.op} --case {self.case} --shape {self.shape()} --seed {self.seed} "
                f"--out {out}")

    def __str__(self):
        return f"case {self.case!r} of {self.op}, dims {self.shape()}, seed {self.seed}"


@st.composite
def cases(draw, op, fixed=None, names=None):
    """A Case of ``op``: dims from DIMS[op] (``fixed`` pinned), one of ``names`` (default: every case of the
    op) that the dims can host, and a seed."""
    dims = draw(DIMS[op](dict(fixed or {})))
    usable = [c for c in (names or case_names(op)) if NEEDS.get(op, {}).get(c, lambda d: True)(dims)]
    if not usable:
        from hypothesis import reject

        reject()
    return Case(op, draw(st.sampled_from(usable)), dims, draw(st.integers(0, 2**32 - 1)))
