"""A width slice of a real-size model through the pipeline: write, stream-load, run, compare, project.

    python bench/pipeline_slice.py                                  # on a GPU: Ultra widths, 'ME*', ultra recipe
    python bench/pipeline_slice.py --backend numpy --preset small   # the CPU rehearsal on virtual devices

1. Writes a random checkpoint of ``--pattern`` at the preset's widths in the recipe's formats. The packed
   NVFP4/FP8 codes are drawn directly as codes (uniform codes, block scales in [1, 1.875], a global scale
   that gives each weight its init's standard deviation), and large BF16 weights as bfloat16 bit patterns
   of about that size: an Ultra MoE layer is 6.3 GB, and quantizing drawn floats (make-random --recipe)
   would take minutes. The small tensors whose values matter (norms, A_log, D, dt_bias, conv, router bias)
   keep the init of checkpoint/writer.py. Written with checkpoint/stream.py: headers first, a slice of rows at a time.
2. Plans ``--stages`` byte-balanced stages (parallel/plan.py) with budgets 2% above what the best split
   needs, so no fewer stages fit, and loads through the streaming loader (parallel/loader.py). On the CPU
   each stage is a VirtualDevice with its own budget. On the GPU every stage stands on device 0: one CuPy
   pool limit, the sum of the stage budgets, stands in for the per-stage limits, and each stage's bytes are
   measured from the arrays the loader placed for its units.
3. Prefill of ``--prompt-len`` tokens and ``--decode-steps`` cached decode steps, each unit timed (device
   synchronised around it); the logits are compared with the NumPy reference (nemo_scratch.load, weights as
   stored) under the tolerance table ("kernel_model" on a GPU backend; bit for bit on the CPU).
4. Projects the decode rate of the whole preset (e.g. Ultra's 108 layers) under pipeline placement at batch 1:
   the stages run one after another for a token, so a token costs the sum of the measured per-layer decode
   times, scaled to the preset's layer counts, plus embedding and head. The peer is the bandwidth bound:
   the weights a token reads (parallel/tensor_cost.py::modelled_decode, one device) at the device's peak HBM
   bandwidth; the ratio is printed.

Exit status: 0 when the logits agree and every stage fits its budget, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nemo_scratch import load  # noqa: E402
from nemo_scratch.checkpoint.modelopt import quant_config_for, recipe_formats  # noqa: E402
from nemo_scratch.checkpoint.safetensors_io import encode  # noqa: E402
from nemo_scratch.checkpoint.stream import Entry, layout_of, row_slices, write_streamed  # noqa: E402
from nemo_scratch.checkpoint.writer import NORM_ROLES, init_std, random_rows  # noqa: E402
from nemo_scratch.model.weights import map_tree  # noqa: E402
from nemo_scratch.ops.formats import arrays_of  # noqa: E402
from nemo_scratch.parallel.loader import load_placed  # noqa: E402
from nemo_scratch.parallel.pipeline import unit_params  # noqa: E402
from nemo_scratch.parallel.plan import plan_placement  # noqa: E402
from nemo_scratch.parallel.shard import Layout  # noqa: E402
from nemo_scratch.parallel.tensor_cost import modelled_decode  # noqa: E402
from nemo_scratch.presets import preset  # noqa: E402
from nemo_scratch.tolerances import tolerance  # noqa: E402

GB = 1e9
GIB = 2**30
# the tensors that keep writer.py's init (small, and their values matter); every projection is drawn as codes
INIT_ROLES = (*NORM_ROLES, "A_log", "D", "dt_bias", "conv", "conv_bias", "gate_bias")
E2M1_RMS = math.sqrt(sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8)   # of a uniform E2M1 code
E4M3_ONE = 0x38            # the E4M3 code of 1.0; + 0..7 (mantissa) spans [1, 1.875]


# ------------------------------------------------------------------------------------ 1. the checkpoint

def random_bytes(rng, shape):
    return np.frombuffer(rng.bytes(math.prod(shape)), dtype=np.uint8).reshape(shape)


def drawn_entry(cfg, spec, fmt, rng):
    """The stream.Entry of one large weight drawn as codes in its stored format."""
    std, layout = init_std(cfg, spec), layout_of(spec.name, spec.shape, fmt)
    scale_codes = lambda shape: (E4M3_ONE + (random_bytes(rng, shape) & 7)).astype(np.uint8)  # noqa: E731

    def pieces():
        if fmt == "nvfp4":
            (codes, _, shape), (blocks, _, block_shape), (scale2, _, _) = layout
            for r0, r1 in row_slices(shape):
                yield codes, random_bytes(rng, (r1 - r0, *shape[1:]))
            for r0, r1 in row_slices(block_shape):
                yield blocks, scale_codes((r1 - r0, *block_shape[1:]))
            yield scale2, np.float32(std / (E2M1_RMS * 1.44)).reshape(())
        elif fmt == "fp8":
            (codes, _, shape), (scale, _, _) = layout
            for r0, r1 in row_slices(shape):   # sign bit random; magnitudes in [0.5, 1.875]
                raw = random_bytes(rng, (r1 - r0, *shape[1:]))
                yield codes, ((raw & 0x80) | (0x30 + (raw & 0x0F))).astype(np.uint8)
            yield scale, np.float32(std / 1.2).reshape(())
        else:   # bfloat16 bits: random sign and mantissa, exponent of std or half of it: |w| in [std/2, 2 std)
            (name, dtype, shape), = layout
            exponent = math.floor(math.log2(std)) + 127
            for r0, r1 in row_slices(shape):
                raw = np.frombuffer(rng.bytes(2 * (r1 - r0) * math.prod(shape[1:])), dtype=np.uint16)
                bits = (raw & 0x807F) | ((exponent - ((raw >> 7) & 1)) << 7).astype(np.uint16)
                yield name, bits.reshape(r1 - r0, *shape[1:]).astype("<u2")

    return Entry(spec.name, layout, pieces)


def init_entry(cfg, spec, fmt, rng):
    """A small tensor with writer.py's init, encoded in its stored dtype (no recipe quantizes these)."""
    layout = layout_of(spec.name, spec.shape, fmt)
    (name, dtype, _), = layout
    return Entry(spec.name, layout, lambda: [(name, encode(random_rows(cfg, spec, rng, spec.shape[0]), dtype))])


