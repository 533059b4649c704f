"""The machinery every patch uses: undo records, rebinding, and finding a target's home module.

Nothing here patches anything by itself; `mlx_threadsafe.patches` holds the patches.
"""
