"""Not used to build: the project builds with hatchling (pyproject.toml), setup.py is never run.

It stays only because compat_matrix/venvs.py hashes pyproject.toml and setup.py to name
the per-release venvs; delete it once that digest reads pyproject.toml alone.
"""