def write_slice(out, cfg, recipe, seed=0):
    """The random checkpoint of ``cfg`` in ``recipe``'s formats at ``out``; returns (bytes, seconds)."""
    rng = np.random.default_rng(seed)
    entries = [init_entry(cfg, spec, fmt, rng) if spec.role in INIT_ROLES else drawn_entry(cfg, spec, fmt, rng)
               for spec, fmt in recipe_formats(cfg, recipe)]
    start = time.perf_counter()
    write_streamed(out, cfg, entries, quant_config=quant_config_for(cfg, recipe), overwrite=True)
    return sum(e.nbytes for e in entries), time.perf_counter() - start


# ------------------------------------------------------------------------------------ 2. plan and load

def tight_plan(path, stages, options):
    """A ``stages``-device plan whose budget is 2% above what the best split needs."""
    roomy = plan_placement(path, gpus=stages, gpu_mem_gib=2**20, **options)
    budget = 1.02 * max(s.total_bytes for s in roomy.stages) / GIB
    return plan_placement(path, gpus=stages, gpu_mem_gib=budget, **options)


def place(path, plan, backend):
    """(model, devices, seconds): the streaming load; on a GPU every stage on device 0 under one limit."""
    if backend == "numpy":
        from nemo_scratch.parallel.devices import VirtualDevices

        devices, placement = VirtualDevices(plan.gpus, plan.budget_bytes), plan
    else:
        from nemo_scratch.parallel.cupy_devices import CupyDevices

        devices = CupyDevices(1, limit_bytes=sum(s.budget_bytes for s in plan.stages if s.units),
                              numba=backend == "numba")
        placement = dataclasses.replace(plan, gpus=1,
                                        stages=tuple(dataclasses.replace(s, device=0) for s in plan.stages))
    start = time.perf_counter()
    model = load_placed(path, placement, devices, backend=backend, quiet=True)
    sync(devices)
    return model, devices, time.perf_counter() - start


def sync(devices):
    cp = getattr(devices, "cp", None)
    if cp is not None:
        cp.cuda.Device(0).synchronize()


