"""Real-width checkpoints on one machine: load time, memory and speed of Nano-width slices, "stored" vs "float32"
weights, against transformers on the same 3-layer slice, same run, same threads.

    python bench/memory_scale.py [--dir /tmp/nano-slices] [--layers 3,12] [--threads 2] [--prefill 512]
                                 [--decode 32] [--repeats 3] [--prefill-chunk N] [--no-transformers]

Slices: Nemotron 3 Nano's widths (d 2688, 128 experts top-6 of 1856, shared expert 3712, 64 Mamba heads x 64,
state 128, 32 q / 2 kv heads, vocabulary 131072), random BF16 weights, no MTP head. 3 layers: pattern "ME*"
(one block of each type, 4.1 GB); 12 layers: the first 12 of Nano's pattern, "MEMEM*EMEMEM" (15 GB). Each is
written by ``make_random_checkpoint``, tensor by tensor, and kept in --dir for the next run.

Every configuration runs in a fresh interpreter (``--probe``), so peaks do not mix, and reports for each phase
(load; a --prefill-token prefill with a cache, last logits only; --decode greedy steps), and times the same
prefill once more on a fresh cache ("again": the checkpoint's pages mapped and the kernels loaded by the first):
- seconds (decode: tokens/s over the steps; transformers: the same greedy steps on its cache);
- the peak total resident memory (VmHWM, reset at each phase start through /proc/self/clear_refs; mapped
  checkpoint pages count), and the peak anonymous memory (RssAnon sampled every 5 ms; the kernel keeps no
  peak of it), both minus the interpreter's own after its imports.
The speed configurations run --repeats times, interleaved (stored, float32, transformers, stored, ...), and
the medians are printed with the ratios; then, once each, "stored" and "float32" with the CPU kernels off
(NEMO_SCRATCH_CPU_KERNELS=0: NumPy tiles only, what the models ran before ops/quant_fast.py). Before each run
the slice's files are read once (not timed), so the page cache holds them: the figures are compute, not disk
(the 12-layer slice, 15 GB on a 24 GB machine, may still be partly evicted during its run). Memory bandwidth
is measured in the same run (cpu_gemv.bandwidth: a NumPy sum over 1 GiB and a 1 GiB copy).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from cpu_gemv import bandwidth, set_threads   # bench/, beside this script

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/nano-slices")
    ap.add_argument("--layers", default="3,12")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the runs with the CPU kernels off")
    ap.add_argument("--json", default=None, help="also write every probe's result here")
    ap.add_argument("--probe", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.probe:
        return probe(args.probe[0], Path(args.probe[1]), args)
    import numpy as np

    print(f"threads {args.threads} (OpenBLAS, Numba, torch), {os.cpu_count()} cores, "
          f"{meminfo('MemTotal') / 2**30:.1f} GiB RAM ({meminfo('MemAvailable') / 2**30:.1f} GiB available now)")
    print("memory bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth(np).items()), flush=True)
    results = {}
    for layers in [int(n) for n in args.layers.split(",")]:
        path = ensure_slice(Path(args.dir), layers)
        size = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
        kinds = ["stored", "float32"] + ([] if args.no_transformers or layers != 3 else ["transformers"])
        runs = {k: [] for k in kinds}
        for r in range(args.repeats if layers == 3 else 1):
            for kind in kinds:
                runs[kind].append(run_probe(kind, path, args))
        if layers == 3 and not args.no_baseline:     # what the kernels changed: once each, NumPy tiles only
            for kind in ("stored", "float32"):
                runs[kind + " (tiles)"] = [run_probe(kind, path, args, env={"NEMO_SCRATCH_CPU_KERNELS": "0"})]
        results[layers] = {"checkpoint_bytes": size, "runs": runs}
        report(layers, path, size, runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- slices

def pattern(layers):
    """3 layers: one block of each type, "ME*"; any other count: the first ``layers`` of Nano's own pattern."""
    from nemo_scratch.presets import NANO_PATTERN   # (imported late: the thread counts are set before numpy loads)

    return "ME*" if layers == 3 else NANO_PATTERN[:layers]


def slice_config(layers):
    from nemo_scratch.config import preset

    return preset("nano", hybrid_override_pattern=pattern(layers), num_nextn_predict_layers=0)


def ensure_slice(root, layers):
    """The slice's directory under root, written unless a complete one (its config.json matching) is there.
    make_random_checkpoint writes it tensor by tensor, so even the 15 GB slice never sits in memory."""
    from nemo_scratch.checkpoint import make_random_checkpoint

    cfg, path = slice_config(layers), root / f"nano-{layers}L"
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()) == cfg.to_dict():
        return path
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_random_checkpoint(path, cfg, seed=0, overwrite=True, quiet=True)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# ---------------------------------------------------------------------------------------------- measuring

