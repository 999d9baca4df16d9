import pytest
import torch

from mmtl_lib import data

# One thread: tests share a small machine, and torch's default thread count made elementwise
# ops ~20x slower whenever another process held a core.
torch.set_num_threads(1)


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """Empty data and cache folders, and an Omniglot loader that fails the test if anything calls
    it: what a test of "refused before any data is read" runs under."""
    folders = tmp_path / "no-data", tmp_path / "no-cache"
    for folder in folders:
        folder.mkdir()
    monkeypatch.setenv("MMTL_DATA", str(folders[0]))
    monkeypatch.setenv("MMTL_CACHE", str(folders[1]))

    def read(*args, **kwargs):
        pytest.fail("Omniglot was read although the configuration is invalid")

    monkeypatch.setattr(data, "load_omniglot", read)
    yield
    assert [list(folder.iterdir()) for folder in folders] == [[], []]
