"""``nemo-scratch`` (= ``python -m nemo_scratch``): thin subcommands over the Python API.

Each command parses its arguments, calls one API function and prints. Failures the package reports on
purpose (nemo_scratch.errors) print one line, ``error: ...``, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, NemoScratchError
from .presets import PRESETS

MAX_DRAFT_DEPTH = 64


class Interrupted(BaseException):
    """SIGTERM turned into an exception, so that writers roll back as they do on Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _ids(text):
    try:
        ids = [int(tok) for tok in text.replace(" ", "").split(",") if tok != ""]
    except ValueError:
        raise InputError(f"--ids must be comma-separated integers like 1,2,3, got {text[:100]!r}") from None
    big = next((i for i in ids if not -2**63 <= i < 2**63), None)
    if big is not None:
        raise InputError(f"--ids: token id {str(big)[:40]} is outside the vocabulary")
    return ids


def _checkpoint(args) -> Path:
    from . import DEFAULT_CHECKPOINT

    return Path(DEFAULT_CHECKPOINT if args.checkpoint is None else args.checkpoint)


def _load(args):
    """The model of --checkpoint: on one backend, or placed over --gpus N CUDA devices / --virtual-devices N
    NumPy ones (a pipeline of stages planned by bytes: nemo_scratch/parallel/)."""
    from . import load

    if getattr(args, "tp", None) is not None or getattr(args, "ep", None) is not None:   # docs/parallel.md
        from .parallel.launch import LaunchedModel

        if args.gpus is not None or args.virtual_devices is not None:
            raise InputError("--tp/--ep (one process per rank) and --gpus/--virtual-devices (a pipeline in one "
                             "process) exclude each other")
        return LaunchedModel(_checkpoint(args), tp=args.tp, ep=args.ep, backend=args.backend, dtype=args.dtype,
                             dt_floor=args.dt_floor)
    if args.gpus is None and args.virtual_devices is None:
        if args.device_mem_gib is not None or args.max_len is not None:
            raise InputError("--device-mem-gib and --max-len plan a placement: pass them with --gpus N or "
                             "--virtual-devices N")
        return load(_checkpoint(args), backend=args.backend, dtype=args.dtype, dt_floor=args.dt_floor,
                    weights=args.weights)
    return _load_placed(args)


def _load_placed(args):
    from .parallel import CupyDevices, VirtualDevices, plan_placement
    from .parallel.plan import CONTEXT_MARGIN_BYTES
    from .parallel.loader import load_placed

    if args.gpus is not None and args.virtual_devices is not None:
        raise InputError("--gpus and --virtual-devices exclude each other: CUDA devices, or NumPy rehearsal ones")
    n = args.gpus if args.gpus is not None else args.virtual_devices
    if n < 1:
        raise InputError(f"--{'gpus' if args.gpus is not None else 'virtual-devices'} {n}: expected >= 1")
    gpu = args.gpus is not None
    if gpu and args.backend == "numpy":
        raise InputError("--gpus runs the cupy or numba backend: pass --backend cupy (or numba)")
    if not gpu and args.backend != "numpy":
        raise InputError("--virtual-devices runs the NumPy reference: drop --backend (or use --gpus N)")
    weights = args.weights if args.weights != "auto" else ("float32" if gpu else "stored")
    mem = args.device_mem_gib
    if mem is None:
        mem = 80.0 if gpu else 2**20   # virtual devices without a budget: the plan balances bytes only
    placement = plan_placement(_checkpoint(args), gpus=n, gpu_mem_gib=mem, max_len=args.max_len,
                               prefill_chunk=args.prefill_chunk or 8192, weights=weights, dtype=args.dtype,
                               cache_dtype=args.dtype, draft_depth=getattr(args, "draft_depth", None) or 0,
                               margin_bytes=0 if not gpu else CONTEXT_MARGIN_BYTES)
    devices = CupyDevices(n, numba=args.backend == "numba") if gpu else VirtualDevices(n, placement.budget_bytes)
    return load_placed(_checkpoint(args), placement, devices, backend=args.backend, dtype=args.dtype,
                       dt_floor=args.dt_floor, quiet=args.quiet)


