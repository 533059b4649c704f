import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def tiny_models():
    """Build the tiny offline models once per session (each process may race: that is safe)."""
    from mlx_threadsafe import testing

    return {arch: testing.build_lm(arch) for arch in testing.LM_ARCHS}
