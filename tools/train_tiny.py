"""Train the bundled tiny Nemotron 3 on CPU and ship it as nemo_scratch/data/nemotron3-tiny.

Every Nemotron 3 ingredient at toy size: Mamba-2, GQA attention, LatentMoE (shared expert + 32 small routed
experts, top-4, latent width < d_model, sigmoid router with an aux-loss-free balancing bias), one MTP layer
("*E"), and a byte-level vocabulary (vocab_size 256, token id = byte value). The corpus is tools/corpus.py.

The backbone is transformers' NemotronHForCausalLM (pure-torch path). transformers has no MTP, so the head is
written here, with transformers' own mixer modules so its math is the backbone's (spec section 6; vLLM
nemotron_h_mtp.py / Megatron MultiTokenPredictionLayer):

    h0  = norm_f(backbone(ids))                                      # [b,t,d]
    e   = Emb[ids shifted left by 1]                                 # position t sees token t+1
    a   = eh_proj(concat[enorm(e), hnorm(h0)])                       # embedding FIRST
    a   = a + Attn(norm(a));  a = a + MoE(norm(a));  h1 = final_layernorm(a)
    logits_mtp = lm_head(h1)                                         # predicts token t+2
    loss = CE(main) + mtp_weight * CE(mtp)

    python tools/train_tiny.py --steps 600 --minutes 20 --out nemo_scratch/data/nemotron3-tiny
    python tools/train_tiny.py --verify nemo_scratch/data/nemotron3-tiny       # load back with transformers

Deviation: transformers 5.23's Mamba mixer floors dt at time_step_min (time_step_limit = (time_step_min,
inf)), so that is the function trained; the shipped config.json says so in "time_step_limit".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from corpus import build_corpus, describe

from nemo_scratch.checkpoint.schema import expected_tensors
from nemo_scratch.config import NemotronConfig
from nemo_scratch.errors import CheckpointError, ConfigError

# The shipped model. Pattern M E M * E M E: 3 Mamba-2, 3 LatentMoE, 1 attention; MTP "*E".
TINY_TRAINED = dict(
    hybrid_override_pattern="MEM*EME", vocab_size=256, hidden_size=192,
    num_attention_heads=6, num_key_value_heads=2, head_dim=32,
    mamba_num_heads=8, mamba_head_dim=32, n_groups=2, ssm_state_size=32, conv_kernel=4, chunk_size=64,
    n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=64, moe_latent_size=64,
    moe_shared_expert_intermediate_size=256, routed_scaling_factor=2.5, intermediate_size=256,
    num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", max_position_embeddings=4096,
    nemo_scratch_tokenizer="bytes",
)
HF_BLOCK = {"mamba": "linear_attention", "attention": "full_attention", "moe": "moe", "mlp": "mlp"}


def nemotron_config(**overrides) -> NemotronConfig:
    """Our NemotronConfig for the recipe; the dt floor is recorded as the config's time_step_limit."""
    raw = {**TINY_TRAINED, **overrides}
    raw["time_step_limit"] = [raw.get("time_step_min", 0.001), "inf"]
    return NemotronConfig.from_dict(raw, source="train_tiny recipe")


def hf_config(cfg: NemotronConfig):
    """The transformers NemotronHConfig with exactly the geometry of ``cfg``."""
    from transformers import NemotronHConfig

    keys = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size",
            "use_conv_bias", "time_step_min", "time_step_max", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size", "n_group",
            "topk_group", "norm_topk_prob", "routed_scaling_factor", "intermediate_size",
            "num_nextn_predict_layers", "layer_norm_epsilon", "tie_word_embeddings", "max_position_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id")
    return NemotronHConfig(**{k: getattr(cfg, k) for k in keys},
                           layers_block_type=[HF_BLOCK[b] for b in cfg.layers_block_type],
                           mtp_layers_block_type=[HF_BLOCK[b] for b in cfg.mtp_layers_block_type],
                           time_step_limit=tuple(cfg.time_step_limit), use_cache=False)


# ---------------------------------------------------------------------------------------------- the MTP head

