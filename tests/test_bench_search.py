"""`lockstep bench search` end to end on the default model, through the real command line.

Never timed: the checks are counts the test works out for itself (tokens made, KV blocks a
forked family must hold given the prompt length and block size) and the files a run writes."""
from __future__ import annotations

import json

from lockstep.runtime.cli import build_parser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BRANCHES, PROMPT, NEW = (1, 2, 4), 40, 4


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def test_search_reports_forked_and_independent_branches(tmp_path, default_model_path) -> None:
    args = build_parser().parse_args(
        ["bench", "search", "--branches", *map(str, BRANCHES), "--new-tokens", str(NEW), "--prompt-tokens",
         str(PROMPT), "--out", str(tmp_path), "--no-progress", "--model", str(default_model_path)])
    assert args.bench_run(args) == 0

    record = json.loads((tmp_path / "search.json").read_text())
    assert record["schema_version"] >= 1 and record["mode"] == "search"
    assert {"date", "machine", "versions", "git_commit"} <= set(record["environment"])
    results = record["results"]
    bs = results["block_size"]
    rows = {r["branches"]: r for r in results["rows"]}
    assert sorted(rows) == list(BRANCHES)
    for b, row in rows.items():
        forked, independent = row["forked"], row["independent"]
        for variant in (forked, independent):
            assert variant["generated_tokens"] == b * NEW
            # every sequence ended and gave its blocks back
            assert variant["live_sequences_after"] == 0 and variant["kv_sequences_after"] == 0
            assert variant["kv_blocks_in_use_after"] == 0
            assert variant["elapsed_s"] > 0 and variant["branches_per_s"] > 0
        # The branches decode together: one step per token.
        assert forked["steps"] == NEW
        assert (forked["fork_call_us"] is None) == (b == 1)
        # The family shares the prompt's full blocks before its last token (recomputed by each
        # branch at commit); each branch owns the rest: the last partial prompt block and its output.
        shared = (PROMPT - 1) // bs
        own = ceil_div(PROMPT + NEW - 1, bs) - shared
        assert forked["peak_kv_blocks"] == shared + b * own
        private_copy = ceil_div(PROMPT + NEW - 1, bs)  # prompt + all but the last token's K/V
        assert ceil_div(PROMPT, bs) <= independent["peak_kv_blocks"] <= b * private_copy
        assert row["unshared_kv_blocks"] == b * private_copy
        if b > 1:
            assert forked["peak_kv_blocks"] < independent["peak_kv_blocks"]

    for name in ("search_branches_per_s.png", "search_step_ms.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    markdown = (tmp_path / "search.md").read_text()
    for b in BRANCHES:
        assert sum(line.startswith(f"| {b} |") for line in markdown.splitlines()) == 1
