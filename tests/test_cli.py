"""The command line, run as a user runs it: streaming output, and one-line errors for bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_gguf import T, TinySpec, write_tiny_gguf


def lockstep(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lockstep.runtime.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_generate_streams_a_reply_with_no_flags(default_model_path: Path) -> None:
    proc = lockstep("generate", "--temperature", "0", "--max-tokens", "12", "What is 2+2?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "tok/s decode" in proc.stderr and "TTFT" in proc.stderr


def test_generate_with_overlap_on_prints_the_same_reply(default_model_path: Path) -> None:
    """--overlap on (the CUDA default) forced on the CPU: the same text as with it off."""
    replies = [lockstep("generate", "--overlap", mode, "--temperature", "0.7", "--seed", "3", "--max-tokens", "12",
                        "--stop", "e", "Name three rivers.") for mode in ("off", "on")]
    assert all(proc.returncode == 0 for proc in replies), [proc.stderr for proc in replies]
    assert replies[0].stdout == replies[1].stdout and replies[0].stdout.strip()


def test_chat_keeps_history(default_model_path: Path) -> None:
    """Each turn's prompt holds the turns before it; /reset starts again."""
    stdin = "My name is Ada.\nWhat is my name?\n/reset\nWhat is my name?\n/exit\n"
    proc = lockstep("chat", "-v", "--temperature", "0", "--max-tokens", "16", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    turns = [line for line in proc.stderr.splitlines() if "prompt tokens from" in line]
    sizes = [int(line.split("prompt tokens")[0].split()[-1]) for line in turns]
    messages = [int(line.split("from ")[1].split()[0]) for line in turns]
    assert messages == [1, 3, 1], proc.stderr
    assert sizes[1] > sizes[0] + 5 and sizes[2] < sizes[1], sizes
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) >= 3


@pytest.mark.parametrize("command", ["generate", "chat", "fetch"])
def test_help_has_examples(command: str) -> None:
    proc = lockstep(command, "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout


def test_missing_model_file(tmp_path: Path) -> None:
    assert_one_line_error(lockstep("generate", "--model", str(tmp_path / "nope.gguf"), "hi"), "no such file")


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(np.random.default_rng().integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_one_line_error(lockstep("generate", "--model", str(bad), "hi"), "not a valid GGUF")


def test_truncated_gguf(tmp_path: Path, default_model_path: Path) -> None:
    cut = tmp_path / "truncated.gguf"
    with open(default_model_path, "rb") as src:
        cut.write_bytes(src.read(60 << 20))
    assert_one_line_error(lockstep("generate", "--model", str(cut), "hi"), "truncated")


def test_unsupported_quantization(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "q2k.gguf", TinySpec(qtype=T.Q2_K, hidden=256, ffn=256))
    assert_one_line_error(lockstep("generate", "--model", str(model), "hi"), "Q2_K", "not support")


def test_unsupported_architecture(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "falcon.gguf", TinySpec(arch="falcon"))
    assert_one_line_error(lockstep("generate", "--model", str(model), "hi"), "falcon", "not supported")


def test_wrong_tensor_shape(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "shape.gguf", TinySpec(bad_shape=True))
    assert_one_line_error(lockstep("generate", "--model", str(model), "hi"), "attn_k")


def test_prompt_longer_than_the_context(default_model_path: Path) -> None:
    proc = lockstep("generate", "--max-model-len", "64", "--raw", "word " * 200)
    assert_one_line_error(proc, "context holds 64")


@pytest.mark.parametrize("flags, field", [
    (["--temperature", "-1"], "temperature"), (["--top-p", "1.5"], "top_p"), (["--top-k", "-5"], "top_k"),
    (["--max-tokens", "-2"], "max_tokens"),
])
def test_invalid_sampling_parameters(flags: list[str], field: str) -> None:
    assert_one_line_error(lockstep("generate", *flags, "hi"), field)


def test_cpu_kernel_choice_is_logged_and_both_give_the_same_greedy_text(default_model_path: Path) -> None:
    """--cpu-kernels native (the default) and torch: the same model, so the same greedy reply."""
    replies = {}
    for kernels in ("native", "torch"):
        proc = lockstep("generate", "-v", "--cpu-kernels", kernels, "--threads", "2", "--temperature", "0",
                        "--max-tokens", "12", "--raw", "The capital of France is")
        assert proc.returncode == 0, proc.stderr
        replies[kernels] = proc.stdout
        assert ("cpu kernels: native" in proc.stderr) == (kernels == "native"), proc.stderr
    assert replies["native"] == replies["torch"] and replies["native"].strip()


def test_options_that_cannot_work_are_refused_in_one_line() -> None:
    assert_one_line_error(lockstep("generate", "--weights", "quantized", "hi"), "needs --backend triton")
    assert_one_line_error(lockstep("generate", "--attention", "cuda", "hi"), "--attention cuda")


def test_serve_binds_loopback_and_reads_its_key_from_the_environment(monkeypatch) -> None:
    from lockstep.runtime.cli import build_parser

    monkeypatch.delenv("LOCKSTEP_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.grpc_port, args.api_key) == ("127.0.0.1", 8000, 50051, None)
    monkeypatch.setenv("LOCKSTEP_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.setenv("LOCKSTEP_API_KEY", "")
    assert build_parser().parse_args(["serve"]).api_key is None, "an empty variable means no key"
