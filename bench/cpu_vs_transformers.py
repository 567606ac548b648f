"""NumPy reference vs transformers (torch, CPU) on the same random checkpoint, same threads.

    python bench/cpu_vs_transformers.py [--threads N] [--prefill 512] [--decode 64] [--repeats 3]

Model: the ``small`` preset (tens of millions of parameters: every block type, LatentMoE), built and
randomly initialised by transformers, saved with save_pretrained, loaded by nemo_scratch from the same files.
Measured, interleaved (ours, theirs, ours, theirs, ...) to share machine noise:
- prefill: one forward over ``--prefill`` tokens with a cache, logits of the last position only;
- decode: ``--decode`` greedy tokens from that cache (generate minus its prefill).
Prints medians and the ratio transformers / nemo_scratch (> 1 means the NumPy reference is faster).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    # BLAS threads must be fixed before numpy/torch load their BLAS.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np
    import torch
    import transformers

    import nemo_scratch
    from nemo_scratch.config import PRESETS, preset

    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    hf_cfg = transformers.NemotronHConfig(**{**PRESETS[args.preset], "num_nextn_predict_layers": 0})
    torch.manual_seed(0)
    hf = transformers.NemotronHForCausalLM(hf_cfg).float().eval()
    tmp = tempfile.mkdtemp(prefix="bench_cpu_")
    hf.save_pretrained(tmp)
    ours = nemo_scratch.load(tmp, dt_floor="transformers")
    n_params = sum(p.numel() for p in hf.parameters())
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, args.prefill))
    ids_t = torch.from_numpy(ids)

    def ours_prefill():
        ours.forward(ids, ours.new_cache(1), last_only=True)

    def theirs_prefill():
        with torch.no_grad():
            hf(ids_t, use_cache=True, logits_to_keep=1)

    def ours_generate():
        ours.generate(ids, args.decode)

    def theirs_generate():
        with torch.no_grad():
            hf.generate(ids_t, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    ours_prefill(), theirs_prefill()  # warm-up (allocations, torch kernels)
    res = {k: [] for k in ("ours_prefill", "theirs_prefill", "ours_gen", "theirs_gen")}
    for _ in range(args.repeats):
        res["ours_prefill"].append(timed(ours_prefill))
        res["theirs_prefill"].append(timed(theirs_prefill))
        res["ours_gen"].append(timed(ours_generate))
        res["theirs_gen"].append(timed(theirs_generate))
    med = {k: statistics.median(v) for k, v in res.items()}
    ours_dec, theirs_dec = med["ours_gen"] - med["ours_prefill"], med["theirs_gen"] - med["theirs_prefill"]
    print(f"model: preset {args.preset!r}, {n_params / 1e6:.1f}M parameters, pattern {cfg.hybrid_override_pattern}")
    print(f"threads {args.threads}, numpy {np.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, repeats {args.repeats} (interleaved), medians:")
    print(f"{'':28s}{'nemo_scratch':>14s}{'transformers':>14s}{'ratio':>8s}")
    print(f"{'prefill ' + str(args.prefill) + ' tokens (s)':28s}{med['ours_prefill']:14.3f}"
          f"{med['theirs_prefill']:14.3f}{med['theirs_prefill'] / med['ours_prefill']:8.2f}")
    print(f"{'decode ' + str(args.decode) + ' tokens (s)':28s}{ours_dec:14.3f}{theirs_dec:14.3f}"
          f"{theirs_dec / ours_dec:8.2f}")
    print(f"{'decode tokens/s':28s}{args.decode / ours_dec:14.1f}{args.decode / theirs_dec:14.1f}")
    print("ratio = transformers time / nemo_scratch time (>= 1.0: the NumPy reference is at least as fast)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
