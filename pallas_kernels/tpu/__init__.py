"""Pallas TPU (Mosaic) kernels of the online phase.

The TPU lookup is `references.centroid_scores` through XLA (two matrix
products on the MXU); the sparse attention is `sparse_attention.py`.
"""