def _prompt_ids(model, args):
    if args.ids is not None:
        return _ids(args.ids)
    if model.tokenizer is None:
        raise InputError(f"{model.path}: the checkpoint has no tokenizer.json and declares no byte-level "
                         "tokenizer; pass --ids instead of --prompt")
    ids = model.tokenizer.encode(args.prompt)
    if not ids:
        raise InputError("--prompt is empty after tokenization")
    return ids


def _sampling(args) -> dict:
    """The decoding options, every conflict refused: -> generate() keyword arguments.

    --temperature 0 is greedy (argmax); --temperature T > 0 samples; --greedy with T > 0, --top-p or --seed
    without sampling, --draft-depth without --mtp and --stream with --json are errors, never ignored."""
    from .guards import check_seed

    t = args.temperature
    if t is not None and (not math.isfinite(t) or t < 0):
        raise InputError(f"--temperature {t}: expected a finite number >= 0 (0 = greedy)")
    sample = t is not None and t > 0
    if args.greedy and sample:
        raise InputError(f"--greedy contradicts --temperature {t} (which samples); pass one of them "
                         "(--temperature 0 is greedy too)")
    if args.top_p is not None and not sample:
        raise InputError(f"--top-p {args.top_p} needs sampling: pass --temperature T > 0 with it")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise InputError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    if args.seed is not None and not sample:
        raise InputError(f"--seed {args.seed} has no effect on greedy decoding: pass --temperature T > 0 to "
                         "sample, or drop --seed")
    if args.draft_depth is not None and not args.mtp:
        raise InputError(f"--draft-depth {args.draft_depth} needs --mtp (speculative decoding)")
    depth = 2 if args.draft_depth is None else args.draft_depth
    if not 1 <= depth <= MAX_DRAFT_DEPTH:
        raise InputError(f"--draft-depth {depth}: expected an integer in [1, {MAX_DRAFT_DEPTH}]")
    if args.stream and args.json:
        raise InputError("--stream and --json cannot be combined: --json prints one object at the end")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    return {"greedy": not sample, "temperature": t if sample else 1.0,
            "top_p": 1.0 if args.top_p is None else args.top_p, "seed": check_seed(args.seed, "--seed"),
            "mtp": args.mtp, "draft_depth": depth, "stop_at_eos": args.stop_at_eos}


def _out_file(out, overwrite, sources, what):
    from .checkpoint.safe_write import check_destination

    return check_destination(out, overwrite, sources, what=what, kind="file")


# ------------------------------------------------------------------------------------------ commands
def cmd_forward(args):
    from .checkpoint.safe_write import atomic_file

    ids = _ids(args.ids)
    if args.out:
        _out_file(args.out, args.overwrite, [_checkpoint(args)], "forward: --out")
    elif args.overwrite:
        raise InputError("--overwrite needs --out")
    model = _load(args)
    logits = model.forward([ids], prefill_chunk=args.prefill_chunk)
    if args.out:
        with atomic_file(args.out, args.overwrite, [_checkpoint(args)], what="forward: --out") as f:
            np.save(f, logits)
        print(f"wrote {args.out}: logits {list(logits.shape)} {logits.dtype}")
    else:
        top = np.argmax(logits[0], axis=-1)
        print(f"logits {list(logits.shape)} {logits.dtype}; argmax per position: {top.tolist()}")


