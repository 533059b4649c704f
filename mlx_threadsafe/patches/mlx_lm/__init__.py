"""Patches of mlx-lm's targets, one module per patch id."""