class MTPStart(nn.Module):
    """mtp.layers.0: enorm, hnorm, eh_proj (start projections), then a pre-normed attention block."""

    def __init__(self, hf_cfg, layer_idx):
        super().__init__()
        from transformers.models.nemotron_h.modeling_nemotron_h import (
            NemotronHAttention,
            NemotronHRMSNorm,
        )

        d, eps = hf_cfg.hidden_size, hf_cfg.layer_norm_epsilon
        self.enorm, self.hnorm, self.norm = (NemotronHRMSNorm(d, eps) for _ in range(3))
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.mixer = NemotronHAttention(hf_cfg, layer_idx=layer_idx)

    def forward(self, e, h, mask):  # [b,t,d], [b,t,d], [1,1,t,t] -> [b,t,d]
        # a = eh_proj(concat[enorm(e), hnorm(h)])   (embedding first: vLLM / Megatron _concat_embeddings)
        a = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))
        # a = a + Attn(norm(a))   (causal, no RoPE)
        return a + self.mixer(self.norm(a), attention_mask=mask)[0]


class MTPEnd(nn.Module):
    """mtp.layers.1: a pre-normed MoE block, then final_layernorm (has_end_norm)."""

    def __init__(self, hf_cfg):
        super().__init__()
        from transformers.models.nemotron_h.modeling_nemotron_h import (
            NemotronHMoE,
            NemotronHRMSNorm,
        )

        d, eps = hf_cfg.hidden_size, hf_cfg.layer_norm_epsilon
        self.norm, self.final_layernorm = NemotronHRMSNorm(d, eps), NemotronHRMSNorm(d, eps)
        self.mixer = NemotronHMoE(hf_cfg)

    def forward(self, a):  # [b,t,d] -> [b,t,d]
        # a = a + MoE(norm(a));  h1 = final_layernorm(a)
        return self.final_layernorm(a + self.mixer(self.norm(a)))


class MTPHead(nn.Module):
    """One MTP depth for mtp_layers_block_type ["attention", "moe"]; names match the checkpoint's mtp.*."""

    def __init__(self, hf_cfg):
        super().__init__()
        self.layers = nn.ModuleList([MTPStart(hf_cfg, layer_idx=hf_cfg.num_hidden_layers), MTPEnd(hf_cfg)])

    def forward(self, e, h0):  # [b,t,d] embeddings of the next tokens, [b,t,d] backbone output -> [b,t,d]
        t = e.shape[1]
        mask = torch.full((t, t), float("-inf"), dtype=e.dtype).triu(1)[None, None]  # [1,1,t,t] additive causal
        return self.layers[1](self.layers[0](e, h0, mask))


def build_models(cfg: NemotronConfig, seed: int):
    """The backbone + MTP head, initialised by transformers' own _init_weights (seeded)."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    hf_cfg = hf_config(cfg)
    model = NemotronHForCausalLM(hf_cfg)
    mtp = MTPHead(model.config)
    for module in mtp.modules():
        model._init_weights(module)
    return model, mtp


def forward_losses(model, mtp, window):  # [b, t+2] int64 -> (main CE, MTP CE, MTP logits [b,t,v])
    """Both cross-entropies (nats/byte) on one batch of windows of t+2 bytes."""
    ids, next_ids = window[:, :-2], window[:, 1:-1]                 # [b,t]: inputs, and inputs shifted by 1
    h0 = model.model(input_ids=ids).last_hidden_state               # [b,t,d], after norm_f
    logits = model.lm_head(h0).float()                              # [b,t,v] predicts token t+1
    h1 = mtp(model.model.embeddings(next_ids), h0)                  # [b,t,d]
    logits_mtp = model.lm_head(h1).float()                          # [b,t,v] predicts token t+2
    v = logits.shape[-1]
    main = F.cross_entropy(logits.reshape(-1, v), window[:, 1:-1].reshape(-1))
    extra = F.cross_entropy(logits_mtp.reshape(-1, v), window[:, 2:].reshape(-1))
    return main, extra, logits_mtp


# ---------------------------------------------------------------------------------------------- training

def sample_windows(data, n, length, rng):  # uint8 [N] -> int64 [n, length]
    starts = rng.integers(0, len(data) - length, size=n)
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64))


def track_router_loads(modules):
    """Forward hooks counting, per router, how many (token, slot) picks each expert got since the last reset."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    routers = [m for root in modules for m in root.modules() if isinstance(m, NemotronHTopkRouter)]
    loads = {id(r): torch.zeros(r.num_experts) for r in routers}

    def hook(router, _inputs, outputs):
        idx = outputs[2]                                                   # [tokens, k]
        loads[id(router)] += torch.bincount(idx.reshape(-1), minlength=router.num_experts).float()

    for r in routers:
        r.register_forward_hook(hook)
    return routers, loads