def cmd_generate(args):
    options = _sampling(args)
    if args.prompt is not None:
        from .model.tokenizer import check_text

        check_text(args.prompt, "--prompt")
    model = _load(args)
    ids = _prompt_ids(model, args)
    decode = model.tokenizer.decode if model.tokenizer is not None else (lambda t: ",".join(map(str, t)) + ",")
    on_token = (lambda new: print(decode(new), end="", flush=True)) if args.stream else None
    if args.stream:
        print(decode(ids), end="", flush=True)
    res = model.generate(ids, args.max_new_tokens, on_token=on_token, prefill_chunk=args.prefill_chunk, **options)
    new = res.ids[0].tolist()
    text = model.tokenizer.decode(new) if model.tokenizer is not None else None
    if args.json:
        out = {"ids": new, "text": text, "tokens_per_s": round(res.tokens_per_s, 3)}
        if args.mtp:
            out["mtp"] = res.stats
        print(json.dumps(out))
        return
    # the prompt, then the continuation: the same text with and without --stream
    print("" if args.stream else decode(ids) + decode(new))
    print(f"[{len(new)} tokens, {res.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    if args.mtp:
        s = res.stats
        print(f"[MTP: accepted {s['accepted']}/{s['proposed']} drafts ({100 * s['acceptance_rate']:.0f}%), "
              f"per depth {[round(a, 2) for a in s['acceptance_per_depth']]}, "
              f"{s['forward_passes_saved']} main-model forward passes saved]", file=sys.stderr)


def cmd_make_random(args):
    from .checkpoint import make_random_checkpoint
    from .config import preset
    from .config_parse import pattern_blocks
    from .guards import check_seed
    from .memory import gib

    check_seed(args.seed, "--seed")
    cfg = preset(args.preset)
    if args.pattern is not None and args.num_layers is not None:
        raise InputError("--pattern and --num-layers exclude each other: a layer pattern, or the preset's first N "
                         "layers")
    if args.pattern is not None:
        pattern_blocks(args.pattern, "--pattern", "make-random")
        cfg = preset(args.preset, hybrid_override_pattern=args.pattern)
    if args.num_layers is not None:
        if not 1 <= args.num_layers <= cfg.num_hidden_layers:
            raise InputError(f"--num-layers {args.num_layers}: expected an integer in [1, {cfg.num_hidden_layers}] "
                             f"(the '{args.preset}' preset has {cfg.num_hidden_layers} layers)")
        cfg = preset(args.preset, hybrid_override_pattern=cfg.hybrid_override_pattern[:args.num_layers])
    if args.no_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    out = make_random_checkpoint(args.out, cfg, seed=args.seed, overwrite=args.overwrite, recipe=args.recipe,
                                 quiet=args.quiet, **_shard_options(args))
    files = sorted(out.glob("*.safetensors"))
    print(f"wrote a random '{args.preset}' checkpoint to {args.out}: pattern {cfg.hybrid_override_pattern}, MTP "
          f"{'yes' if cfg.num_nextn_predict_layers else 'no'}, recipe {args.recipe}, {len(files)} shard(s), "
          f"{gib(sum(f.stat().st_size for f in files))}")


def _shard_options(args) -> dict:
    """--shards N or --shard-gib X (the default: shards of at most 2 GiB) -> shards= / shard_bytes=."""
    if args.shards is not None and args.shard_gib is not None:
        raise InputError("--shards and --shard-gib exclude each other: a number of shards, or a size per shard")
    if args.shard_gib is not None and not (math.isfinite(args.shard_gib) and args.shard_gib > 0):
        raise InputError(f"--shard-gib {args.shard_gib}: expected a finite number of GiB > 0")
    return {"shards": args.shards,
            "shard_bytes": None if args.shard_gib is None else max(1, round(args.shard_gib * 2**30))}


def cmd_quantize(args):
    from .checkpoint.convert import quantize_checkpoint

    summary = quantize_checkpoint(args.src, args.dst, args.recipe, overwrite=args.overwrite, quiet=args.quiet,
                                  **_shard_options(args))
    print(f"wrote {args.dst} (recipe {args.recipe}): " +
          ", ".join(f"{n} {fmt}" for fmt, n in sorted(summary.items())) + " tensors")


def cmd_inspect(args):
    from .checkpoint.convert import format_inspection, inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, tensors=args.tensors)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))


