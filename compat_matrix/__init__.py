"""The compat-matrix harness: per-release evidence, and the check of the runtime matrix against it."""
