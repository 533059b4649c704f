"""The per-release virtual environments of the compat-matrix harness, for the tests."""

from compat_matrix.venvs import CannotInstall, release_python  # noqa: F401