def cmd_plan(args):
    from .config import NemotronConfig
    from .parallel import format_placement, plan_placement
    from .params import format_plan, plan

    if not math.isfinite(args.gpu_mem_gib) or args.gpu_mem_gib <= 0:
        raise InputError(f"--gpu-mem-gib {args.gpu_mem_gib}: expected a finite number > 0")
    given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config),
                                      ("--checkpoint", args.checkpoint)) if value is not None]
    if len(given) != 1:
        raise InputError(f"plan: pass exactly one of --preset NAME, --config config.json, --checkpoint DIR (got "
                         f"{', '.join(given) or 'none'})")
    source, report = args.checkpoint, None
    if args.checkpoint is None:
        source = args.preset if args.preset is not None else (
            args.config / "config.json" if args.config.is_dir() else args.config)
        cfg = source if args.preset is not None else NemotronConfig.from_json(source)
        report = plan(cfg, args.recipe or "bf16", gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gib)
    if not 0 <= args.margin_gib < float("inf"):
        raise InputError(f"plan: --margin-gib must be a finite number >= 0, got {args.margin_gib}")
    if args.host:
        from .parallel.plan import format_host_plan, plan_host

        host = plan_host(source if args.checkpoint is None or args.recipe else args.checkpoint, args.recipe,
                         weights=args.weights, max_len=args.max_len, batch=args.batch,
                         prefill_chunk=args.prefill_chunk, draft_depth=args.draft_depth)
        if args.json:
            print(json.dumps({**(report or {}), "host": host.to_dict()}, indent=2))
        else:
            print((format_plan(report) + "\n\n" if report else "") + format_host_plan(host))
        return
    placement = plan_placement(source, args.recipe, args.gpus, args.gpu_mem_gib, max_len=args.max_len,
                               batch=args.batch, prefill_chunk=args.prefill_chunk, cache_dtype=args.cache_dtype,
                               weights=args.weights, draft_depth=args.draft_depth,
                               margin_bytes=round(args.margin_gib * 2**30))
    if args.json:
        print(json.dumps({**(report or {}), "placement": placement.to_dict()}, indent=2))
    else:
        print((format_plan(report) + "\n\n" if report else "") + format_placement(placement))


def cmd_golden(args):
    from .golden import check_golden, write_golden

    if args.check:
        given = [flag for flag, value in (("--op", args.op), ("--out", args.out), ("--shape", args.shape),
                                          ("--seed", args.seed), ("--case", args.case),
                                          ("--overwrite", args.overwrite))
                 if value not in (None, False, "")]
        if given:
            raise InputError(f"golden: --check recomputes an existing file; {', '.join(given)} cannot go with it")
        report = check_golden(args.check)
        for tag, errors in report.items():
            for name, e in errors.items():
                print(f"{tag}.{name}: max abs {e['max_abs']:.3e}, {100 * e['used']:.1f}% of the tolerance budget")
        print(f"{args.check}: reproduces with this version of the reference")
        return
    if not args.op or not args.out:
        raise InputError("golden: pass --op NAME and --out FILE (or --check FILE)")
    path = write_golden(args.op, args.shape, args.out, seed=0 if args.seed is None else args.seed,
                        overwrite=args.overwrite, case=args.case or "random")
    print(f"wrote {path}")


def cmd_demo(args):
    from .demo import run_demo
    from .model.tokenizer import check_text

    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
    if args.max_new_tokens < 1 or not 1 <= args.draft_depth <= MAX_DRAFT_DEPTH:
        raise InputError(f"demo: --max-new-tokens must be >= 1 and --draft-depth in [1, {MAX_DRAFT_DEPTH}], got "
                         f"{args.max_new_tokens} and {args.draft_depth}")
    run_demo(prompt=args.prompt, max_new_tokens=args.max_new_tokens, draft_depth=args.draft_depth)


# ------------------------------------------------------------------------------------------ parser
class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default is not argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are nemo_scratch errors: one line ``error: ...``, exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


def _model_args(p):
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint directory (default: the bundled tiny trained model)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "numba", "cupy"],
                   help="numpy: the reference; numba, cupy: the GPU kernels (the gpu extras and a CUDA device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="compute dtype; float64 is the oracle mode (NumPy backend)")
    p.add_argument("--dt-floor", default="config",
                   help="'config' (default), 'transformers' (floor at time_step_min as transformers 5.x) "
                        "or a number")
    p.add_argument("--weights", default="auto", choices=["auto", "stored", "float32"],
                   help="'stored': matrices stay as stored (BF16, FP8, NVFP4), memory-mapped, decoded tile by tile; "
                        "'float32': BF16 upcast at load; 'auto': float32 when it fits comfortably (default)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="run the prompt N tokens at a time (bounded memory for long prompts; default: all at once)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="place the model over N CUDA devices, a pipeline of stages planned by bytes")
    p.add_argument("--virtual-devices", type=int, default=None, metavar="N",
                   help="place the model over N NumPy devices with byte budgets (a CPU rehearsal of --gpus)")
    p.add_argument("--device-mem-gib", type=float, default=None, metavar="X",
                   help="memory per device for the placement (default: 80 with --gpus; unbounded virtual devices)")
    p.add_argument("--max-len", type=int, default=None, metavar="N",
                   help="context the placement reserves KV cache for (default: the config's max_position_embeddings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _overwrite(p, what):
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} (refused otherwise)")


