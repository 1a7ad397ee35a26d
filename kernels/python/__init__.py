"""Kernels and the hardware fingerprint that decides who may share tuned configs.

This folder, not ``kernels/`` itself, is the package ``gpufleet.kernels``, so
that ``kernels/`` never shadows the ``kernels`` package of the Hugging Face hub
(which transformers imports) when Python runs from the repository root.
"""
