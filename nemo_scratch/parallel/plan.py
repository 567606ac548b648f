"""Pipeline placement: contiguous stages of units over N devices, balanced by bytes. Pure arithmetic.

    placement = plan_placement("ultra", "ultra", gpus=8, gpu_mem_gib=80, max_len=2**20)
    print(format_placement(placement))

A stage is a run of consecutive units (units.py: embedding, layer 0 .. n-1, head, mtp) on one device. Its
cost is what the device must hold:

    cost(stage) = sum(weights + KV + states of its units) + max(activation peak of its units) + margin

(the layers of a stage run one after another, so only one unit's temporaries are alive at a time). The
partition minimises the largest stage cost over at most N stages, exactly: a binary search over every
stage cost that can occur, each candidate checked by a greedy fill (optimal for a cost that only grows as a
stage grows). It is deterministic; at the optimum the fill is front-loaded, so a plan may use fewer devices
when that reaches the same maximum (fewer stage hops). Nothing is read but config/header metadata.

For comparison the plan also prices vLLM's equal-layer-count split (``vllm.distributed.utils.get_pp_indices``:
floor(n / N) layers a stage, the remainder given one each to the stages before the last, counting backwards;
the embedding on the first stage, head and MTP on the last). It is reported, never used.

The margin (CONTEXT_MARGIN_BYTES, 2 GiB a device) stands for the CUDA context, the loaded kernels and the
memory pool's fragmentation: Hugging Face accelerate's big-model-inference guide says the first CUDA
allocation "loads CUDA kernels which take about 1-2GB of memory" (PyTorch); CuPy's context is smaller, its
pool's rounding and caching take the rest.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.modelopt import RECIPES
from ..config import PATTERN_CHAR, PRESETS, NemotronConfig, preset
from ..errors import InputError, PlanError
from ..params import decimal_bytes
from .memory import CACHE_DTYPES, COMPUTE_DTYPES, RunShape, unit_reserves
from .units import WEIGHT_MODES, Unit, checkpoint_weights, config_weights, unit_names

GB, GIB = 1e9, 2**30
CONTEXT_MARGIN_BYTES = 2 * GIB
DEFAULT_PREFILL_CHUNK = 8192


@dataclass(frozen=True)
class Stage:
    """One device's row of a placement."""

    device: int
    units: tuple            # Unit, in execution order (empty: the device holds nothing)
    budget_bytes: int
    margin_bytes: int       # 0 for an empty device

    weight_bytes = property(lambda self: sum(u.weight_bytes for u in self.units))
    kv_bytes = property(lambda self: sum(u.kv_bytes for u in self.units))
    state_bytes = property(lambda self: sum(u.state_bytes for u in self.units))
    activation_bytes = property(lambda self: max((u.activation_bytes for u in self.units), default=0))

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.state_bytes + self.activation_bytes + self.margin_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"device": self.device, "units": [u.name for u in self.units], "weights": self.weight_bytes,
                "kv": self.kv_bytes, "state": self.state_bytes, "activations": self.activation_bytes,
                "margin": self.margin_bytes, "total": self.total_bytes, "free": self.free_bytes, "fits": self.fits}


@dataclass(frozen=True)
class Placement:
    """A byte-balanced pipeline plan (``stages``, one per device) and the equal-count split it replaces."""

    model: str              # preset name, config path or checkpoint directory
    recipe: str | None      # None when the formats were read from a checkpoint
    weights: str            # "stored" | "float32"
    run: RunShape
    gpus: int
    budget_bytes: int
    margin_bytes: int
    units: tuple            # every Unit, in execution order
    stages: tuple           # Stage per device
    equal_count: tuple      # Stage per device under vLLM's get_pp_indices split

    @property
    def weight_bytes(self) -> int:
        return sum(u.weight_bytes for u in self.units)

    @property
    def equal_count_fits(self) -> bool:
        return all(s.fits for s in self.equal_count)

    def device_of(self, unit_name: str) -> int:
        for stage in self.stages:
            if any(u.name == unit_name for u in stage.units):
                return stage.device
        raise InputError(f"placement: no unit {unit_name!r}; its {len(self.units)} units run from "
                         f"{self.units[0].name!r} to {self.units[-1].name!r} (layers as 'layer 7')")

    def to_dict(self) -> dict:
        return {"model": self.model, "recipe": self.recipe, "weights": self.weights, "gpus": self.gpus,
                "budget_bytes": self.budget_bytes, "margin_bytes": self.margin_bytes,
                "max_len": self.run.max_len, "batch": self.run.batch, "prefill_chunk": self.run.prefill_chunk,
                "cache_dtype": self.run.cache_dtype, "draft_depth": self.run.draft_depth,
                "weight_bytes": self.weight_bytes, "stages": [s.to_dict() for s in self.stages],
                "equal_count": [s.to_dict() for s in self.equal_count], "equal_count_fits": self.equal_count_fits}


