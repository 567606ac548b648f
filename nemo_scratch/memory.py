"""How much memory a call will need, how much this machine can give, and one line when it cannot.

    need = forward_bytes(cfg, batch=1, tokens=4096, dtype="float32")      # {"total": bytes, "parts": {...}}
    check_fits(need, "forward over 1 x 4096 tokens", "forward")             # MemoryBudgetError if too big

Every estimate is computed from the config alone, before anything is allocated, so a forward, generate,
golden, load or make-random call that cannot fit is refused in microseconds with one line (what it needs,
what is available, what helps) instead of a MemoryError after gigabytes were allocated. The estimates
follow the NumPy reference op by op (ops/attention.py holds all [b, q, t, s] scores; ops/ssd.py builds
[b, h, chunks, q, q] decay blocks and [b, h, chunks+1, chunks+1] chunk decays); they count the arrays alive
at the peak of the worst layer plus what lives across layers (residual stream, logits, caches), not the
weights, which are already loaded (or memory-mapped) when a forward starts.

available_bytes() is the smallest of: MemAvailable (/proc/meminfo), the cgroup limit minus its current
usage (cgroup v2 memory.max, or v1 memory.limit_in_bytes), and the environment variable
NEMO_SCRATCH_MEMORY_LIMIT (bytes, or with a K/M/G/T suffix: a budget you choose, e.g. on a shared machine).
None when nothing is known (then nothing is refused).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import InputError, MemoryBudgetError
from .ops.attention import query_tile

CHECK_ABOVE = 64 * 2**20   # smaller requests are never refused (nor is /proc read for them)

# What helps, per kind of call: the one place a new option (e.g. a prefill chunk) is added to the advice.
HELP = {
    "forward": "pass --prefill-chunk N (prefill_chunk=N: the tokens run N at a time), fewer token ids or a "
               "smaller batch",
    "generate": "pass --prefill-chunk N (prefill_chunk=N), a shorter prompt, fewer --max-new-tokens or a "
                "smaller batch",
    "load": "load with weights='stored' (CLI: --weights stored), which keeps the weights as stored and reads them from disk at use, or use a quantized checkpoint",
    "golden": "pass smaller --shape dimensions",
    "make-random": "pick a smaller --preset",
}


# ---------------------------------------------------------------------------------------------- what is there

def proc_bytes(path, keys) -> dict:
    """{key: bytes} of the ``Key:   N kB`` lines of a /proc file (/proc/meminfo, /proc/self/status) whose key is
    in ``keys``; the keys it lacks, or all of them when it cannot be read (not Linux), are left out."""
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _meminfo_available():
    return proc_bytes("/proc/meminfo", ("MemAvailable",)).get("MemAvailable")


def _read_int(path):
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available():
    """The cgroup's limit minus its usage (v2, then v1); None when unlimited or unknown."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and limit < 2**60:   # v1 reports "unlimited" as a huge number
            return max(limit - (usage or 0), 0)
    return None