def warm_page_cache(path):
    """Read the checkpoint's files once, 64 MiB at a time into one buffer (nothing stays in this process): the
    probes then measure compute, not the disk (a transformers run before can evict the files)."""
    buffer = bytearray(64 * 2**20)
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as stream:
            while stream.readinto(buffer):
                pass


def run_probe(kind, path, args, env=None):
    warm_page_cache(path)
    cmd = [sys.executable, __file__, "--probe", kind, str(path), "--threads", str(args.threads),
           "--prefill", str(args.prefill), "--decode", str(args.decode)]
    if args.prefill_chunk:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  {path.name} {kind}: did not run: {tail}", flush=True)
        return {"error": tail}
    return json.loads(lines[-1])


def status():
    from nemo_scratch.memory import proc_bytes

    return proc_bytes("/proc/self/status", STATUS_KEYS)


def meminfo(key):
    from nemo_scratch.memory import proc_bytes

    return proc_bytes("/proc/meminfo", (key,))[key]


class Phase:
    """A phase's seconds and memory peaks: VmHWM reset at the start, RssAnon sampled every 5 ms."""

    def __init__(self, base):
        self.base, self.peak_anon, self.running = base, 0, True

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")      # resets VmHWM to the current RSS
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while self.running:
            self.peak_anon = max(self.peak_anon, status()["RssAnon"])
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.running = False
        self.thread.join()
        now = status()
        self.peak_anon = max(self.peak_anon, now["RssAnon"])
        self.result = {"seconds": self.seconds, "peak_rss": now["VmHWM"] - self.base["VmRSS"],
                       "peak_anon": self.peak_anon - self.base["RssAnon"], "end_rss": now["VmRSS"] - self.base["VmRSS"]}