# ---------------------------------------------------------------------------------------------- partition

def stage_cost(resident, peak, i, j, margin) -> int:
    """Cost of the stage holding units i..j-1 (0 for an empty stage)."""
    return sum(resident[i:j]) + max(peak[i:j]) + margin if j > i else 0


def _greedy(resident, peak, capacity, margin):
    """Front-loaded fill at ``capacity``: [(i, j)] stages, or (None, unit index where it failed)."""
    stages, i, n = [], 0, len(resident)
    while i < n:
        j, total, top = i, 0, 0
        while j < n and total + resident[j] + max(top, peak[j]) + margin <= capacity:
            total, top, j = total + resident[j], max(top, peak[j]), j + 1
        if j == i:
            return None, i
        stages.append((i, j))
        i = j
    return stages, n


def min_max_partition(resident, peak, parts, margin=0) -> list:
    """The contiguous split of units into at most ``parts`` stages with the smallest largest stage cost.

    resident[u], peak[u]: bytes of unit u (kept for the run; transient, a per-stage max). Returns ``parts``
    (start, stop) ranges covering 0..n in order; the trailing ones may be empty.
    """
    n = len(resident)
    if n == 0 or parts < 1:
        raise InputError(f"min_max_partition: need units and parts >= 1, got {n} units, parts={parts}")
    candidates = set()
    for i in range(n):
        total, top = 0, 0
        for j in range(i, n):
            total, top = total + resident[j], max(top, peak[j])
            candidates.add(total + top + margin)
    candidates = sorted(candidates)
    lo, hi = 0, len(candidates) - 1     # the largest candidate (everything on one stage) always fits
    while lo < hi:
        mid = (lo + hi) // 2
        stages, _ = _greedy(resident, peak, candidates[mid], margin)
        if stages is not None and len(stages) <= parts:
            hi = mid
        else:
            lo = mid + 1
    stages, _ = _greedy(resident, peak, candidates[lo], margin)
    return stages + [(n, n)] * (parts - len(stages))


