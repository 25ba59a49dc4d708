import json
from pathlib import Path

import pytest
import torch

LAYOUTS = Path(__file__).parent / "layouts"


def load_layout(name):
    """[(key, shape, dtype-name)] of a real checkpoint layout (copied from shared/layouts)."""
    return [tuple(t) for t in json.loads((LAYOUTS / f"{name}.json").read_text())["tensors"]]


def random_tensor(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


def bits(t):
    """Raw bytes of a tensor, for bit-exact comparisons."""
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def scale_layout(entries, dim_map):
    """Shrink a real layout: every dim found in `dim_map` is replaced, others are kept."""
    return [(key, tuple(dim_map.get(d, d) for d in shape), dtype) for key, shape, dtype in entries]


@pytest.fixture(autouse=True, scope="session")
def _private_norm_cache(tmp_path_factory):
    """Norm caches of the tests' checkpoints go to a temporary folder, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_COLAB_CACHE", str(tmp_path_factory.mktemp("norm_cache")))
    yield
    mp.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each test's outcome on its item (fixtures that leave evidence of a failure read it)."""
    outcome = yield
    if call.when == "call":
        item.rep_call = outcome.get_result()
