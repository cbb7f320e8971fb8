import os

import pytest

# 2 threads for the test process; 1 in each of several pytest-xdist workers (`make test`
# runs two on two cores: more threads than cores made every worker slower).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", "1" if _WORKERS > 1 else "2")
if os.environ.get("TIEDLORA_TEST_THREADS"):  # the numerics matrix: every process with this many
    os.environ["OMP_NUM_THREADS"] = os.environ["TIEDLORA_TEST_THREADS"]
    import torch

    torch.set_num_threads(int(os.environ["TIEDLORA_TEST_THREADS"]))


def pytest_configure(config):
    # Once for the test process, as every tiedlora command does at start-up.
    from tiedlora import compat

    compat.install()


@pytest.fixture(scope="session")
def mp1():
    """Single-process megatron parallel state (TP=PP=DP=1, gloo)."""
    from tiedlora.dist import init_distributed, shutdown
    from tiedlora.config import ParallelConfig

    init_distributed(ParallelConfig(), seed=1234)
    yield
    shutdown()


@pytest.fixture(autouse=True)
def _seed(request):
    import torch

    torch.manual_seed(0)
    if "mp1" in request.fixturenames:
        from tiedlora.dist import set_seed

        set_seed(1234)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The tiny pretrained base (built once per session) for end-to-end fine-tuning tests."""
    from helpers import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("ft"))
