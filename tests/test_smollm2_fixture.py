"""The converted SmolLM2-135M-Instruct checkpoint is a working LLaMA in transformers."""

from __future__ import annotations

import gzip
import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# These test the GGUF converter (opt_deus_tool/gguf.py, as tests/smollm2.py runs it on SmolLM2) against
# transformers and exercise nothing else of the project, so they stay out of the default suite (run them with
# -m slow after changing the converter; tests/test_gguf.py checks it on small files in the default suite).
pytestmark = pytest.mark.slow

# Plain English prose used when ../shared/data/austen is absent.
FALLBACK_PROSE = """\
The village stood at the edge of a wide valley, where the river slowed and spread into a chain of
shallow pools before it turned south toward the sea. Most of the families who lived there had farmed
the same fields for generations, and they measured the year less by the calendar than by the work it
brought: ploughing in the cold weeks of early spring, sowing when the ground had dried, and the long
days of harvest when every pair of hands was needed. In the evenings the older men gathered outside
the inn to talk about the weather, the price of wheat and the news that came up the road with the
carrier's cart each Thursday. The children went to a small school beside the church, where a patient
schoolmaster taught them to read, to write a clear hand and to do their sums, and where, on warm
afternoons, the windows were opened so that the sound of the mill wheel drifted in over their lessons.
Few of them imagined that they would ever leave, and yet, as the railway crept closer each year, more
and more of the young people began to speak of the towns, of factories and shops, and of wages paid in
coin rather than in bread and lodging. Their parents listened with a mixture of pride and unease,
knowing that the world they had known was changing, and that no one could say what it would become.
"""


@pytest.fixture(scope="module")
def model(smollm2_dir):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_converted_folder_is_smollm2_135m_as_a_tied_float32_llama_checkpoint(smollm2_dir):
    from safetensors import safe_open

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in names
    assert len(names) == 2 + 30 * 9
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (smollm2_dir / name).is_file()


def test_converted_model_answers_paris_for_the_capital_of_france(model, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _real_text(austen_dir_or_none) -> str:
    if austen_dir_or_none is None:
        return FALLBACK_PROSE
    with gzip.open(austen_dir_or_none / "pride_and_prejudice.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()
    # A stretch from the middle of the novel, away from any front matter.
    start = text.index("\n", len(text) // 2) + 1
    return text[start:start + 3000]


def test_converted_model_perplexity_on_english_prose_is_below_100(model, tokenizer, request):
    try:
        austen = request.getfixturevalue("austen_dir")
    except pytest.skip.Exception:
        austen = None
    ids = tokenizer(_real_text(austen), return_tensors="pt").input_ids[:, :400]
    assert ids.shape[1] >= 200
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    ppl = math.exp(loss)
    assert 1.0 < ppl < 100.0, ppl


def _reference_logits(smollm2_dir, ids: list[int]):
    """From-scratch float64 LLaMA forward, read straight from the safetensors file."""
    from safetensors import safe_open

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(x):  # (heads, T, D), rotate-half convention
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        def w(name):
            return f.get_tensor(name).to(torch.float64)

        emb = w("model.embed_tokens.weight")
        x = emb[torch.tensor(ids)]
        for n in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{n}."
            h = rms(x, w(p + "input_layernorm.weight"))
            q = (h @ w(p + "self_attn.q_proj.weight").T).view(T, H, D).transpose(0, 1)
            k = (h @ w(p + "self_attn.k_proj.weight").T).view(T, KV, D).transpose(0, 1)
            v = (h @ w(p + "self_attn.v_proj.weight").T).view(T, KV, D).transpose(0, 1)
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D) + mask, -1)
            o = (att @ v).transpose(0, 1).reshape(T, H * D)
            x = x + o @ w(p + "self_attn.o_proj.weight").T
            h = rms(x, w(p + "post_attention_layernorm.weight"))
            g = torch.nn.functional.silu(h @ w(p + "mlp.gate_proj.weight").T)
            x = x + (g * (h @ w(p + "mlp.up_proj.weight").T)) @ w(p + "mlp.down_proj.weight").T
        x = rms(x, w("model.norm.weight"))
    return x @ emb.T  # tied lm_head


def test_converted_model_logits_match_a_float64_reference_forward(model, tokenizer, smollm2_dir):
    ids = tokenizer("The quick brown fox jumps over the lazy dog because it").input_ids
    ref = _reference_logits(smollm2_dir, ids)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].to(torch.float64)
    err = (got - ref).abs().max().item()
    assert err < 1e-3 * ref.abs().max().item(), err
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