def parse_bytes(text, what="NEMO_SCRATCH_MEMORY_LIMIT") -> int:
    """'512M' -> 536870912 (suffixes K, M, G, T are powers of 1024; a plain number is bytes)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1:] if s[-1:] in units else ""
    try:
        value = float(s[:len(s) - len(unit)])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{what}={text!r}: expected a number of bytes, e.g. 8G or 512M")
    return int(value * units[unit])


def available_bytes():
    """Bytes this process may still allocate (see the module docstring), or None when unknown."""
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    env = os.environ.get("NEMO_SCRATCH_MEMORY_LIMIT")
    if env:
        found.append(parse_bytes(env))
    return min(found) if found else None


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def advice(kind: str, dtype=None) -> str:
    """What helps a call of ``kind`` fit (HELP), plus float32 when it ran in float64."""
    extra = ", or --dtype float32 (dtype='float32') instead of float64" if dtype is not None and \
        np.dtype(dtype) == np.float64 else ""
    return HELP[kind] + extra


def check_fits(need, what: str, kind: str, dtype=None) -> None:
    """Raise MemoryBudgetError when ``need`` ({"total", "parts"} or bytes) exceeds available_bytes()."""
    total = need["total"] if isinstance(need, dict) else int(need)
    if total <= CHECK_ABOVE:
        return
    have = available_bytes()
    if have is None or total <= have:
        return
    parts = need.get("parts", {}) if isinstance(need, dict) else {}
    biggest = max(parts.items(), key=lambda kv: kv[1]) if parts else None
    detail = f" (largest part: {biggest[0]}, {gib(biggest[1])})" if biggest else ""
    raise MemoryBudgetError(f"{what} needs about {gib(total)}{detail} but only {gib(have)} is available; "
                            f"{advice(kind, dtype)}")


# ---------------------------------------------------------------------------------------------- estimates

def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def layer_bytes(cfg, block_type, batch, tokens, dtype, past=0, cached=False) -> int:
    """Peak transient bytes of one block over ``tokens`` new positions (``past`` already cached)."""
    s, b, t = _itemsize(dtype), batch, tokens
    d, bt = cfg.hidden_size, batch * tokens
    if block_type == "mamba":
        h, p, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size
        i, c, w = cfg.mamba_intermediate, cfg.conv_dim, cfg.conv_kernel
        if cached and t <= 8:      # stepped token by token (decode, speculative verification with history)
            return s * b * (cfg.in_proj_out * t + 2 * t * (c * w + 2 * h * p * n) + 2 * t * i)
        q = min(cfg.chunk_size, max(t, 1))
        nc = -(-t // q)
        return s * (b * t * (cfg.in_proj_out + 2 * c + 2 * i)      # in_proj, conv in/out, gated norm
                    + 4 * b * nc * q * h * p                        # x*dt chunks, Y_diag, Y_off, y
                    + 4 * b * h * nc * q * q                        # segsum + L, M (decay blocks)
                    + 3 * b * (nc + 1) * h * p * n                  # chunk states, carried states
                    + 3 * b * h * (nc + 1) ** 2)                    # chunk-to-chunk decays
    if block_type == "attention":
        q, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        keys = past + t
        tile = min(t, query_tile(b, q, keys, s))                    # the queries run a tile at a time
        scores = 3 * b * q * tile * keys                            # scores, masked, probabilities
        grown = 2 * b * keys * kv * dh if cached else 0             # a KV buffer doubling past its capacity
        return s * (bt * (2 * q + 2 * kv) * dh + scores + grown) + tile * keys
    if block_type == "moe":
        e, l_, f = cfg.n_routed_experts, cfg.moe_input_width, cfg.moe_intermediate_size
        sh = cfg.moe_shared_expert_intermediate_size
        return s * (4 * bt * e + 3 * bt * l_ + 2 * bt * f + 2 * bt * sh + 2 * bt * d)
    if block_type == "mlp":
        return s * (2 * bt * cfg.intermediate_size + bt * d)
    return 0


def cache_bytes(cfg, batch, length, dtype, blocks=None) -> int:
    """A decode cache holding ``length`` positions: K/V per attention layer, conv + SSM state per Mamba layer."""
    s, blocks = _itemsize(dtype), cfg.layers_block_type if blocks is None else blocks
    kv = 2 * batch * length * cfg.num_key_value_heads * cfg.head_dim
    state = batch * (cfg.conv_dim * cfg.conv_kernel + cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size)
    return s * sum(kv if bt == "attention" else state if bt == "mamba" else 0 for bt in blocks)


def forward_bytes(cfg, batch, tokens, dtype="float32", past=0, cached=False, last_only=False,
                  blocks=None) -> dict:
    """{"total", "parts"}: one forward over [batch, tokens] ids (``past`` positions already in the cache)."""
    blocks = cfg.layers_block_type if blocks is None else blocks
    s = _itemsize(dtype)
    parts = {"residual stream": 4 * s * batch * tokens * cfg.hidden_size,
             "logits": s * batch * (1 if last_only else tokens) * cfg.vocab_size}
    worst = max(set(blocks), key=lambda bt: layer_bytes(cfg, bt, batch, tokens, dtype, past, cached))
    parts[f"{worst} layer"] = layer_bytes(cfg, worst, batch, tokens, dtype, past, cached)
    return {"total": sum(parts.values()), "parts": parts}


def generate_bytes(cfg, batch, prompt, max_new, dtype="float32", mtp=False, draft_depth=1,
                   prefill_chunk=None) -> dict:
    """{"total", "parts"}: prefill of ``prompt`` tokens (``prefill_chunk`` at a time), then ``max_new`` decode
    steps with growing caches."""
    final = prompt + max_new
    step = min(prompt, prefill_chunk or prompt)
    pre = forward_bytes(cfg, batch, step, dtype, past=prompt - step, cached=True, last_only=not mtp)
    parts = dict(pre["parts"])
    parts["decode cache"] = cache_bytes(cfg, batch, final, dtype)
    if mtp:
        mtp_blocks = list(cfg.mtp_layers_block_type) * max(cfg.num_nextn_predict_layers, 1)
        parts["MTP cache"] = cache_bytes(cfg, batch, final, dtype, blocks=mtp_blocks)
        parts["MTP layer"] = max(layer_bytes(cfg, bt, batch, prompt, dtype, 0, True) for bt in set(mtp_blocks))
    step = forward_bytes(cfg, batch, draft_depth + 1 if mtp else 1, dtype, past=final, cached=True)
    parts["decode step"] = step["total"]
    return {"total": sum(parts.values()), "parts": parts}


def free_disk_bytes(path):
    """Free bytes on the filesystem that holds ``path`` (its nearest existing ancestor); None if unknown."""
    import shutil

    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- model hooks

def _batch_time(ids):
    shape = np.shape(ids)
    if len(shape) == 1:
        return 1, shape[0]
    return (shape[0], shape[1]) if len(shape) == 2 else (None, None)


def check_forward_memory(model, ids, cache=None, last_only=True, prefill_chunk=None) -> None:
    """Model.hidden / Model.forward: refuse a forward that cannot fit (cheap: a few multiplications). With a
    prefill chunk the tokens run that many at a time through a cache, whose growth is counted."""
    b, t = _batch_time(ids)
    if not b or not t or getattr(model.backend, "xp", np) is not np:
        return   # malformed ids (Model.check_ids names the problem), or activations on a GPU (not host memory)
    past = 0 if cache is None else cache.length
    chunked = prefill_chunk is not None and prefill_chunk < t
    step = min(t, prefill_chunk) if chunked else t
    need = forward_bytes(model.cfg, b, step, model.dtype, past=past + t - step, cached=cache is not None or chunked,
                         last_only=last_only)
    if chunked:
        need["parts"]["prompt cache"] = cache_bytes(model.cfg, b, past + t, model.dtype)
        need["parts"]["logits"] = np.dtype(model.dtype).itemsize * b * (1 if last_only else t) * model.cfg.vocab_size
        need["total"] = sum(need["parts"].values())
    if need["total"] > CHECK_ABOVE:
        after = f" after {past} cached positions" if past else ""
        check_fits(need, f"a forward over {b} x {t} tokens{after} ({np.dtype(model.dtype).name})", "forward",
                   model.dtype)


def check_generate_memory(model, batch, prompt, max_new, mtp=False, draft_depth=1, prefill_chunk=None) -> None:
    """generate(): refuse before the prefill when the prefill or the grown caches cannot fit (host arrays)."""
    if getattr(model.backend, "xp", np) is not np:
        return
    need = generate_bytes(model.cfg, batch, prompt, max_new, model.dtype, mtp=mtp, draft_depth=draft_depth,
                          prefill_chunk=prefill_chunk)
    check_fits(need, f"generating {max_new} tokens after a {batch} x {prompt} prompt "
               f"({np.dtype(model.dtype).name})", "generate", model.dtype)