@torch.no_grad()
def balance_router_bias(routers, loads, rate):
    """Aux-loss-free balancing (DeepSeek-V3): bias_e += rate * sign(mean load - load_e); then reset counts."""
    for r in routers:
        load = loads[id(r)]
        r.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()


def lr_at(step, steps, peak, warmup):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, mtp, data, batches, batch, seq, seed):
    """Mean main / MTP cross-entropy and MTP top-1 accuracy on fixed held-out windows."""
    rng = np.random.default_rng(seed)
    main = extra = acc = 0.0
    for _ in range(batches):
        window = sample_windows(data, batch, seq + 2, rng)
        m, x, logits_mtp = forward_losses(model, mtp, window)
        main, extra = main + m.item(), extra + x.item()
        acc += (logits_mtp.argmax(-1) == window[:, 2:]).float().mean().item()
    return main / batches, extra / batches, acc / batches


def fit_steps(steps, step, elapsed, since, minutes):
    """Steps that fit the time budget, from the pace since ``since`` = (an earlier step, its seconds); called
    once, at the end of warm-up.

    The learning-rate schedule does not depend on the total step count during warm-up, so a run whose count is
    fitted at that point equals a run started with that count: rerun with ``--steps N --no-fit`` to reproduce.
    """
    pace = max(1e-6, (elapsed - since[1]) / max(1, step - since[0]))    # seconds per step, start-up excluded
    return min(steps, step + int(0.95 * (60 * minutes - elapsed) / pace))


