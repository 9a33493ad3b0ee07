"""Set-up shared by the test suite and the doctests of the package."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _native_cache(tmp_path_factory):
    """Build qflow's native training loops into this test run's temporary directory."""
    os.environ["QFLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("qflow-cache"))
    yield
