"""Patches of mlx's targets, one module per patch id."""