def train(cfg, data, args, log=print):
    """Train; -> (model, mtp, history, planned steps). history rows: (step, seconds, lr, main CE, MTP CE)."""
    torch.set_num_threads(args.threads)
    model, mtp = build_models(cfg, args.seed)
    model.train(), mtp.train()
    params = [p for p in list(model.parameters()) + list(mtp.parameters()) if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    routers, loads = track_router_loads([model, mtp])
    rng = np.random.default_rng(args.seed)
    history, start, steps, step = [], time.perf_counter(), args.steps, 0
    while step < steps:
        lr = lr_at(step, steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        window = sample_windows(data, args.batch, args.seq + 2, rng)
        main, extra, _ = forward_losses(model, mtp, window)
        loss = main + args.mtp_weight * extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        balance_router_bias(routers, loads, args.bias_rate)
        step, elapsed = step + 1, time.perf_counter() - start
        history.append((step, elapsed, lr, main.item(), extra.item()))
        if step % args.log_every == 0 or step == 1:
            log(f"step {step:5d}  {elapsed:7.1f}s  lr {lr:.2e}  main {main.item():.4f}  mtp {extra.item():.4f}")
        if step == args.warmup and args.fit:
            k = min(10, step // 2)                                        # pace measured from step k
            steps = fit_steps(steps, step, elapsed, history[k - 1][:2] if k else (0, 0.0), args.minutes)
            log(f"step count fitted to --minutes {args.minutes}: {steps} (reproduce: --steps {steps} --no-fit)")
        if elapsed > 60 * args.minutes:
            log(f"stopping at step {step}: --minutes {args.minutes} reached")
            break
    model.eval(), mtp.eval()
    return model, mtp, history, steps


# ---------------------------------------------------------------------------------------------- names

def split_experts(state):
    """transformers' stacked experts.{up,down}_proj [e,...] -> NVIDIA's experts.{i}.{up,down}_proj.weight."""
    out = {}
    for name, value in state.items():
        head, sep, kind = name.rpartition(".experts.")
        if sep and kind in ("up_proj", "down_proj"):
            for i in range(value.shape[0]):
                out[f"{head}.experts.{i}.{kind}.weight"] = value[i]
        else:
            out[name] = value
    return out


def to_nvidia(model, mtp) -> dict:
    """NVIDIA checkpoint names (spec section 7) -> float32 numpy arrays, backbone + lm_head + mtp."""
    state = {}
    for name, value in model.state_dict().items():
        state[name.replace("model.", "backbone.", 1) if name.startswith("model.") else name] = value
    for name, value in mtp.state_dict().items():
        state[f"mtp.{name}"] = value
    return {k: v.detach().float().numpy().copy() for k, v in split_experts(state).items()}


def from_nvidia(tensors, cfg):
    """Inverse of to_nvidia: (transformers state dict, MTP state dict) as float32 torch tensors."""
    backbone, head = {}, {}
    for name, value in tensors.items():
        value = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if name.startswith("mtp."):
            head[name[len("mtp."):]] = value
        else:
            backbone[name.replace("backbone.", "model.", 1)] = value

    def stack(state):
        for prefix in sorted({k.rpartition(".experts.")[0] for k in state if ".experts." in k}):
            for kind in ("up_proj", "down_proj"):
                names = [f"{prefix}.experts.{i}.{kind}.weight" for i in range(cfg.n_routed_experts)]
                state[f"{prefix}.experts.{kind}"] = torch.stack([state.pop(n) for n in names])
        return state

    return stack(backbone), stack(head)


def check_against_schema(tensors, cfg):
    """The tensor set is exactly expected_tensors(cfg): same names, same shapes."""
    want = {s.name: s.shape for s in expected_tensors(cfg)}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise CheckpointError(f"tensor names differ from expected_tensors(cfg): missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    bad = [(n, tensors[n].shape, want[n]) for n in want if tuple(tensors[n].shape) != want[n]]
    if bad:
        raise CheckpointError(f"tensor shapes differ from expected_tensors(cfg) (name, got, expected): {bad[:5]}")


# ---------------------------------------------------------------------------------------------- save, verify

def export(out_dir, cfg, tensors, overwrite=False):
    """config.json + model.safetensors (BF16; A_log, D, router bias F32) via our checkpoint writer (atomic:
    an existing --out is replaced as a whole, only once the new files are complete)."""
    from nemo_scratch.checkpoint.writer import write_checkpoint

    check_against_schema(tensors, cfg)
    write_checkpoint(out_dir, cfg, tensors, overwrite=overwrite)


def load_checkpoint(out_dir):
    """Read the shipped files back with safetensors + transformers (not our loader): (cfg, model, mtp)."""
    from safetensors.torch import load_file

    cfg = NemotronConfig.from_json(Path(out_dir) / "config.json")
    if cfg.extra.get("nemo_scratch_tokenizer") != "bytes":
        raise ConfigError(f"{out_dir}/config.json: expected \"nemo_scratch_tokenizer\": \"bytes\" (a byte-level model)")
    tensors = {k: v.float().numpy() for k, v in load_file(str(Path(out_dir) / "model.safetensors")).items()}
    check_against_schema(tensors, cfg)
    backbone, head = from_nvidia(tensors, cfg)
    model, mtp = build_models(cfg, seed=0)
    model.load_state_dict(backbone, strict=True)
    mtp.load_state_dict(head, strict=True)
    return cfg, model.eval(), mtp.eval()


@torch.no_grad()
def greedy_text(model, prompt: str, new_tokens: int) -> str:
    """transformers' own greedy generate() (cached decode), bytes in and out."""
    ids = torch.tensor([list(prompt.encode("ascii"))])
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=model.config.pad_token_id)
    return bytes(out[0].tolist()).decode("ascii", errors="replace")


def verify(out_dir, val, args, log=print) -> dict:
    """Load the BF16 checkpoint with transformers; held-out losses, MTP accuracy and greedy samples."""
    torch.set_num_threads(args.threads)
    _, model, mtp = load_checkpoint(out_dir)
    main, extra, acc = evaluate(model, mtp, val, args.eval_batches, args.batch, args.seq, seed=args.seed + 1)
    samples = {p: greedy_text(model, p, args.sample_tokens) for p in args.prompts}
    result = {"val_main": main, "val_mtp": extra, "val_mtp_acc": acc, "samples": samples}
    log(json.dumps(result, indent=1))
    return result


def save_run(directory, tensors, record):
    """The finished run, before export: float32 tensors (safetensors, no pickle) + record.json. The --state
    folder is this tool's own and is replaced, atomically (safe_write: an interrupted save keeps the old one)."""
    from safetensors.numpy import save_file

    from nemo_scratch.checkpoint.safe_write import atomic_directory

    with atomic_directory(directory, overwrite=True, what="train_tiny: --state") as tmp:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "record.json").write_text(json.dumps(record, indent=1))


def load_run(directory):
    from safetensors.numpy import load_file

    directory = Path(directory)
    return load_file(str(directory / "tensors.safetensors")), json.loads((directory / "record.json").read_text())


def parameter_count(tensors) -> int:
    return int(sum(v.size for v in tensors.values()))


def write_training_md(out_dir, cfg, record, check):
    """TRAINING.md: how the shipped weights were made (command, corpus, licence, seed, losses, samples)."""
    a, c, hist = record["args"], record["corpus"], record["history"]
    every = a["log_every"]
    rows = []
    for end in range(every, len(hist) + 1, every):
        chunk = hist[end - every:end]
        rows.append(f"| {end} | {chunk[-1][1]:.0f} | {np.mean([r[3] for r in chunk]):.3f} | "
                    f"{np.mean([r[4] for r in chunk]):.3f} |")
    ev = record["eval"]
    planned, fitted = record.get("planned_steps", len(hist)), ""
    if planned < a["steps"]:
        fitted = (f"The step count was cut from {a['steps']} to {planned} to fit `--minutes {a['minutes']}`\n"
                  f"(`fit_steps`, at the end of warm-up); the same weights come from\n\n"
                  f"    python tools/train_tiny.py --steps {planned} --no-fit\n\n")
    if len(hist) < planned:
        fitted += f"Training stopped at step {len(hist)} of {planned}: the --minutes budget ran out.\n\n"
    paces = [(hist[end - 1][1] - hist[end - every][1]) / (every - 1) for end in range(every, len(hist) + 1, every)]
    limit = json.dumps(json.loads((Path(out_dir) / "config.json").read_text())["time_step_limit"])
    samples = "\n".join(f"    {p!r} -> {t!r}" for p, t in check["samples"].items())
    text = f"""# nemotron3-tiny: how these weights were made

A {record['params'] / 1e6:.2f}M-parameter Nemotron 3 with every ingredient of the real models: pattern
`{cfg.hybrid_override_pattern}` (Mamba-2 `M`, LatentMoE `E`, GQA attention `*`); LatentMoE with a shared expert and
{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}, latent width {cfg.moe_latent_size} < d_model {cfg.hidden_size}), a sigmoid
router with an aux-loss-free balancing bias; one MTP layer (`{cfg.mtp_hybrid_override_pattern}`); a byte-level vocabulary (vocab_size 256, token id = byte value; config.json declares
`"nemo_scratch_tokenizer": "bytes"`). Weights: `model.safetensors`, BF16 (A_log, D and `e_score_correction_bias`
F32), NVIDIA tensor names (`backbone.*`, `lm_head.*`, `mtp.*`), written by `nemo_scratch.checkpoint.writer`.

## Command

    {record['command']}

{fitted}CPU, `torch.set_num_threads({a['threads']})`, torch {record['torch']}, transformers {record['transformers']}.
Seed {a['seed']}: parameters by transformers' `_init_weights` after `torch.manual_seed({a['seed']})`, batches by
`numpy.random.default_rng({a['seed']})`. Training wall time {record['wall_s'] / 60:.1f} min for {len(hist)} steps
({record['wall_s'] / len(hist):.2f} s/step on average; the 2-core machine was shared with other jobs: the pace
over {every}-step windows ranged from {min(paces):.2f} to {max(paces):.2f} s/step).

## Corpus

Docstrings (`ast`) and comment runs (`tokenize`) of CPython {c['python']}'s standard library, `.py` files under
`{c['stdlib']}` in sorted path order (test suites skipped), ASCII-normalised:
{c['bytes']:,} bytes, sha256 `{c['sha256']}`.
Built by `tools/corpus.py` (`build_corpus(max_bytes={a['corpus_bytes']})`).
The last {a['val_fraction']:.0%} of the bytes are held out (validation). The corpus itself is not shipped.

Licence of the training text: Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved; PSF
License Agreement for Python {c['python']} (version 2), which permits derivative works. Summary of changes: only
docstrings and comments were extracted, normalised to ASCII, and used as training data for these weights.

## Training

Backbone: transformers `NemotronHForCausalLM` (pure-torch path), float32. MTP head: tools/train_tiny.py
(`MTPHead`, spec section 6) using transformers' own `NemotronHAttention` / `NemotronHMoE`. Loss = CE(main) +
{a['mtp_weight']} x CE(MTP, token t+2). AdamW (betas 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak lr
{a['lr']}, {a['warmup']} warm-up steps then cosine to 10%, grad-norm clip 1.0, batch {a['batch']} x {a['seq']} bytes.
Router bias: `bias_e += {a['bias_rate']} * sign(mean load - load_e)` after every step (DeepSeek-V3 rule).

Deviation: transformers 5.23's Mamba mixer floors dt at `time_step_min` (its `time_step_limit` is
`(time_step_min, inf)` whatever the config says), so the trained function has that floor; config.json records
it as `"time_step_limit": {limit}` and our reference follows the config.

Loss (nats/byte, mean over each {every} steps):

| step | seconds | main CE | MTP CE |
|---:|---:|---:|---:|
{chr(10).join(rows)}

## Result

Held-out ({a['eval_batches']} x {a['batch']} windows of {a['seq']} bytes):

| weights | main CE | MTP CE | MTP top-1 |
|---|---:|---:|---:|
| float32 (end of training) | {ev[0]:.3f} | {ev[1]:.3f} | {ev[2]:.3f} |
| BF16 as shipped, loaded back with transformers | {check['val_main']:.3f} | {check['val_mtp']:.3f} | {check['val_mtp_acc']:.3f} |

Greedy samples (transformers `generate`, BF16 weights upcast to float32):

{samples}
"""
    (Path(out_dir) / "TRAINING.md").write_text(text)


DEFAULT_OUT = ROOT / "nemo_scratch/data/nemotron3-tiny"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="checkpoint directory to write (default: the bundled model, which it replaces)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out other than the default (refused otherwise, before training)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--minutes", type=float, default=20.0,
                   help="training time budget: --steps is cut to fit it at the end of warm-up (see fit_steps), "
                        "and training stops (and saves) when it runs out")
    p.add_argument("--no-fit", dest="fit", action="store_false", help="keep --steps whatever the budget")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--bias-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--sample-tokens", type=int, default=80)
    p.add_argument("--prompts", nargs="+", default=["Return the ", "If the file ", "This module "])
    p.add_argument("--state", type=Path, default=Path("/tmp/nemotron3_tiny_run"),
                   help="directory the run (float32 tensors + record.json) is saved to before export")
    p.add_argument("--export", action="store_true", help="skip training: export and verify a saved --state")
    p.add_argument("--verify", type=Path, default=None, help="only load a shipped checkpoint and report")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    data = np.frombuffer(build_corpus(args.corpus_bytes), dtype=np.uint8)
    split = int(len(data) * (1 - args.val_fraction))
    train_data, val = data[:split], data[split:]
    if args.verify:
        verify(args.verify, val, args)
        return
    from nemo_scratch.checkpoint.safe_write import check_destination

    # regenerating the bundled model is what the default --out is for; any other directory needs --overwrite
    overwrite = args.overwrite or args.out.resolve() == DEFAULT_OUT.resolve()
    check_destination(args.out, overwrite, what="train_tiny: --out")   # before, not after, the training
    if not args.export:
        import transformers

        cfg = nemotron_config()
        model, mtp, history, planned = train(cfg, train_data, args)
        tensors = to_nvidia(model, mtp)
        record = {"command": " ".join(["python tools/train_tiny.py"] + sys.argv[1:]),
                  "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "corpus": describe(data.tobytes()), "history": history, "wall_s": history[-1][1],
                  "planned_steps": planned,
                  "params": parameter_count(tensors), "torch": torch.__version__,
                  "transformers": transformers.__version__, "config": cfg.to_dict(),
                  "eval": evaluate(model, mtp, val, args.eval_batches, args.batch, args.seq, seed=args.seed + 1)}
        save_run(args.state, tensors, record)
        print(f"saved the run to {args.state}; final held-out (main, mtp, mtp acc) = {record['eval']}")
    tensors, record = load_run(args.state)
    cfg = NemotronConfig.from_dict(record["config"], source=str(args.state))
    export(args.out, cfg, tensors, overwrite=overwrite)
    check = verify(args.out, val, args)
    write_training_md(args.out, cfg, record, check)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
