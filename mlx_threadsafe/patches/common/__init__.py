"""The kinds of patch several targets share; each per-target module declares one of these."""
