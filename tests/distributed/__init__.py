"""Helpers and rank scripts for tests/test_distributed.py (real `mlx.launch --backend ring`)."""