def _parallel_args(p):
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks: one spawned worker each (NCCL on GPU backends, one GPU per rank)")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel ranks for the routed experts (equal to --tp, or alone: the rest replicated)")


def _shard_args(p):
    p.add_argument("--shards", type=int, default=None, metavar="N", help="write N shards of about equal bytes")
    p.add_argument("--shard-gib", type=float, default=None, metavar="X",
                   help="write shards of at most X GiB (default 2; one shard is model.safetensors)")


def build_parser():
    from .checkpoint.modelopt import RECIPES
    from .golden import OPS

    parser = _Parser(prog="nemo-scratch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("forward", help="logits for a list of token ids")
    _model_args(p)
    p.add_argument("--ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--out", type=Path, help="write the logits [1, t, v] to this .npy file (default: print the "
                                             "argmax per position)")
    _overwrite(p, "--out file")
    _parallel_args(p)
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("generate", help="generate tokens (greedy, sampling, or MTP speculative decoding)")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated prompt token ids")
    src.add_argument("--prompt", help="prompt text (tokenizer.json or the byte-level tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate after the prompt")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless --temperature > 0)")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the MTP head")
    p.add_argument("--draft-depth", type=int, default=None, help="MTP draft tokens per round (default 2)")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at the config's eos_token_id")
    p.add_argument("--stream", action="store_true",
                   help="print tokens as they are generated (the prompt first, as without --stream)")
    p.add_argument("--json", action="store_true", help='print {"ids", "text", "tokens_per_s"[, "mtp"]}')
    _parallel_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("make-random", help="write a random checkpoint in NVIDIA's layout, tensor by tensor")
    p.add_argument("--preset", default="tiny", metavar="{" + ",".join(PRESETS) + "}",
                   help="the model's widths and layers: tiny and small are test sizes (tiny is not the bundled "
                        "trained model), nano, super and ultra the published configs")
    p.add_argument("out", type=Path, help="the directory to write")
    p.add_argument("--pattern", default=None, metavar="PATTERN",
                   help="a width slice: these layers (M mamba, E moe, * attention, - mlp, e.g. 'ME*') at the "
                        "preset's widths")
    p.add_argument("--num-layers", type=int, default=None, metavar="N",
                   help="a width slice: the preset's first N layers")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layers")
    p.add_argument("--recipe", default="bf16", choices=list(RECIPES),
                   help="store it quantized by this recipe, as make-random then quantize would")
    _shard_args(p)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _overwrite(p, "directory (as a whole: every file in it goes)")
    p.set_defaults(func=cmd_make_random)

    p = sub.add_parser("quantize", help="write a ModelOpt NVFP4/FP8 checkpoint from a BF16 one, tensor by tensor")
    p.add_argument("src", type=Path, help="a BF16 checkpoint directory")
    p.add_argument("dst", type=Path, help="the directory to write")
    p.add_argument("--recipe", default="ultra", choices=[r for r in RECIPES if r != "bf16"],
                   help="which tensors become NVFP4 / FP8: ultra and super (routed experts NVFP4, Mamba in/out "
                        "and shared experts FP8), nano (every Linear NVFP4 but attention and lm_head), fp8")
    _shard_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _overwrite(p, "destination directory (as a whole: every file in it goes)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="tensors by block type and format, bytes, bits per parameter (headers only)")
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory")
    p.add_argument("--tensors", action="store_true",
                   help="also list every stored tensor: NVIDIA name, stored name, shape, dtype, format, bytes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="parameters, bytes and a per-GPU pipeline placement, without weights")
    p.add_argument("--preset", metavar="{" + ",".join(PRESETS) + "}",
                   help="a preset: tiny and small are test sizes (tiny is not the bundled trained model: "
                        "--checkpoint nemo_scratch/data/nemotron3-tiny plans that), nano, super, ultra")
    p.add_argument("--config", type=Path, help="a config.json (or the directory holding it)")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint directory: bytes from its safetensors headers")
    p.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="quantization recipe of --preset/--config (default bf16)")
    p.add_argument("--gpus", type=int, default=8, help="devices to place the model over")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per device, GiB")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV-cache capacity in tokens (default: the config's max_position_embeddings)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (sizes KV cache and states)")
    p.add_argument("--prefill-chunk", type=int, default=8192, help="tokens of one prefill forward")
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16"], help="KV cache dtype")
    p.add_argument("--weights", default="stored", choices=["stored", "float32"],
                   help="stored formats, or BF16 upcast to float32 (what load(weights='float32') and the GPU "
                        "backends hold)")
    p.add_argument("--draft-depth", type=int, default=0, help="MTP drafts per round (sizes the Mamba state history)")
    p.add_argument("--host", action="store_true",
                   help="predict the host memory of a CPU run (numpy backend) instead of a GPU placement: weights, "
                        "KV cache for --max-len x --batch, states, activations for --prefill-chunk")
    p.add_argument("--margin-gib", type=float, default=2.0,
                   help="reserve per device for the CUDA context, kernels and pool fragmentation, GiB")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("golden", help="export an op's inputs and reference outputs (float64 and float32)")
    p.add_argument("--op", metavar="OP", help=f"the op (with --out): {', '.join(sorted(OPS))}")
    p.add_argument("--shape", default="", help="dimension sizes, e.g. b=1,t=16,h=4,p=8,g=2,n=8 (default: the "
                                                "op's own small sizes)")
    p.add_argument("--out", type=Path, help="the .safetensors file to write")
    p.add_argument("--check", type=Path, help="recompute an existing golden file and compare")
    p.add_argument("--seed", type=int, default=None, help="input seed (default 0)")
    p.add_argument("--case", default=None,
                   help="the inputs: random (default) or one of the op's tie and boundary cases, e.g. route: "
                        "ties, zeros, saturated; ssd_scan_chunked: dt_floor, strong_decay, zeros, huge; "
                        "nvfp4_*: all_codes, boundary_scales (docs/oracle.md lists them all)")
    _overwrite(p, "--out file")
    p.set_defaults(func=cmd_golden)

    p = sub.add_parser("demo", help="the bundled trained model: generate with and without MTP")
    p.add_argument("--prompt", default=None, help="prompt text (default: demo.py's DEFAULT_PROMPT)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate in each mode")
    p.add_argument("--draft-depth", type=int, default=2, help="MTP draft tokens per round")
    p.set_defaults(func=cmd_demo)
    return parser