def probe(kind, path, args):
    """One configuration in this fresh interpreter; prints one JSON line."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {"kind": kind}
    if kind == "transformers":
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        base = status()
        with Phase(base) as load:
            model = transformers.NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, size=(1, args.prefill)))
        with torch.no_grad():
            with Phase(base) as prefill:
                step = model(ids, use_cache=True, logits_to_keep=1)
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)             # again: warm, a fresh cache
            again_s = time.perf_counter() - t0
            with Phase(base) as generate:
                # greedy steps on the cache (the tokens model.generate picks, without its per-call setup)
                for _ in range(args.decode):
                    step = model(step.logits[:, -1].argmax(-1, keepdim=True), past_key_values=step.past_key_values,
                                 use_cache=True, logits_to_keep=1)
        decode_s = generate.seconds
        out.update(versions=f"torch {torch.__version__}, transformers {transformers.__version__}")
    else:
        import nemo_scratch
        import nemo_scratch.checkpoint  # noqa: F401  (imported before the baseline, like the model modules)
        import nemo_scratch.model.model  # noqa: F401
        from nemo_scratch.errors import NemoScratchError
        from nemo_scratch.ops import quant_fast

        # numba and the kernel's compiled code load before the baseline, as torch's kernels do at its import
        # (library code, about 0.3 s and 110 MB once): the phases measure the model, not the first call's setup
        quant_fast.dense_matmul_fast(np.ones((1, 8), np.float32), np.ones((2, 8), np.float32))
        base = status()
        try:
            with Phase(base) as load:
                model = nemo_scratch.load(path, weights=kind)
        except NemoScratchError as exc:            # "float32" refused up front where it cannot fit
            print(json.dumps({"kind": kind, "refused": str(exc)}))
            return 0
        ids = rng.integers(0, model.cfg.vocab_size, size=(1, args.prefill))
        cache = model.new_cache(1, kv_capacity=args.prefill + args.decode)
        with Phase(base) as prefill:
            logits = model.forward(ids, cache, last_only=True, prefill_chunk=args.prefill_chunk)
        t0 = time.perf_counter()                 # again: the weights' pages mapped, a fresh cache
        model.forward(ids, model.new_cache(1, kv_capacity=args.prefill), last_only=True,
                      prefill_chunk=args.prefill_chunk)
        again_s = time.perf_counter() - t0
        with Phase(base) as generate:
            for _ in range(args.decode):
                logits = model.forward([[int(np.argmax(logits[0, -1]))]], cache)
        decode_s = generate.seconds
        out.update(kernel=quant_fast.kernel_module() is not None, weights=model.info["weights"],
                   versions=f"numpy {np.__version__}")
    out.update(base_rss=base["VmRSS"], load=load.result, prefill=prefill.result, decode=generate.result,
               prefill_tok_s=args.prefill / prefill.seconds, again_tok_s=args.prefill / again_s,
               decode_tok_s=args.decode / decode_s)
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------- the table

def float32_bytes(path):
    """What the "float32" weight mode allocates (the loader's own count, the one its memory check uses)."""
    from nemo_scratch.checkpoint.reader import float32_bytes, open_checkpoint

    return float32_bytes(open_checkpoint(path))


def tensors(path):
    """[(name, elements, stored bytes)] of every tensor in the checkpoint's files (headers only)."""
    from nemo_scratch.checkpoint.safetensors_io import SafetensorsFile

    out = []
    for f in sorted(path.glob("*.safetensors")):
        st = SafetensorsFile(f)
        out += [(k, math.prod(st.shape_of(k)), st.nbytes_of(k)) for k in st.keys()]
    return out


def decode_bytes(path, float32):
    """Weight bytes one batch-1 decode step reads: every matrix but the embedding (one row of it), the routed
    experts at top_k / n_experts of theirs."""
    cfg = json.loads((path / "config.json").read_text())
    share = cfg["num_experts_per_tok"] / cfg["n_routed_experts"]
    total = 0
    for name, elements, nbytes in tensors(path):
        if name != "backbone.embeddings.weight":
            total += (4 * elements if float32 else nbytes) * (share if ".experts." in name else 1)
    return total


def ratios(a, b):
    return ", ".join(f"{what} {a[key] / b[key]:.2f}x" for what, key in (
        ("prefill", "prefill_tok_s"), ("prefill again", "again_tok_s"), ("decode", "decode_tok_s")))


def report(layers, path, size, runs, args):
    gb = 1e9
    print(f"\n{layers} layers ({pattern(layers)}): checkpoint {size / gb:.2f} GB; prefill {args.prefill} tokens"
          f" (prefill_chunk {args.prefill_chunk}), {args.decode} decode steps; medians of {len(runs['stored'])}")
    print(f"{'':18s}{'load s':>8s}{'load RSS':>10s}{'load anon':>10s}{'prefill s':>10s}{'tok/s':>8s}"
          f"{'peak RSS':>10s}{'peak anon':>10s}{'again tok/s':>12s}{'decode tok/s':>13s}{'peak RSS':>10s}"
          f"{'peak anon':>10s}")
    med = {}
    for kind, rs in runs.items():
        ok = [r for r in rs if "load" in r]
        if not ok:
            print(f"{kind:18s}" + (rs[0].get("refused") or rs[0].get("error", "did not run")))
            continue
        m = {key: statistics.median(r[key] for r in ok) for key in ("prefill_tok_s", "again_tok_s", "decode_tok_s")}
        first = ok[0]
        med[kind] = m
        print(f"{kind:18s}{statistics.median(r['load']['seconds'] for r in ok):8.2f}"
              f"{first['load']['peak_rss'] / gb:10.2f}{first['load']['peak_anon'] / gb:10.2f}"
              f"{statistics.median(r['prefill']['seconds'] for r in ok):10.2f}{m['prefill_tok_s']:8.1f}"
              f"{first['prefill']['peak_rss'] / gb:10.2f}{first['prefill']['peak_anon'] / gb:10.2f}"
              f"{m['again_tok_s']:12.1f}{m['decode_tok_s']:13.2f}{first['decode']['peak_rss'] / gb:10.2f}"
              f"{first['decode']['peak_anon'] / gb:10.2f}")
    for kind in ("stored", "float32"):
        if kind in med:
            nbytes = decode_bytes(path, kind == "float32")
            print(f"{kind}: a decode step reads {nbytes / gb:.2f} GB of weights: "
                  f"{nbytes * med[kind]['decode_tok_s'] / gb:.1f} GB/s at {med[kind]['decode_tok_s']:.2f} tok/s")
    if "stored" in med:
        stored = runs["stored"][0]
        print(f"stored: peak RSS in the prefill / checkpoint bytes = {stored['prefill']['peak_rss'] / size:.2f}")
    if "float32" in med:
        f32 = runs["float32"][0]
        print(f"float32: peak RSS in the load / float32 weight bytes ({float32_bytes(path) / gb:.2f} GB) = "
              f"{f32['load']['peak_rss'] / float32_bytes(path):.2f}; in the prefill "
              f"{f32['prefill']['peak_rss'] / float32_bytes(path):.2f}")
        for other in ("float32", "transformers"):
            if other in med:
                print(f"stored / {other}: {ratios(med['stored'], med[other])}")
    if "float32" in med and "transformers" in med:
        print(f"float32 / transformers: {ratios(med['float32'], med['transformers'])}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