def pp_indices(num_layers, rank, parts) -> tuple:
    """vLLM's get_pp_indices: [start, end) of the layers of pipeline rank ``rank`` of ``parts``."""
    sizes = [num_layers // parts] * parts
    for i in range(2, num_layers % parts + 2):
        sizes[-i] += 1
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# ---------------------------------------------------------------------------------------------- the plan

def _positive_int(name, flag, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"plan_placement: {name} ({flag}) must be a positive integer, got {value!r}")
    return value


def _source(source, recipe, weights, input_scales, with_mtp):
    """-> (cfg, label, {unit: (bytes, names)}, recipe) for a preset name, a NemotronConfig, a config.json
    path or a checkpoint directory path."""
    if isinstance(source, str) and source not in PRESETS and os.path.exists(source):
        source = Path(source)
    if isinstance(source, (str, NemotronConfig)):
        cfg = preset(source) if isinstance(source, str) else source
        label = source if isinstance(source, str) else "custom config"
    elif isinstance(source, os.PathLike) and os.path.isdir(source):
        if recipe is not None:
            raise InputError(f"plan_placement: recipe ({recipe!r}, --recipe) does not apply to a checkpoint "
                             f"({source}): its storage formats are read from the safetensors headers")
        cfg, table = checkpoint_weights(source, weights, with_mtp)
        return cfg, str(source), table, None
    elif isinstance(source, os.PathLike):
        cfg, label = NemotronConfig.from_json(source), str(source)
    else:
        raise InputError(f"plan_placement: source must be a preset name, a NemotronConfig, or the path of a "
                         f"config.json or checkpoint directory, got {type(source).__name__}")
    recipe = "bf16" if recipe is None else recipe
    if recipe not in RECIPES:
        raise InputError(f"plan_placement: unknown recipe {recipe!r} (--recipe): expected one of {RECIPES}")
    return cfg, label, config_weights(cfg, recipe, weights, input_scales, with_mtp), recipe


def plan_placement(source, recipe=None, gpus=8, gpu_mem_gib=80.0, *, max_len=None, batch=1,
                   prefill_chunk=DEFAULT_PREFILL_CHUNK, cache_dtype="float32", weights="stored", draft_depth=0,
                   margin_bytes=CONTEXT_MARGIN_BYTES, input_scales=True, with_mtp=True, dtype="float32") -> Placement:
    """Place ``source``'s units on ``gpus`` devices of ``gpu_mem_gib`` GiB each; PlanError if impossible.

    source         preset name | NemotronConfig | pathlib.Path of a config.json or of a checkpoint directory
    recipe         quantization recipe for a preset/config (default "bf16"); None for a checkpoint
    max_len        KV-cache capacity in tokens (default: the config's max_position_embeddings)
    prefill_chunk  tokens of one prefill forward, capped at max_len
    cache_dtype    "float32" | "bfloat16";  weights  "stored" | "float32" (units.py)
    draft_depth    MTP drafts per speculative round (0: none), sizes the recorded Mamba states
    dtype          the compute dtype, "float32" or "float64" (oracle mode): activations and states
    """
    _positive_int("gpus", "--gpus", gpus)
    if isinstance(gpu_mem_gib, bool) or not isinstance(gpu_mem_gib, (int, float)) or not (
            math.isfinite(gpu_mem_gib) and gpu_mem_gib > 0):
        raise InputError(f"plan_placement: gpu_mem_gib (--gpu-mem-gib) must be a finite number > 0, got "
                         f"{gpu_mem_gib!r}")
    if weights not in WEIGHT_MODES:
        raise InputError(f"plan_placement: weights (--weights) must be one of {WEIGHT_MODES}, got {weights!r}")
    if cache_dtype not in CACHE_DTYPES:
        raise InputError(f"plan_placement: cache_dtype (--cache-dtype) must be one of {tuple(CACHE_DTYPES)}, got "
                         f"{cache_dtype!r}")
    _positive_int("batch", "--batch", batch)
    _positive_int("prefill_chunk", "--prefill-chunk", prefill_chunk)
    if isinstance(draft_depth, bool) or not isinstance(draft_depth, int) or draft_depth < 0:
        raise InputError(f"plan_placement: draft_depth (--draft-depth) must be an integer >= 0, got {draft_depth!r}")
    if isinstance(margin_bytes, bool) or not isinstance(margin_bytes, int) or margin_bytes < 0:
        raise InputError(f"plan_placement: margin_bytes must be an integer >= 0, got {margin_bytes!r}")
    cfg, label, table, recipe = _source(source, recipe, weights, input_scales, with_mtp)
    max_len = cfg.max_position_embeddings if max_len is None else _positive_int("max_len", "--max-len", max_len)
    if dtype not in COMPUTE_DTYPES:
        raise InputError(f"plan_placement: dtype must be one of {tuple(COMPUTE_DTYPES)}, got {dtype!r}")
    run = RunShape(max_len, batch, min(prefill_chunk, max_len), cache_dtype, draft_depth, dtype)
    units = tuple(Unit(name, kind, table[name][0], table[name][1], *unit_reserves(cfg, kind, run))
                  for name, kind in unit_names(cfg, with_mtp) if name in table)
    budget = int(gpu_mem_gib * GIB)
    resident, peak = [u.resident_bytes for u in units], [u.activation_bytes for u in units]
    ranges = min_max_partition(resident, peak, gpus, margin_bytes)
    stages = tuple(Stage(k, units[i:j], budget, margin_bytes if j > i else 0) for k, (i, j) in enumerate(ranges))
    if not all(s.fits for s in stages):
        raise PlanError(_misfit(units, resident, peak, stages, gpus, budget, margin_bytes))
    return Placement(label, recipe, weights, run, gpus, budget, margin_bytes, units, stages,
                     _equal_count(units, gpus, budget, margin_bytes))


def _equal_count(units, gpus, budget, margin) -> tuple:
    layers = [u for u in units if u.name.startswith("layer ")]
    first, last = [u for u in units if u.name == "embedding"], [u for u in units if u.name in ("head", "mtp")]
    out = []
    for k in range(gpus):
        start, end = pp_indices(len(layers), k, gpus)
        held = tuple((first if k == 0 else []) + layers[start:end] + (last if k == gpus - 1 else []))
        out.append(Stage(k, held, budget, margin if held else 0))
    return tuple(out)


def _size(nbytes) -> str:
    """Bytes in the binary unit that keeps them readable: '43.83 GiB', '12.50 MiB'."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _misfit(units, resident, peak, stages, gpus, budget, margin) -> str:
    """The one-line reason: the unit where a fill at the budget stops, its bytes, the budget, what helps."""
    filled, at = _greedy(resident, peak, budget, margin)
    if filled is None:
        where = f"more than a whole {_size(budget)} device on its own"
    else:   # every unit fits alone, but the devices run out: the first unit of stage number `gpus`
        at = filled[gpus][0]
        where = (f"the {gpus} devices of {_size(budget)} are full with the units before it (at this size the "
                 f"model needs {len(filled)} devices)")
    unit = units[at]
    need = unit.resident_bytes + unit.activation_bytes + margin
    parts = (f"weights {_size(unit.weight_bytes)} + KV/state {_size(unit.kv_bytes + unit.state_bytes)} + "
             f"activations {_size(unit.activation_bytes)} + margin {_size(margin)}")
    optimum = max(s.total_bytes for s in stages)
    return (f"plan: {unit.name} ({unit.kind}) needs {_size(need)} ({parts}) and does not fit: {where}; the best "
            f"{gpus}-device split needs {_size(optimum)} per device. Use more GPUs, more memory per GPU, a smaller "
            "--max-len or --prefill-chunk (or --cache-dtype bfloat16)")


# ---------------------------------------------------------------------------------------------- the table

def _span(units) -> str:
    """'emb L0-L12 (6M 6E 1*)': the units of a stage, consecutive layers as one range, block counts after."""
    if not units:
        return "-"
    words, layers = [], []
    for u in units:
        if u.name.startswith("layer "):
            layers.append(u)
            continue
        if layers:
            words.append(layers[0].short if len(layers) == 1 else f"{layers[0].short}-{layers[-1].short}")
            layers = []
        words.append(u.short)
    if layers:
        words.append(layers[0].short if len(layers) == 1 else f"{layers[0].short}-{layers[-1].short}")
    kinds = [u.kind for u in units if u.name.startswith("layer ")]
    counts = " ".join(f"{kinds.count(k)}{PATTERN_CHAR[k]}" for k in ("mamba", "moe", "attention", "mlp")
                      if kinds.count(k))
    return " ".join(words) + (f" ({counts})" if counts else "")


def _table_unit(largest) -> tuple:
    """GiB, or MiB when the largest stage's weights are under a GiB (so a small model's cells are not 0.00)."""
    return ("GiB", GIB) if largest >= GIB else ("MiB", 2**20)


def _rows(stages, scale) -> list:
    width = max(26, *(len(_span(s.units)) for s in stages))
    widths = (8, 7, 8, 7, 6, 8, 8)
    names = ("weights", "KV", "SSM/conv", "activ.", "margin", "total", "free")
    lines = [f"  {'dev':>3}  {'units':<{width}} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for s in stages:
        cells = [s.weight_bytes, s.kv_bytes, s.state_bytes, s.activation_bytes, s.margin_bytes, s.total_bytes,
                 s.free_bytes]
        lines.append(f"  {s.device:>3}  {_span(s.units):<{width}} " +
                     " ".join(f"{c / scale:>{w}.2f}" for c, w in zip(cells, widths)) +
                     ("" if s.fits else "  does NOT fit"))
    return lines


def format_placement(p: Placement) -> str:
    """The per-device table of the byte-balanced plan, then the equal-count split for comparison."""
    run = p.run
    biggest = max(p.stages, key=lambda s: s.weight_bytes)
    unit, scale = _table_unit(biggest.weight_bytes)
    worst = max(p.equal_count, key=lambda s: s.total_bytes)
    lines = [f"pipeline placement of {p.model} ({p.recipe + ' recipe' if p.recipe else 'formats from the headers'},"
             f" weights {p.weights}): {p.gpus} x {_size(p.budget_bytes)}; KV for {run.max_len:,} tokens x batch "
             f"{run.batch} in {run.cache_dtype}; prefill chunk {run.prefill_chunk:,} tokens; draft depth "
             f"{run.draft_depth}; margin {_size(p.margin_bytes)} a device",
             f"byte-balanced (min-max) stages, {unit}: weights {decimal_bytes(p.weight_bytes)} in all; the largest "
             f"stage holds {decimal_bytes(biggest.weight_bytes)} = {_size(biggest.weight_bytes)} (device "
             f"{biggest.device})",
             *_rows(p.stages, scale), "",
             f"equal layer counts (vLLM get_pp_indices; embedding first, head and MTP last), {unit}: "
             f"{'fits' if p.equal_count_fits else 'does NOT fit'}; its largest stage (device {worst.device}) holds "
             f"{decimal_bytes(worst.weight_bytes)} of weights, {_size(worst.total_bytes)} in all",
             *_rows(p.equal_count, scale)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- one host

@dataclass(frozen=True)
class HostPlan:
    """Host memory of a CPU run: the weights (``mapped`` in the stored mode: file pages the OS keeps cached while
    memory allows and reads again from disk otherwise) and what must stay allocated (KV, states, activations)."""

    model: str
    weights: str
    run: RunShape
    weight_bytes: int
    kv_bytes: int
    state_bytes: int
    activation_bytes: int
    peak_unit: str
    available_bytes: int | None

    @property
    def mapped(self) -> bool:
        return self.weights == "stored"

    @property
    def allocated_bytes(self) -> int:
        """What must be allocated (anonymous memory): the weights too in the float32 mode."""
        return self.kv_bytes + self.state_bytes + self.activation_bytes + (0 if self.mapped else self.weight_bytes)

    @property
    def total_bytes(self) -> int:
        """The resident peak when every weight page is resident (what a run measures on a machine with room)."""
        return self.weight_bytes + self.kv_bytes + self.state_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.allocated_bytes <= self.available_bytes

    def to_dict(self) -> dict:
        return {"model": self.model, "weights": self.weights, "max_len": self.run.max_len, "batch": self.run.batch,
                "prefill_chunk": self.run.prefill_chunk, "weight_bytes": self.weight_bytes,
                "kv_bytes": self.kv_bytes, "state_bytes": self.state_bytes, "activation_bytes": self.activation_bytes,
                "allocated_bytes": self.allocated_bytes, "total_bytes": self.total_bytes,
                "available_bytes": self.available_bytes, "fits": self.fits}


def plan_host(source, recipe=None, *, weights="stored", dtype="float32", max_len=None, batch=1,
              prefill_chunk=DEFAULT_PREFILL_CHUNK, draft_depth=0, input_scales=True, with_mtp=True) -> HostPlan:
    """Host memory for a CPU run of ``source`` (the numpy backend), with the device accounting of memory.py: the
    weights in their mode, KV and states for ``max_len`` x ``batch``, the largest unit's temporaries for one
    ``prefill_chunk``. PlanError (one line: needed, available, what helps) when what must be allocated cannot
    be: in the stored mode that excludes the weights, which are mapped from their files."""
    from ..memory import available_bytes

    roomy = plan_placement(source, recipe, 1, 2.0**40, max_len=max_len, batch=batch, prefill_chunk=prefill_chunk,
                           cache_dtype=dtype, weights=weights, draft_depth=draft_depth, margin_bytes=0,
                           input_scales=input_scales, with_mtp=with_mtp, dtype=dtype)
    peak = max(roomy.units, key=lambda u: u.activation_bytes)
    host = HostPlan(roomy.model, weights, roomy.run, sum(u.weight_bytes for u in roomy.units),
                    sum(u.kv_bytes for u in roomy.units), sum(u.state_bytes for u in roomy.units),
                    peak.activation_bytes, peak.name, available_bytes())
    if not host.fits:
        what = "KV, states and activations" if host.mapped else "the float32 weights, KV, states and activations"
        helps = ("use a smaller --max-len, --batch or --prefill-chunk" if host.mapped else
                 "use --weights stored (mapped from the files), or a smaller --max-len or --prefill-chunk")
        raise PlanError(f"plan: a CPU run of {host.model} must allocate {_size(host.allocated_bytes)} ({what}) but "
                        f"{_size(host.available_bytes)} is available; {helps}")
    return host


def format_host_plan(p: HostPlan) -> str:
    run, available = p.run, p.available_bytes
    if p.mapped:
        cached = available is None or p.total_bytes <= available
        weight_note = ("stored mode, memory-mapped: " + ("all stay in the page cache" if cached else
                       "more than the memory available: pages are read again from disk as layers run (slower)"))
    else:
        weight_note = "float32 mode: allocated at load"
    rows = [("weights", p.weight_bytes, weight_note),
            ("KV cache", p.kv_bytes, f"{run.max_len:,} tokens x batch {run.batch}, {run.cache_dtype}"),
            ("conv/SSM states", p.state_bytes, f"{run.dtype}, draft depth {run.draft_depth}"),
            ("activations", p.activation_bytes, f"prefill chunk {run.prefill_chunk:,} tokens; largest: {p.peak_unit}"),
            ("resident peak", p.total_bytes, "every weight page resident"),
            ("allocated", p.allocated_bytes, f"available {_size(available) if available is not None else 'unknown'}"
                                             f": {'fits' if p.fits else 'does NOT fit'}")]
    return "\n".join([f"host memory of a CPU run of {p.model}:"] +
                     [f"  {label:<16} {_size(nbytes):>12}  {note}" for label, nbytes, note in rows])
