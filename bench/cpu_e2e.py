"""End-to-end CPU figures for the default model: lockstep against HF transformers, same run.

Measures, at batch 1 and a fixed thread count (default 2):
  * start-up: process start to a ready engine, in a fresh process (the user's wait);
  * TTFT for a ~100-token prompt (prefill + the first token);
  * decode tok/s over 128 new tokens (EOS ignored so both make exactly 128).
HF transformers loads the same GGUF (dequantized to float32, as lockstep's torch backend does)
and decodes greedily with `generate`; a streamer timestamps each of its tokens.

lockstep runs twice: with its native CPU kernels (the default, reading the GGUF's blocks) and
with torch's float32 GEMM (--cpu-kernels torch). llama.cpp (llama-cpp-python, the `bench`
extra) decodes the same GGUF with the same threads when it is installed.

Roofline: memory bandwidth is measured in the same run (a 512 MiB float32 copy with the same
threads, bytes read + bytes written). A decode step must read every weight it uses once, plus
the KV cache at the run's mean context (float32 K/V). What a runtime reads per token depends on
its weights: the GGUF's own bytes for lockstep's native kernels and llama.cpp; the float32
weights for torch's GEMM and HF transformers (the vocabulary head included, the embedding
lookup's one row not). Each row's decode is reported as a % of its own limit.

    .venv/bin/python bench/cpu_e2e.py                 # all peers, 2 threads, 3 repeats
    .venv/bin/python bench/cpu_e2e.py --skip-hf       # lockstep only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

PROMPT = (
    "You are reading a report about the history of computing. Charles Babbage designed the "
    "Analytical Engine in the 1830s, a mechanical general-purpose computer with an arithmetic "
    "logic unit and conditional branching. Ada Lovelace wrote what is recognised as the first "
    "algorithm intended to be carried out by such a machine. Summarise the key ideas of this "
    "report and explain why they still matter:"
)

STARTUP_SNIPPET = """
import time, sys
t0 = time.perf_counter()
from lockstep.runtime.loader import load_model
from lockstep.runtime.engine import Engine
from lockstep.runtime.config import EngineConfig
engine = Engine(load_model(None, quiet=True), EngineConfig(threads={threads}))
print(time.perf_counter() - t0)
"""


def run_stamp() -> dict[str, str]:
    """When, and at which commit, a benchmark ran: the first keys of every bench's JSON."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent, check=False).stdout.strip()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": commit}


def save_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_startup(threads: int, repeats: int) -> dict:
    """Wall time from spawning `python` to a ready engine, and the part spent inside Python."""
    walls, inside = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", STARTUP_SNIPPET.format(threads=threads)],
                             capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - t0)
        inside.append(float(out.stdout.strip().splitlines()[-1]))
    return {"process_start_to_ready_s": statistics.median(walls), "import_and_load_s": statistics.median(inside)}


def timing_summary(prompt_start: float, token_times: list[float]) -> dict:
    ttft = token_times[0] - prompt_start
    decode = (len(token_times) - 1) / (token_times[-1] - token_times[0])
    return {"ttft_ms": 1000 * ttft, "decode_tok_s": decode, "new_tokens": len(token_times)}


def run_lockstep(prompt_ids: list[int], new_tokens: int, repeats: int, threads: int,
                 cpu_kernels: str = "native") -> list[dict]:
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model
    from lockstep.runtime.sampling_params import SamplingParams

    engine = Engine(load_model(None, quiet=True), EngineConfig(threads=threads, cpu_kernels=cpu_kernels))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    runs = []
    for _ in range(repeats):
        seq = engine.add_request(prompt_ids, params)
        start = seq.arrival_time
        times = engine.run_until_done([seq])[seq.seq_id]
        runs.append(timing_summary(start, times))
    return runs


def run_hf(model_path: Path, prompt_ids: list[int], new_tokens: int, repeats: int) -> tuple[float, list[dict]]:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.saw_prompt = False

        def put(self, value) -> None:
            if not self.saw_prompt:  # generate() first hands the streamer the prompt
                self.saw_prompt = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt_ids])
    runs = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
        for _ in range(repeats):
            clock = Clock()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=clock, pad_token_id=0)
            runs.append(timing_summary(start, clock.times))
    return load_s, runs


