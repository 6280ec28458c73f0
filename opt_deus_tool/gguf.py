"""A GGUF file (llama.cpp's format, any quantisation) converted into a Hugging Face folder.

    from opt_deus_tool.gguf import convert_gguf
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct/")   # then: opt-deus --base ...

The folder holds config.json, model.safetensors (float32, Hugging Face tensor names; no lm_head.weight when the
head is the embeddings), generation_config.json, the tokenizer files when the GGUF carries a tokenizer, and
opt_deus_conversion.json (what it was converted from). The architecture comes from the GGUF's metadata
(`general.architecture`), every size from its `<architecture>.*` keys; FAMILIES says, per architecture, what
the Hugging Face config is and whether llama.cpp rearranged the q/k rows. Tensors are dequantised with the
`gguf` package (Q4_1, Q4_K_M and every other type it reads), the tokenizer rebuilt by transformers from the GGUF.
Needs the `parity` extra (gguf, transformers). Importing this module needs neither.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Bump when the folder's layout or contents change: caches stamped with another version are rebuilt.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Family:
    """What a GGUF architecture becomes in Hugging Face terms."""
    model_type: str
    architecture: str                 # the transformers class named in config.json
    permuted_qk: bool                 # llama.cpp's converter interleaved the rotary halves of q and k rows
    biases: tuple[str, ...] = ()      # the GGUF block tensors that have a .bias besides their .weight
    config: dict = field(default_factory=dict)  # config.json entries of this family, fixed ones


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", permuted_qk=True,
                    config={"attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
                            "pretraining_tp": 1}),
    # Qwen2 / Qwen2.5: biases on q, k and v; llama.cpp leaves its q/k rows as they are. Sliding-window attention
    # is off in the released configs (use_sliding_window: false), so full attention in every layer.
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", permuted_qk=False, biases=("attn_q", "attn_k", "attn_v"),
                    config={"attention_dropout": 0.0, "use_sliding_window": False}),
}

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


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into a Hugging Face folder; the message says what is wrong."""


def hf_name(gguf_name: str, family: Family) -> str:
    """The Hugging Face name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES
            and (parts[3] == "weight" or (parts[3] == "bias" and parts[2] in family.biases))):
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise GGUFError(f"unexpected GGUF tensor {gguf_name!r} for architecture {family.model_type!r}")


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's interleaving of the rotary halves in q/k rows (inverse of its ``permute``); a bias too."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def family_of(reader) -> tuple[str, Family]:
    arch = _field(reader, "general.architecture")
    if arch not in FAMILIES:
        raise GGUFError(f"GGUF architecture {arch!r} is not one this converter knows ({', '.join(FAMILIES)})")
    return arch, FAMILIES[arch]


def read_config(reader) -> dict:
    """config.json of the model in a GGUFReader, from its metadata (vocab_size: rows of the embedding)."""
    arch, family = family_of(reader)

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise GGUFError("the GGUF has no token_embd.weight")
    # GGUF shapes are (cols, rows); the embedding's rows are the vocabulary, padding included.
    vocab_size = int(embedding.shape[-1])
    # The GGUF stores eps as float32 (9.99999975e-06): round it back to the value it was written from.
    eps = float(f"{float(meta('attention.layer_norm_rms_epsilon')):.6g}")
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", n_heads)),
        "head_dim": int(meta("rope.dimension_count", hidden // n_heads)),
        "rms_norm_eps": eps,
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
        "hidden_act": "silu",
        **family.config,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if family.model_type == "qwen2":
        config["max_window_layers"] = config["num_hidden_layers"]
    return config


def read_tensors(reader, config: dict) -> dict:
    """Every tensor of a GGUFReader dequantised to float32 numpy, by its Hugging Face name. A head equal to the
    embeddings is dropped (config["tie_word_embeddings"] becomes True); the shapes are checked against config."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    _, family = family_of(reader)
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name, family)
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w = np.asarray(t.data, dtype=np.float32)
        else:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # GGUF shapes are (cols, rows); numpy data is (rows, cols).
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if family.permuted_qk and ".self_attn.q_proj." in name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif family.permuted_qk and ".self_attn.k_proj." in name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w, dtype=np.float32)

    if "lm_head.weight" in tensors:
        if np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            del tensors["lm_head.weight"]
            config["tie_word_embeddings"] = True
        else:
            config["tie_word_embeddings"] = False
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    want = expected_shapes(config, family)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:10]
        raise GGUFError(f"converted tensors do not match the config: {diff}")
    return tensors


def expected_shapes(config: dict, family: Family) -> dict:
    h, i, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    want = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        want["lm_head.weight"] = (config["vocab_size"], h)
    rows = {"attn_q": q, "attn_k": kv, "attn_v": kv}
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
        want.update({f"{p}{_LAYER_NAMES[b]}.bias": (rows[b],) for b in family.biases})
    return want


def _save_tokenizer(gguf_path: Path, out_dir: Path, config: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if tok.bos_token_id != config["bos_token_id"] or tok.eos_token_id != config["eos_token_id"]:
        raise GGUFError(
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


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                 check: Callable[[dict, dict], None] | None = None) -> Path:
    """Dequantise the GGUF file into a Hugging Face folder at ``out_dir``; returns its absolute path.

    check(config, tensors), if given, sees the config and the float32 tensors before anything is written and
    raises to refuse them (a test fixture's expectations, say). The folder is built beside ``out_dir`` and
    renamed into place, so readers never see a half-written folder; an existing ``out_dir`` is replaced.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    reader = GGUFReader(str(gguf_path))
    config = read_config(reader)
    tensors = read_tensors(reader, config)
    has_tokenizer = _field(reader, "tokenizer.ggml.model") is not None
    del reader
    if check is not None:
        check(config, tensors)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        if has_tokenizer:
            _save_tokenizer(gguf_path, tmp, config)
        generation = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config[key] is not None:
                generation[key] = config[key]
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
