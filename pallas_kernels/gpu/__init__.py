"""Pallas GPU kernels (Triton lowering) of the online phase."""