def placed_bytes(model, unit):
    leaves = []
    map_tree(unit_params(model.params, unit), lambda a: leaves.extend(arrays_of(a)))
    return sum(int(a.nbytes) for a in leaves)


# ------------------------------------------------------------------------------------ 3. run and time

class TimedPlace:
    """The model's place (pipeline.py's PipelinePlace), with the time spent inside each unit accumulated."""

    def __init__(self, place, devices):
        self.inner, self.devices, self.seconds = place, devices, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def use(self, unit):
        sync(self.devices)
        start = time.perf_counter()
        with self.inner.use(unit) as context:
            try:
                yield context
            finally:
                sync(self.devices)
                self.seconds[unit] = self.seconds.get(unit, 0.0) + time.perf_counter() - start


def run(model, ids, steps):
    """(prefill logits, decode logits [steps], prefill seconds per unit, decode seconds per unit per step)."""
    timed = model.place = TimedPlace(model.place, model.devices)
    cache = model.new_cache()
    prefill = model.forward(ids, cache)
    prefill_s, timed.seconds = timed.seconds, {}
    tokens = np.random.default_rng(3).integers(0, model.cfg.vocab_size, size=steps)
    decode = [model.forward([[t]], cache) for t in tokens]
    decode_s = {unit: s / steps for unit, s in timed.seconds.items()}
    model.place = timed.inner
    return prefill, decode, tokens, prefill_s, decode_s


def reference(path, ids, tokens):
    ref = load(path, weights="stored")
    cache = ref.new_cache()
    return ref.forward(ids, cache), [ref.forward([[t]], cache) for t in tokens]


def agreement(got, want, backend):
    """(ok, worst |got - want| / (atol + rtol |want|)): bit for bit on the NumPy backend."""
    if backend == "numpy":
        return bool(np.array_equal(got, want)), 0.0 if np.array_equal(got, want) else float("inf")
    rtol, atol = tolerance("kernel_model", np.float32)[:2]
    share = float(np.max(np.abs(got - want) / (atol + rtol * np.abs(want))))
    return share <= 1.0, share


# ------------------------------------------------------------------------------------ 4. project

def peak_bandwidth(devices):
    """(device name, peak HBM bytes/s) on a GPU, from bench/kernels_mamba.py's device facts; None on the CPU."""
    if getattr(devices, "cp", None) is None:
        return None
    from kernels_mamba import device_facts

    name, peak, *_ = device_facts(devices.cp)
    return name, peak