def _on_sigterm(signum, frame):
    raise Interrupted(signum)


def main(argv=None):
    """Run one command: 0 on success, 2 with one line ``error: ...`` on any failure we can name, 130/143 when
    interrupted by Ctrl-C / SIGTERM (a write in progress is rolled back first)."""
    for stream in (sys.stdout, sys.stderr):   # a path or text with non-UTF-8 bytes must not crash a print
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:   # not the main thread
        previous = None
    try:
        args = build_parser().parse_args(argv)
        # NaN/inf are reported by the finiteness checks (guards.py), so NumPy's warnings would only add lines
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            args.func(args)
    except NemoScratchError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return _fail("interrupted by Ctrl-C (any write in progress was rolled back)", 130)
    except Interrupted:
        return _fail("interrupted by SIGTERM (any write in progress was rolled back)", 143)
    except BrokenPipeError:   # e.g. `| head`: stop quietly, and keep Python from complaining at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as exc:   # a file the package did not name itself (it names the ones it reads)
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except MemoryError:
        return _fail("out of memory (the estimate in nemo_scratch/memory.py missed this call); "
                     "try a smaller input or --dtype float32")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {' '.join(str(message).splitlines())}", file=sys.stderr)


def _fail(exc, status=2):
    message = " ".join(str(exc).split("\n"))
    print(f"error: {message}", file=sys.stderr)
    return status
