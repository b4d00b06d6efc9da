import os
from pathlib import Path

# Tests run on CPU with full float32 matmuls, so parity tolerances mean something.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "refusal_direction"


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"reference splits not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _process_limits_unchanged():
    """No test may leave this process's address-space limit lowered: XLA's compiler crashes (SIGSEGV) when it cannot
    map memory, far from the test that lowered it."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS)
    yield
    after = resource.getrlimit(resource.RLIMIT_AS)
    if after != before:
        resource.setrlimit(resource.RLIMIT_AS, before)
        pytest.fail(f"the test left RLIMIT_AS at {after} (was {before})")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module: the fast suite compiles thousands of programs in one
    process, and XLA's CPU compiler crashed (SIGSEGV) three quarters of the way through when they all stayed alive."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