def project(slice_cfg, full_cfg, decode_s):
    """Seconds per token of ``full_cfg`` at batch 1 under pipeline placement: each block type's mean measured
    decode time times its count in the full model, plus embedding and head."""
    per_type = {}
    for i, bt in enumerate(slice_cfg.layers_block_type):
        per_type.setdefault(bt, []).append(decode_s[f"layer {i}"])
    missing = sorted(set(full_cfg.layers_block_type) - set(per_type))
    if missing:
        raise SystemExit(f"pipeline_slice: --pattern has no {', '.join(missing)} layer to time; the full model "
                         f"has them (use a pattern with every block type of '{full_cfg.hybrid_override_pattern}')")
    layers = sum(float(np.mean(per_type[bt])) for bt in full_cfg.layers_block_type)
    return layers + decode_s.get("embedding", 0.0) + decode_s.get("head", 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="ultra", help="the widths and the full model to project")
    p.add_argument("--pattern", default="ME*", help="the slice's layers (M mamba, E moe, * attention, - mlp)")
    p.add_argument("--recipe", default="ultra", choices=["bf16", "fp8", "nano", "super", "ultra"])
    p.add_argument("--backend", default="cupy", choices=["numpy", "cupy", "numba"])
    p.add_argument("--stages", type=int, default=3, help="pipeline stages the slice is planned over")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    args = p.parse_args(argv)
    if args.stages < 1 or args.prompt_len < 1 or args.decode_steps < 1:
        p.error("--stages, --prompt-len and --decode-steps must be >= 1")

    full = preset(args.preset)
    cfg = preset(args.preset, hybrid_override_pattern=args.pattern, num_nextn_predict_layers=0,
                 max_position_embeddings=max(full.max_position_embeddings, args.prompt_len + args.decode_steps))
    gpu = args.backend != "numpy"
    if gpu:   # before anything is written: a GPU run needs CuPy and a device
        from nemo_scratch.errors import BackendError
        from nemo_scratch.parallel.cupy_devices import CupyDevices

        try:
            CupyDevices(1)
        except BackendError as exc:
            print(f"pipeline_slice: {exc} (--backend numpy runs the CPU rehearsal)", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "slice"
        nbytes, write_s = write_slice(path, cfg, args.recipe, args.seed)
        print(f"slice: '{args.preset}' widths, pattern {args.pattern}, recipe {args.recipe}: "
              f"{nbytes / GB:.2f} GB written in {write_s:.1f} s")
        options = dict(weights="float32" if gpu else "stored", max_len=args.prompt_len + args.decode_steps,
                       prefill_chunk=args.prompt_len, margin_bytes=0)
        plan = tight_plan(path, args.stages, options)
        model, devices, load_s = place(path, plan, args.backend)
        print(f"load: {plan.weight_bytes / GB:.2f} GB placed in {load_s:.2f} s = {plan.weight_bytes / GB / load_s:.2f} "
              f"GB/s through the streaming loader ({args.backend}, host staging peak "
              f"{model.info['loader']['host_peak_bytes'] / 2**20:.0f} MiB)")

        print("\n| stage | units | planned weights GB | measured GB | planned total GB | budget GB |")
        print("|---|---|---:|---:|---:|---:|")
        fits = True
        for s in plan.stages:
            if not s.units:
                continue
            measured = sum(placed_bytes(model, u.name) for u in s.units)
            fits &= measured == s.weight_bytes and s.fits
            print(f"| {s.device} | {s.units[0].short}-{s.units[-1].short} | {s.weight_bytes / GB:.3f} | "
                  f"{measured / GB:.3f} | {s.total_bytes / GB:.3f} | {s.budget_bytes / GB:.3f} |")
        peak = max(devices.peak(k) for k in range(devices.n))
        limit = sum(s.budget_bytes for s in plan.stages if s.units) if gpu else plan.budget_bytes
        fits &= peak <= limit
        print(f"device peak {peak / GB:.3f} GB of a {limit / GB:.3f} GB limit")

        ids = np.random.default_rng(args.seed + 1).integers(0, cfg.vocab_size, size=(1, args.prompt_len))
        prefill, decode, tokens, prefill_s, decode_s = run(model, ids, args.decode_steps)
        want_prefill, want_decode = reference(path, ids, tokens)
        ok_p, share_p = agreement(prefill, want_prefill, args.backend)
        ok_d, share_d = agreement(np.concatenate(decode, axis=1), np.concatenate(want_decode, axis=1), args.backend)
        rule = "bit for bit" if not gpu else "kernel_model tolerance"
        print(f"\nlogits vs the NumPy reference ({rule}): prefill {'ok' if ok_p else 'FAIL'} (worst {share_p:.3g} of "
              f"the budget), {args.decode_steps} decode steps {'ok' if ok_d else 'FAIL'} (worst {share_d:.3g})")

        print(f"\n| unit | kind | prefill {args.prompt_len} tokens, ms | decode, ms a token |\n|---|---|---:|---:|")
        for u in plan.units:
            print(f"| {u.name} | {u.kind} | {1e3 * prefill_s.get(u.name, 0):.3f} | "
                  f"{1e3 * decode_s.get(u.name, 0):.3f} |")

        token_s = project(cfg, full, decode_s)
        read = modelled_decode(full, args.recipe, Layout.of(tp=1))["single_device"]
        print(f"\nprojected {args.preset} ({full.num_hidden_layers} layers) decode at batch 1 under pipeline "
              f"placement: {1e3 * token_s:.2f} ms a token = {1 / token_s:.2f} tok/s (stage hops not included)")
        bw = peak_bandwidth(devices) if gpu else None
        if bw is not None:
            name, peak_bw = bw
            bound = peak_bw / read
            print(f"bound: {read / GB:.2f} GB read a token at {name}'s peak {peak_bw / 1e12:.2f} TB/s = {bound:.1f} "
                  f"tok/s; projected / bound = {(1 / token_s) / bound:.3f}")
        else:
            print(f"bound: {read / GB:.2f} GB read a token (no GPU here: no peak bandwidth to divide by)")
    return 0 if ok_p and ok_d and fits else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
