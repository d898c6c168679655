"""`lockstep bench`'s shared parts and its offline and compare modes, on tiny runs.

Statistics are checked against numpy; the JSON against the schema every mode shares; plots by
their PNG signature; the roofline's byte count against the GGUF file as `gguf` reads it; and a
missing peer must give a clear message and a recorded skip. No figure of speed is asserted: a
benchmark is never a timed test.
"""
from __future__ import annotations

import json
import math
import sys

import gguf
import numpy as np
import pytest

from lockstep.bench import plots, report, roofline, stats
from lockstep.runtime.cli import build_parser

PNG = b"\x89PNG\r\n\x1a\n"


def bench_args(*argv: str):
    return build_parser().parse_args(["bench", *argv])


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentiles_match_numpy(n) -> None:
    values = np.random.default_rng(n).lognormal(size=n).tolist()
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)
    s = stats.summary(values)
    ms = np.asarray(values) * 1000
    assert s["min"] == pytest.approx(ms.min()) and s["n"] == n and s["mean"] == pytest.approx(ms.mean()) and s["std"] == pytest.approx(ms.std())
    assert s["p99"] == pytest.approx(np.percentile(ms, 99)) and s["max"] == pytest.approx(ms.max())
    names = stats.vllm_names("ttft", values)
    assert names["median_ttft_ms"] == pytest.approx(np.median(ms)) and names["p90_ttft_ms"] == pytest.approx(
        np.percentile(ms, 90))


def test_percentile_edges_and_cdf() -> None:
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)
    assert stats.summary([])["p50"] is None
    xs, ys = stats.cdf([3.0, 1.0, 2.0, 2.0])
    assert xs == [1.0, 2.0, 2.0, 3.0] and ys == [0.25, 0.5, 0.75, 1.0]


def test_report_and_plots_are_written(tmp_path) -> None:
    rng = np.random.default_rng(1)
    paths = report.write_report(tmp_path, "unit", {"x": [1, 2], "rate": float("inf")}, report.markdown_table(["a", "b"], [[1, 2.5], [None, "z"]]))
    record = json.loads(paths["json"].read_text())
    assert record["schema_version"] == report.SCHEMA_VERSION and record["mode"] == "unit"
    env = record["environment"]
    assert env["git_commit"] and env["date"] and env["versions"]["torch"] and env["machine"]["cores"] >= 1
    assert env["device"] and record["results"] == {"x": [1, 2], "rate": "inf"}, "strict JSON: no Infinity"
    assert "| 1 | 2.5 |" in paths["markdown"].read_text() and "| - | z |" in paths["markdown"].read_text()
    drawn = [plots.latency_cdf(tmp_path / "cdf.png", {"a": rng.random(50).tolist(), "empty": []}, "t"),
             plots.rate_plot(tmp_path / "rate.png", {"a": ([1, 2, 4], rng.random(3).tolist())}, "t", "x", "y"),
             plots.roofline_bars(tmp_path / "roof.png", {"a": 40.0, "b": 120.0}, "t")]
    for path in drawn:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_weight_bytes_read_match_the_gguf_file(make_engine, default_model_path) -> None:
    """Native CPU kernels read the GGUF's blocks: the roofline counts exactly the file's matrices and
    its head (tied: token_embd, read once per step as the head), plus the float norms."""
    engine = make_engine()
    tensors = gguf.GGUFReader(default_model_path).tensors
    quantized = sum(int(t.n_bytes) for t in tensors if t.tensor_type not in (gguf.GGMLQuantizationType.F32,))
    norms = sum(int(t.n_elements) * 4 for t in tensors if t.tensor_type == gguf.GGMLQuantizationType.F32)
    assert roofline.weight_bytes_read(engine) == quantized + norms
    cfg = engine.model_config
    assert roofline.kv_bytes_per_token(engine) == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    one = roofline.decode_bytes(engine, 1, 100)
    assert roofline.decode_bytes(engine, 4, 100)["total"] == one["weights"] + 4 * one["kv"]


def test_offline_tiny_run(tmp_path) -> None:
    args = bench_args("offline", "--batch-sizes", "1", "3", "--prompt-tokens", "20", "--new-tokens", "4",
                      "--threads", "1", "--out", str(tmp_path), "--no-progress")
    assert args.bench_run(args) == 0
    record = json.loads((tmp_path / "offline.json").read_text())
    rows = record["results"]["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["ttft_ms"]["n"] == r["batch"], "one TTFT per request"
        assert r["itl_ms"]["n"] <= r["batch"] * 3, "at most new_tokens - 1 gaps per request"
        limit = r["batch"] * record["results"]["bandwidth_GBps"] * 1e9 / r["bytes_per_step"]
        assert r["roofline_decode_tok_s"] == pytest.approx(limit)
        assert r["pct_of_roofline"] == pytest.approx(100 * r["decode_tok_s"] / limit)
    md = (tmp_path / "offline.md").read_text()
    assert md.count("\n| 1 |") == 1 and md.count("\n| 3 |") == 1
    for name in ("offline_tok_s.png", "offline_roofline.png", "offline_itl_cdf.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_offline_refuses_what_the_arena_cannot_hold(tmp_path, capsys) -> None:
    args = bench_args("offline", "--batch-sizes", "8", "--prompt-tokens", "2000", "--kv-memory", "16MiB",
                      "--out", str(tmp_path))
    assert args.bench_run(args) == 2
    err = capsys.readouterr().err
    assert "--kv-memory" in err and "Traceback" not in err


def test_compare_says_clearly_when_a_peer_is_missing(tmp_path, capsys, monkeypatch) -> None:
    """With llama-cpp-python and transformers made unimportable, the run still measures lockstep,
    records each skip with what to install, and writes every file."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    args = bench_args("compare", "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--skip-startup",
                      "--out", str(tmp_path), "--no-progress")
    assert args.bench_run(args) == 0
    err = capsys.readouterr().err
    assert "llama.cpp peer skipped: llama-cpp-python is not installed" in err
    assert "hf peer skipped: HF transformers is not installed" in err
    results = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert set(results["skipped"]) == {"llama.cpp", "hf"} and results["ratios"] == {}
    ours = results["runtimes"]["lockstep"]
    assert ours["new_tokens"] == 4 and math.isfinite(ours["decode_tok_s"])
    assert ours["prefix_cache_hits"] == 0, "each run prefills the whole prompt, as the peers do"
    assert "skipped" in (tmp_path / "compare.md").read_text()
    for name in ("compare_decode.png", "compare_roofline.png", "compare_itl_cdf.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_measuring_bandwidth_leaves_torch_threads_as_they_were() -> None:
    """A native-kernel engine keeps torch at one thread; the bandwidth probe set two and left it
    there, which doubled the offline mode's decode step (found in `make bench`)."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert roofline.measure_bandwidth("cpu", threads=2, mib=8, repeats=2) > 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
