"""Patches of mlx-vlm's targets, one module per patch id."""
