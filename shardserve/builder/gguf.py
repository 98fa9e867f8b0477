"""Read llama-architecture GGUF checkpoints: an HF-style config, float32 tensors with HF names, and the tokenizer.

The file is parsed with the `gguf` package (memory-mapped); tensors are dequantized one at a time.
"""

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from shardserve.builder.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama",)

_MISSING = object()

# GGUF tensor stem -> Hugging Face Llama module path; the ".weight"/".bias" suffix is kept as is.
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


@functools.lru_cache(maxsize=1)
def _parse(resolved_path: str, size: int, mtime_ns: int) -> GGUFReader:
    """Parse a GGUF file (memory-mapped). Parsing the tokenizer arrays takes seconds, so the last file is
    cached and read_gguf_config followed by iter_gguf_tensors parses it once; size/mtime_ns key the cache."""
    return GGUFReader(resolved_path, "r")


@dataclass
class _GgufFile:
    """An opened GGUF file plus its path, so every error can name the file."""

    path: Path
    reader: GGUFReader

    @classmethod
    def open(cls, path: Path) -> "_GgufFile":
        path = Path(path)
        try:
            stat = path.stat()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open GGUF file: {exc}") from exc
        try:
            reader = _parse(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        except Exception as exc:  # truncated/corrupt files fail deep inside numpy/struct parsing
            raise CheckpointError(
                f"{path}: not a readable GGUF file (truncated or corrupt?): {type(exc).__name__}: {exc}"
            ) from exc
        return cls(path, reader)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def array_length(self, key: str) -> int | None:
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)

    def tensor(self, name: str) -> ReaderTensor | None:
        return next((t for t in self.reader.tensors if t.name == name), None)

    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise CheckpointError(
                f"{self.path}: unsupported GGUF architecture {arch!r} (supported: {supported})"
            )
        return arch

    def head_counts(self, arch: str) -> tuple[int, int]:
        heads = self.get(f"{arch}.attention.head_count")
        kv_heads = self.get(f"{arch}.attention.head_count_kv", heads)
        if not isinstance(heads, int) or not isinstance(kv_heads, int):
            raise CheckpointError(f"{self.path}: per-layer attention head counts are not supported")
        return heads, kv_heads


