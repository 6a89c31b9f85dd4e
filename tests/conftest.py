import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared_data(path: Path, environ: dict | os._Environ = os.environ) -> Path:
    """``path`` if it exists; else the test fails under ``CI=true`` (CI lays the data beside the
    clone, so its absence there is a broken set-up) and skips elsewhere, with the reason shown in
    the summary (``scripts/test.sh`` passes ``-rs``)."""
    if path.exists():
        return path
    message = f"real data not found at {path} (expected ../shared/data beside the checkout)"
    if environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{message}; CI=true needs it", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout: every test that reads the real logs takes this fixture."""
    return require_shared_data(SHARED_DATA)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny tensors on a shared 2-core CI machine run far slower with intra-op threading."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=[False, True], ids=["one_gemm", "split_rows"])
def split_weight_grads(request, monkeypatch) -> bool:
    """Runs a test twice: as on CPU (one batched GEMM per weight gradient), and with the GPU's row
    split forced on at toy sizes (132 multiprocessors, chunks of 2 rows), so the split path of
    ``embedding_methods.gemm`` is exercised without a GPU."""
    if request.param:
        from embdim.embedding_methods import gemm

        monkeypatch.setattr(gemm, "multiprocessors", lambda device: 132)
        monkeypatch.setattr(gemm, "MIN_CHUNK_ROWS", 2)
    return request.param
