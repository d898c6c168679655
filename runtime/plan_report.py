"""`lockstep plan`: an engine's static plan as a table (or JSON) a user can read.

It shows what start-up decided: the memory regions, what the KV arena holds, the step
programs and the measured cost of each (runtime/memory_plan.py, runtime/cost_model.py).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .cost_model import covered_pairs
from .memory_plan import human_bytes


def plan_json(engine) -> dict:
    plan, costs = engine.memory_plan, engine.costs
    return {
        "device": str(engine.device), "backend": engine.backend,
        "regions": [asdict(r) for r in plan.regions.values()],
        "total_bytes": plan.total_bytes,
        "resident_bytes": resident_bytes(),
        "capacity": {**plan.capacity, "max_model_len": engine.max_model_len},
        "programs": [
            {"name": p.name, "kind": p.kind, "rows": p.num_tokens, "seqs": p.num_seqs,
             "seconds": None if costs is None else costs.base_s[p.name], "timed_pairs": covered_pairs(p)}
            for p in engine.ladder.programs
        ],
        "cost_table": None if costs is None else {
            "source": costs.source, "measured_at": costs.measured_at, "key": costs.key,
            "attention_s_per_pair": costs.attention_s_per_pair, "notes": costs.notes,
        },
    }


def plan_text(engine, model_name: str) -> str:
    plan, costs, cap = engine.memory_plan, engine.costs, engine.memory_plan.capacity
    lines = [f"lockstep plan: {model_name} on {engine.device} ({engine.backend} backend)", "",
             "memory (allocated once, at start-up)", plan.format(), "",
             f"KV arena: {cap['kv_tokens']} tokens in {cap['kv_blocks']} blocks of {cap['block_size']}, "
             f"plus {cap['scratch_blocks']} scratch block for padded rows; up to {cap['max_num_seqs']} sequences "
             f"of at most {engine.max_model_len} tokens",
             f"workspace: {cap['workspace_rows']} token rows, {cap['workspace_seqs']} sequences of "
             f"{cap['max_blocks_per_seq']} blocks (the largest step program)", ""]
    if costs is None:
        lines.append("step programs (no cost table: --calibrate off)")
    else:
        lines.append(f"step programs (cost table {costs.source}, measured {costs.measured_at})")
    header = ("program", "rows", "seqs", "ms", "tokens/s")
    rows = [header]
    for p in engine.ladder.programs:
        if costs is None:
            rows.append((p.name, str(p.num_tokens), str(p.num_seqs), "-", "-"))
        else:
            s = costs.base_s[p.name]
            rows.append((p.name, str(p.num_tokens), str(p.num_seqs), f"{1e3 * s:.2f}", f"{p.num_tokens / s:,.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if costs is not None:
        lines.append(f"attention beyond the timed context: {1e9 * costs.attention_s_per_pair:.2f} ns per "
                     f"query-key pair (decode[1] at {costs.long_context} tokens)")
        lines.extend(f"note: {n}" for n in costs.notes)
    lines.append(f"total planned memory: {human_bytes(plan.total_bytes)}")
    resident = resident_bytes()
    if resident is not None:
        lines.append(f"process resident memory after start-up: {human_bytes(resident)} (planned pages not yet "
                     "touched, such as most of a fresh KV arena, are not resident)")
    return "\n".join(lines)


def resident_bytes() -> int | None:
    """This process's resident set (VmRSS) from /proc, or None where there is no /proc (not Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return None if kib is None else int(kib) * 1024