def read_gguf_config(path: Path) -> dict:
    """Return a Hugging Face style config.json dict built from the GGUF metadata of a llama-architecture file."""
    gguf = _GgufFile.open(path)
    arch = gguf.architecture()
    hidden_size = int(gguf.get(f"{arch}.embedding_length"))
    heads, kv_heads = gguf.head_counts(arch)
    names = {t.name for t in gguf.reader.tensors}
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(gguf.get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(gguf.get(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(gguf.get(f"{arch}.attention.key_length", hidden_size // heads)),
        "rms_norm_eps": float(gguf.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(gguf.get(f"{arch}.context_length")),
        "vocab_size": _vocab_size(gguf),
        "rope_parameters": _rope_parameters(gguf, arch),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "bos_token_id": gguf.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": gguf.get("tokenizer.ggml.eos_token_id", None),
        "torch_dtype": "float32",
    }
    pad_token_id = gguf.get("tokenizer.ggml.padding_token_id", None)
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    return config


def _vocab_size(gguf: _GgufFile) -> int:
    """Number of tokenizer tokens, else the row count of the token embedding."""
    n_tokens = gguf.array_length("tokenizer.ggml.tokens")
    if n_tokens:
        return n_tokens
    embedding = gguf.tensor("token_embd.weight")
    if embedding is None:
        raise CheckpointError(f"{gguf.path}: no tokenizer tokens and no token_embd.weight tensor")
    return int(embedding.shape[-1])  # GGUF dims are reversed: ne[1] is the HF row count


def _rope_parameters(gguf: _GgufFile, arch: str) -> dict[str, Any]:
    """HF `rope_parameters` from the rope.* metadata (default, linear or yarn scaling)."""
    if gguf.tensor("rope_freqs.weight") is not None:
        raise CheckpointError(
            f"{gguf.path}: per-frequency rope factors (rope_freqs.weight, llama3-style rope scaling) are not supported"
        )
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(gguf.get(f"{arch}.rope.freq_base", 10000.0))}
    kind = gguf.get(f"{arch}.rope.scaling.type", None)
    factor = gguf.get(f"{arch}.rope.scaling.factor", None)
    legacy_linear = gguf.get(f"{arch}.rope.scale_linear", None)
    if kind is None and legacy_linear is not None:
        kind, factor = "linear", legacy_linear
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return params
    if factor is None or kind not in ("linear", "yarn"):
        raise CheckpointError(f"{gguf.path}: unsupported rope scaling {kind!r} (factor {factor!r})")
    params.update(rope_type=kind, factor=float(factor))
    original_context = gguf.get(f"{arch}.rope.scaling.original_context_length", None)
    if kind == "yarn" and original_context is not None:
        params["original_max_position_embeddings"] = int(original_context)
    return params


def iter_gguf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, float32 tensor) pairs one at a time, in file order, with Hugging Face Llama names.

    The file is opened and checked eagerly, so a corrupt file raises CheckpointError at call time.
    """
    gguf = _GgufFile.open(path)
    heads, kv_heads = gguf.head_counts(gguf.architecture())
    for tensor in gguf.reader.tensors:
        _hf_name(gguf.path, tensor.name)  # fail before yielding anything if a tensor is unknown
    return _generate_tensors(gguf, heads, kv_heads)


def _generate_tensors(gguf: _GgufFile, heads: int, kv_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in gguf.reader.tensors:
        hf_name = _hf_name(gguf.path, tensor.name)
        weights = _dequantize(gguf.path, tensor)
        if ".self_attn.q_proj." in hf_name:
            weights = _unpermute_rotary_rows(gguf.path, tensor.name, weights, heads)
        elif ".self_attn.k_proj." in hf_name:
            weights = _unpermute_rotary_rows(gguf.path, tensor.name, weights, kv_heads)
        yield hf_name, weights


def _hf_name(path: Path, gguf_name: str) -> str:
    """Map a GGUF tensor name (e.g. `blk.3.attn_q.weight`) to its Hugging Face Llama name."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if suffix in ("weight", "bias"):
        if len(parts) == 1 and stem in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
            return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise CheckpointError(f"{path}: unsupported GGUF tensor {gguf_name!r} for a llama model")


def _dequantize(path: Path, tensor: ReaderTensor) -> torch.Tensor:
    """Dequantize one tensor to float32 in the HF shape (GGUF lists dims fastest-first, i.e. reversed)."""
    hf_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
        array = array.reshape(hf_shape)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}): {exc}"
        ) from exc
    # F32 data comes back as a read-only view of the memory map: copy it so torch gets owned, writable memory.
    if array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


def _unpermute_rotary_rows(path: Path, name: str, weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF rotate_half halves).

    llama.cpp's converter maps HF row `h*D + s*D/2 + j` to GGUF row `h*D + 2*j + s` (D = head_dim,
    s in {0, 1}); viewing the GGUF rows as (heads, D/2, 2) and swapping the last two axes inverts it.
    """
    rows = weights.shape[0]
    if rows % (2 * n_heads) != 0:
        raise CheckpointError(f"{path}: tensor {name!r} has {rows} rows, not divisible into {n_heads} rotary heads")
    half = rows // n_heads // 2
    return weights.reshape(n_heads, half, 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape).contiguous()


def load_gguf_tokenizer(path: Path) -> "PreTrainedTokenizerBase":
    """Return a transformers tokenizer built offline from the GGUF tokenizer metadata, chat template included."""
    from transformers import AutoTokenizer  # heavy import, only needed here

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot build a tokenizer from the GGUF metadata: {exc}") from exc
    if tokenizer.chat_template is None:
        template = _GgufFile.open(path).get("tokenizer.chat_template", None)
        if template is not None:
            tokenizer.chat_template = template
    return tokenizer
