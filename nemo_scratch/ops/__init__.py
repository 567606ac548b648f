"""The reference: one component per file, pure functions on arrays and explicit weights.

norm.py (RMSNorm, gated group RMSNorm), conv.py (causal depthwise conv1d), ssd.py (Mamba-2 selective scan;
its fast twin ssd_fast.py), attention.py (GQA), moe.py (router, LatentMoE, shared expert, dense MLP),
quant.py (NVFP4 / FP8 / E2M1 / E4M3 codecs), linear.py (one ``linear(x, w)`` for dense and packed weights),
formats.py (the packed weight containers), contracts.py (the argument rules of every op).
Dimension letters: docs/glossary.md.
reference.py gathers every op of the backend op set under one namespace: the default ``ops=`` of the
composite ops (linear, mlp, latent_moe).
"""
