"""The reference: one component per file, pure functions on arrays and explicit weights.

norm.py (RMSNorm, gated group RMSNorm), conv.py (causal depthwise conv1d), ssd.py (Mamba-2 selective scan),
attention.py (GQA), moe.py (router, LatentMoE, shared expert, dense MLP), quant.py (NVFP4 / FP8 / E2M1 / E4M3),
linear.py (one ``linear(x, w)`` for dense and packed weights).
Dimension letters: docs/glossary.md.
"""
