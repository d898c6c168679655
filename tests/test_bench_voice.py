"""`lockstep bench voice` end to end: an in-process gRPC server on the default model, driven
through the real command line. Never timed: the checks are the samples each latency must have
(one per turn, one per barge-in), that a cancel stopped its reply within about a step, that the
server ended with nothing live, and the files a run writes."""
from __future__ import annotations

import json
import socket

from lockstep.runtime.cli import build_parser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_voice_session_latencies_in_process(tmp_path, default_model_path) -> None:
    turns, reply_tokens = 2, 4
    args = build_parser().parse_args(
        ["bench", "voice", "--turns", str(turns), "--reply-tokens", str(reply_tokens), "--piece-ms", "10",
         "--out", str(tmp_path), "--no-progress", "--model", str(default_model_path)])
    assert args.bench_run(args) == 0

    record = json.loads((tmp_path / "voice.json").read_text())
    assert record["schema_version"] >= 1 and record["mode"] == "voice" and "environment" in record
    results = record["results"]
    barge_ins = turns // 2  # every other turn: the 2nd, 4th, ...
    for variant in ("incremental", "whole_at_commit"):
        figures = results[variant]
        assert figures["first_token_ms"]["n"] == turns
        assert figures["cancel_to_last_token_ms"]["n"] == barge_ins
        assert figures["cancel_to_ack_ms"]["n"] == barge_ins
        assert figures["finish_reasons"] == ["length", "cancelled"]
        assert figures["reply_tokens"][0] == reply_tokens  # an uninterrupted reply ran to the end
        after = figures["tokens_after_cancel"]
        assert after["n"] == barge_ins and after["max"] <= 2, "the cancel stopped the reply within about a step"
        # the barge-in reply held many more tokens in reserve than it produced
        assert figures["reply_tokens"][1] <= results["barge_in_after"] + 2
        assert all(figures["first_token_ms"][k] > 0 for k in ("p50", "p90", "p99", "max"))
    assert results["live_sequences_at_end"] == 0
    assert results["server_running_at_end"] == 0 and results["server_waiting_at_end"] == 0
    assert results["engine_step_ms"]["n"] > 0
    for name in ("voice_first_token_cdf.png", "voice_cancel_cdf.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert "first token" in (tmp_path / "voice.md").read_text()


def test_unreachable_target_is_one_line_and_exit_code_2(tmp_path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    args = build_parser().parse_args(["bench", "voice", "--target", f"127.0.0.1:{port}", "--out", str(tmp_path),
                                      "--no-progress"])
    assert args.bench_run(args) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "cannot reach" in err
    assert "Traceback" not in err
    assert not (tmp_path / "voice.json").exists()