def run_llama_cpp(model_path: Path, prompt_ids: list[int], new_tokens: int, repeats: int,
                  threads: int) -> list[dict] | None:
    """llama.cpp on the same GGUF through llama-cpp-python, greedy, same threads; None if absent."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp peer skipped: llama-cpp-python is not installed "
              "(pip install llama-cpp-python; it compiles llama.cpp for several minutes)", file=sys.stderr)
        return None
    llm = Llama(model_path=str(model_path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False)

    def one_run(count: int) -> dict:
        llm.reset()
        start, times = time.perf_counter(), []
        for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):  # EOS is not checked: fixed length
            times.append(time.perf_counter())
            if len(times) == count:
                break
        return timing_summary(start, times)

    one_run(8)  # warm-up
    return [one_run(new_tokens) for _ in range(repeats)]


def measure_bandwidth(threads: int, repeats: int = 5) -> float:
    """GB/s of a large float32 copy, counting bytes read plus bytes written."""
    torch.set_num_threads(threads)
    src = torch.randn(1 << 27)  # 512 MiB, far beyond any cache
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def bytes_per_token(model, prompt_tokens: int, new_tokens: int) -> dict[str, int]:
    """Weight + KV bytes a decode step reads: {"gguf": quantized blocks, "fp32": float32 weights}."""
    import gguf

    weights = model.weights
    tied = weights.embed is weights.lm_head
    kv = model.config.kv_bytes_per_token(4) * (prompt_tokens + new_tokens // 2)
    fp32 = weights.nbytes() - weights.embed.numel() * 4 * (not tied)
    blocks = sum(int(t.n_bytes) for t in gguf.GGUFReader(model.source).tensors
                 if t.name != "token_embd.weight" or tied)
    return {"gguf": blocks + kv, "fp32": fp32 + kv}


def median_run(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true", help="measure lockstep only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_e2e.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lockstep.runtime.fetch import ensure_model
    from lockstep.runtime.loader import load_model

    model_path = ensure_model()
    model = load_model(None, quiet=True)
    tokenizer = model.tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]), add_bos=False)

    print(f"default model, {len(prompt_ids)}-token prompt, {args.new_tokens} new tokens, batch 1, "
          f"{args.threads} threads, median of {args.repeats}", file=sys.stderr)
    startup = measure_startup(args.threads, args.repeats)
    ours = median_run(run_lockstep(prompt_ids, args.new_tokens, args.repeats, args.threads))
    result = {
        **run_stamp(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "python": platform.python_version(), "torch": torch.__version__},
        "prompt_tokens": len(prompt_ids), "new_tokens": args.new_tokens,
        "lockstep": {**startup, **ours},
        "bandwidth_GBps": measure_bandwidth(args.threads),
        "bytes_per_token": bytes_per_token(model, len(prompt_ids), args.new_tokens),
    }
    del model
    rows = [("lockstep (native CPU kernels)", f"{startup['process_start_to_ready_s']:.2f}", ours, "gguf")]
    torch_gemm = median_run(run_lockstep(prompt_ids, args.new_tokens, args.repeats, args.threads, "torch"))
    result["lockstep_torch_gemm"] = torch_gemm
    rows.append(("lockstep (--cpu-kernels torch)", "", torch_gemm, "fp32"))
    llama_runs = run_llama_cpp(model_path, prompt_ids, args.new_tokens, args.repeats, args.threads)
    if llama_runs is not None:
        import llama_cpp

        llama = median_run(llama_runs)
        result["llama_cpp"] = {"version": llama_cpp.__version__, **llama}
        result["ratios_llama_cpp"] = {"decode_vs_llama_cpp": ours["decode_tok_s"] / llama["decode_tok_s"],
                                      "ttft_vs_llama_cpp": ours["ttft_ms"] / llama["ttft_ms"]}
        rows.append((f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "", llama, "gguf"))
    if not args.skip_hf:
        import transformers

        torch.set_num_threads(args.threads)  # lockstep's native engine left torch at one thread
        hf_load, hf_runs = run_hf(model_path, prompt_ids, args.new_tokens, args.repeats)
        hf = median_run(hf_runs)
        result["hf_transformers"] = {"version": transformers.__version__, "load_s": hf_load, **hf}
        result["ratios"] = {"decode_vs_hf": ours["decode_tok_s"] / hf["decode_tok_s"],
                            "ttft_vs_hf": ours["ttft_ms"] / hf["ttft_ms"]}
        rows.append((f"HF transformers {transformers.__version__}", f"{hf_load:.2f} (load only)", hf, "fp32"))

    # Prefill rate: prompt tokens over TTFT (which also holds the first token's sampling).
    bandwidth, read = result["bandwidth_GBps"], result["bytes_per_token"]
    print(f"memory bandwidth {bandwidth:.1f} GB/s (copy, read + write, {args.threads} threads); a decode step reads "
          f"{read['gguf'] / 1e6:.0f} MB as GGUF blocks, {read['fp32'] / 1e6:.0f} MB as float32 weights\n")
    print("| runtime | start-up s | TTFT ms | prefill tok/s | decode tok/s | weights read | % of bandwidth limit |\n"
          "|---|---|---|---|---|---|---|")
    for name, start, r, kind in rows:
        pct = 100 * r["decode_tok_s"] * read[kind] / (bandwidth * 1e9)
        result.setdefault("pct_of_bandwidth_limit", {})[name] = pct
        print(f"| {name} | {start} | {r['ttft_ms']:.0f} | {len(prompt_ids) / (r['ttft_ms'] / 1000):.0f} | "
              f"{r['decode_tok_s']:.1f} | {kind} | {pct:.0f}% |")
    if "ratios_llama_cpp" in result:
        r = result["ratios_llama_cpp"]
        print(f"lockstep vs llama.cpp: decode {r['decode_vs_llama_cpp']:.2f}x, TTFT {r['ttft_vs_llama_cpp']:.2f}x "
              "(lower is better)")
    if "ratios" in result:
        print(f"\nlockstep vs HF: decode {result['ratios']['decode_vs_hf']:.2f}x, "
              f"TTFT {result['ratios']['ttft_vs_hf']:.2f}x (lower is better)")
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
