"""What the three evidence harnesses (compat_matrix, conformance, benchmarks) share.

`harness.venvs` makes the virtual environments they run releases and third-party programs
in; `harness.evidence` stamps, reads and writes their JSON; `harness.markdown` renders their
tables and the generated blocks of the documentation. It lives at the repository root beside
them and is not part of the wheel (pyproject.toml packages mlx_threadsafe alone).
"""
