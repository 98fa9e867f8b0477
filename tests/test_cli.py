"""`shardserve generate` as a user runs it: a subprocess on a tiny checkpoint, and one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import hf_greedy

pytestmark = pytest.mark.timeout(300)


def shardserve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shardserve.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


def test_generate_prints_the_greedy_completion(tiny_checkpoint) -> None:
    path, hf = tiny_checkpoint("llama")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    text = "the quick brown fox"
    want = tok.decode(hf_greedy(hf, tok.encode(text), 12), skip_special_tokens=True)
    res = shardserve("generate", "--model-dir", str(path), "--input-text", text, "--max-output-len", "12", "--ignore-eos")
    assert res.returncode == 0, res.stderr
    assert f'Input [Text 0]: "{text}"' in res.stdout
    assert f'Output [Text 0]: "{want}"' in res.stdout


def test_batch_file_runs_every_prompt(tiny_checkpoint, tmp_path: Path) -> None:
    path, _ = tiny_checkpoint("qwen2")
    batch = tmp_path / "prompts.txt"
    batch.write_text("hello world\nthe capital of France is\n\nun deux trois\n")
    res = shardserve(
        "generate", "--model-dir", str(path), "--batch-file", str(batch), "--max-output-len", "5",
        "--temperature", "0.7", "--top-k", "20", "--seed", "1", "--stop-words", "zz",
    )
    assert res.returncode == 0, res.stderr
    assert [line.split(":")[0] for line in res.stdout.splitlines() if line.startswith("Output")] == [
        f"Output [Text {i}]" for i in range(3)
    ]


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_dir", "model not found"),
        ("no_tokenizer", "no tokenizer files"),
        ("truncated", "truncated safetensors"),
        ("unknown_arch", "unsupported architecture 'FooForCausalLM'"),
    ],
)
def test_model_problems_are_one_line_errors(tiny_checkpoint, tmp_path: Path, breakage: str, message: str) -> None:
    src, _ = tiny_checkpoint("llama")
    broken = tmp_path / "model"
    shutil.copytree(src, broken)
    if breakage == "missing_dir":
        shutil.rmtree(broken)
    elif breakage == "no_tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (broken / f).unlink()
    elif breakage == "truncated":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    else:
        cfg = broken / "config.json"
        cfg.write_text(cfg.read_text().replace('"LlamaForCausalLM"', '"FooForCausalLM"'))
    res = shardserve("generate", "--model-dir", str(broken), "--input-text", "hi")
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_sampling_flag_is_a_one_line_error(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    res = shardserve("generate", "--model-dir", str(path), "--input-text", "hi", "--top-p", "1.5")
    assert res.returncode == 2 and "top_p must be in (0, 1]" in res.stderr and "Traceback" not in res.stderr
