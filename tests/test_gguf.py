"""opt_deus_tool/gguf.py on small GGUF files written here the way llama.cpp writes them (q/k rows permuted for
llama, q/k/v biases for qwen2, some tensors Q8_0): the folder holds the original tensors (exactly where stored as
float32) and is what transformers' own GGUF reader makes of the file, logits included. The real SmolLM2 file is
converted by tests/smollm2.py (and checked against transformers by tests/test_smollm2_fixture.py, -m slow)."""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from opt_deus_tool.gguf import GGUFError, convert_gguf  # noqa: E402

H, I, L, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 48, 2, 4, 2, 8, 64
Q_ROWS, KV_ROWS = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
BLOCK = [("attn_q", "self_attn.q_proj", (Q_ROWS, H)), ("attn_k", "self_attn.k_proj", (KV_ROWS, H)),
         ("attn_v", "self_attn.v_proj", (KV_ROWS, H)), ("attn_output", "self_attn.o_proj", (H, Q_ROWS)),
         ("ffn_gate", "mlp.gate_proj", (I, H)), ("ffn_up", "mlp.up_proj", (I, H)),
         ("ffn_down", "mlp.down_proj", (H, I))]
QUANTISED = {"ffn_up", "output"}  # stored as Q8_0; everything else float32


def llama_cpp_permute(w, n_heads):
    # convert_hf_to_gguf.py's LlamaModel.permute: the rotary halves of each head's rows interleaved.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch: str, tied: bool, seed: int = 0) -> dict:
    """A random model of `arch` written as llama.cpp would; returns its Hugging Face tensors (float32 numpy)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_vocab_size(VOCAB)
    writer.add_block_count(L)
    writer.add_context_length(128)
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(I)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    hf = {}

    def add(gguf_name, hf_name, value, stored=None):
        hf[hf_name] = value.astype(np.float32)
        stored = hf[hf_name] if stored is None else stored.astype(np.float32)
        if gguf_name.split(".")[-2] in QUANTISED:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(gguf_name, stored)

    add("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((VOCAB, H)))
    add("output_norm.weight", "model.norm.weight", rng.uniform(0.5, 1.5, H))
    if not tied:
        add("output.weight", "lm_head.weight", rng.standard_normal((VOCAB, H)))
    for n in range(L):
        for name, hf_name, shape in BLOCK:
            w = rng.standard_normal(shape)
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name) if arch == "llama" else None
            add(f"blk.{n}.{name}.weight", f"model.layers.{n}.{hf_name}.weight", w,
                llama_cpp_permute(w, heads) if heads else None)
            if arch == "qwen2" and name in ("attn_q", "attn_k", "attn_v"):
                add(f"blk.{n}.{name}.bias", f"model.layers.{n}.{hf_name}.bias", rng.standard_normal(shape[0]))
        add(f"blk.{n}.attn_norm.weight", f"model.layers.{n}.input_layernorm.weight", rng.uniform(0.5, 1.5, H))
        add(f"blk.{n}.ffn_norm.weight", f"model.layers.{n}.post_attention_layernorm.weight", rng.uniform(0.5, 1.5, H))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_conversion_holds_the_weights_and_is_what_transformers_reads(tmp_path, arch, tied):
    path = tmp_path / f"{arch}.gguf"
    original = write_gguf(path, arch, tied)
    out = convert_gguf(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] is tied and config["vocab_size"] == VOCAB
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "opt_deus_conversion.json"]  # no tokenizer in this GGUF

    ours = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(ours).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    state = ours.state_dict()
    for name, want in original.items():
        got = state[name].numpy()
        if name.split(".")[-2] in ("up_proj", "lm_head"):  # Q8_0: within its rounding
            assert np.abs(got - want).max() <= 0.01 * np.abs(want).max() + 1e-6, name
        else:  # float32, q/k unpermuted: exactly
            assert np.array_equal(got, want), name

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    assert type(theirs) is type(ours)
    assert all(torch.equal(t, state[k]) for k, t in theirs.state_dict().items())
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)  # the configs agree too


def test_refusals_leave_nothing_behind(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", tied=True)

    def refuse(config, tensors):
        assert config["num_hidden_layers"] == L and len(tensors) == 2 + 9 * L
        raise ValueError("not the model the caller expected")

    with pytest.raises(ValueError, match="not the model"):
        convert_gguf(path, tmp_path / "out", check=refuse)
    unknown = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(unknown), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, H), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2'"):
        convert_gguf(unknown, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf", "llama.gguf"]
