"""`lockstep bench compare`: lockstep against its peers on the default model, in one run, with
the same prompt, the same token counts and the same threads.

Runtimes, each at batch 1, greedy, EOS ignored so every one makes exactly --new-tokens tokens:
  * lockstep with its native CPU kernels (the default: they read the GGUF's blocks);
  * lockstep with torch's float32 GEMM (--cpu-kernels torch), to show what the kernels buy;
  * HF transformers loading the same GGUF (dequantized to float32), `generate` with a streamer
    that timestamps each token;
  * llama.cpp on the same GGUF through llama-cpp-python (the `bench` extra; it compiles llama.cpp
    for several minutes, so it is often absent: the run then says so and goes on).
Figures per runtime (median of --repeats runs after a warm-up): TTFT for the ~100-token chat
prompt (prefill plus the first token), decode tok/s over the remaining tokens, inter-token
latencies, and lockstep's start-up (a fresh process to a ready engine). Decode is also shown as a %
of the bandwidth roofline measured in the same run: bytes a decode step reads (each runtime's own
weights as it reads them: GGUF blocks for lockstep's kernels and llama.cpp, float32 for torch's
GEMM and HF; plus the KV cache at the run's mean context) ÷ copy bandwidth (read + write).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HELP = "lockstep against HF transformers and llama.cpp on the default model: same prompt, tokens and threads."
EXAMPLES = """examples:
  lockstep bench compare                          # every peer that is installed, 2 threads, 3 repeats
  lockstep bench compare --peers hf --repeats 5
  lockstep bench compare --peers none             # lockstep alone (its two CPU matmul paths)
  pip install 'lockstep[bench]'                   # adds llama-cpp-python (compiles llama.cpp, minutes)
"""

PROMPT = (
    "You are reading a report about the history of computing. Charles Babbage designed the "
    "Analytical Engine in the 1830s, a mechanical general-purpose computer with an arithmetic "
    "logic unit and conditional branching. Ada Lovelace wrote what is recognised as the first "
    "algorithm intended to be carried out by such a machine. Summarise the key ideas of this "
    "report and explain why they still matter:"
)
PEERS = ("hf", "llama.cpp")
# Targets on the 2-core CPU machine (issue 7): decode >= 2x HF transformers, TTFT <= 1x.
TARGETS = {"hf": {"decode": 2.0, "ttft": 1.0}}

STARTUP_SNIPPET = """
import time
t0 = time.perf_counter()
from lockstep.runtime.loader import load_model
from lockstep.runtime.engine import Engine
from lockstep.runtime.config import EngineConfig
engine = Engine(load_model(None, quiet=True), EngineConfig(threads={threads}))
print(time.perf_counter() - t0)
"""


class PeerUnavailable(Exception):
    """A peer that cannot run here; its message says why and how to get it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens each runtime generates (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per runtime, after a warm-up (default: 3)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=(*PEERS, "none"),
                        help="peers to measure (default: hf llama.cpp; 'none' for lockstep alone)")
    parser.add_argument("--skip-startup", action="store_true", help="do not time lockstep's start-up")


def timing(start: float, token_times: list[float]) -> dict:
    """TTFT, decode rate and inter-token gaps of one run from its token arrival times."""
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return {"ttft_ms": 1000 * (token_times[0] - start), "decode_tok_s": len(gaps) / sum(gaps),
            "new_tokens": len(token_times), "itl_s": gaps}


def median_of(runs: list[dict]) -> dict:
    return {"ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "new_tokens": runs[0]["new_tokens"], "runs": len(runs)}


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


def run_lockstep(model, prompt_ids: list[int], new_tokens: int, repeats: int, threads: int,
                 cpu_kernels: str) -> tuple[list[dict], dict]:
    """lockstep's engine on the loaded model; returns the runs, the weight bytes a step reads and
    the prefix-cache hits (0: every run prefilled its whole prompt)."""
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.sampling_params import SamplingParams

    from .roofline import weight_bytes_read

    # No prefix cache: every run repeats the same prompt, and a cache hit would skip the prefill
    # the peers all do (HF keeps no cache between calls; llama.cpp is reset before each run).
    engine = Engine(model, EngineConfig(threads=threads, cpu_kernels=cpu_kernels, prefix_cache=False))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    runs = []
    for _ in range(repeats):
        seq = engine.add_request(prompt_ids, params)
        times = engine.run_until_done([seq])[seq.seq_id]
        runs.append(timing(seq.arrival_time, times))
    return runs, {"weight_bytes": weight_bytes_read(engine), "prefix_cache_hits": engine.kv.allocator.prefix_hits()}


def run_hf(model_path: Path, prompt_ids: list[int], new_tokens: int, repeats: int,
           threads: int) -> tuple[list[dict], dict]:
    try:
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer
    except ImportError:
        raise PeerUnavailable("HF transformers is not installed (pip install transformers accelerate, or "
                              "pip install 'lockstep[bench]')") from None
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
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
            runs.append(timing(start, clock.times))
    # float32 weights a step reads: every parameter but an untied embedding (one row per token)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    untied = embed.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    weight_bytes = params - (embed.numel() * embed.element_size() if untied else 0)
    return runs, {"version": transformers.__version__, "load_s": load_s, "weight_bytes": weight_bytes}


def run_llama_cpp(model_path: Path, prompt_ids: list[int], new_tokens: int, repeats: int,
                  threads: int) -> tuple[list[dict], dict]:
    try:
        import llama_cpp
    except ImportError:
        raise PeerUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python, or "
                              "pip install 'lockstep[bench]'; it compiles llama.cpp for several minutes)") from None
    import gguf

    llm = llama_cpp.Llama(model_path=str(model_path), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                          n_batch=512, verbose=False)

    def one_run(count: int) -> dict:
        llm.reset()
        start, times = time.perf_counter(), []
        for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):  # EOS is not checked: fixed length
            times.append(time.perf_counter())
            if len(times) == count:
                break
        return timing(start, times)

    one_run(8)  # warm-up
    runs = [one_run(new_tokens) for _ in range(repeats)]
    tensors = gguf.GGUFReader(model_path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    weight_bytes = sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or tied)
    return runs, {"version": llama_cpp.__version__, "weight_bytes": weight_bytes}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lockstep.runtime.fetch import ensure_model
    from lockstep.runtime.loader import load_model

    from . import plots
    from .report import markdown_table, write_report
    from .roofline import measure_bandwidth
    from .stats import summary

    if args.threads < 1 or args.new_tokens < 2 or args.repeats < 1:
        print("lockstep bench compare: --threads and --repeats must be >= 1, --new-tokens >= 2", file=sys.stderr)
        return 2
    peers = [] if "none" in args.peers else list(dict.fromkeys(args.peers))
    model_path = ensure_model()
    model = load_model(None, quiet=True)
    tokenizer = model.tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]), add_bos=False)
    kv_per_token = model.config.kv_bytes_per_token(4)  # every runtime here keeps float32 (or f16) K/V
    kv_bytes = kv_per_token * (len(prompt_ids) + args.new_tokens / 2)
    print(f"default model, {len(prompt_ids)}-token prompt, {args.new_tokens} new tokens, batch 1, {args.threads} "
          f"threads, median of {args.repeats}", file=sys.stderr)

    runtimes: dict[str, dict] = {}
    itl_ms: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    jobs = [("lockstep", "native"), ("lockstep --cpu-kernels torch", "torch"), *[(p, p) for p in peers]]
    bar = tqdm(jobs, desc="runtimes", disable=args.no_progress, file=sys.stderr)
    for name, kind in bar:
        bar.set_postfix_str(name)
        try:
            if kind in ("native", "torch"):
                runs, info = run_lockstep(model, prompt_ids, args.new_tokens, args.repeats, args.threads, kind)
            elif kind == "hf":
                runs, info = run_hf(model_path, prompt_ids, args.new_tokens, args.repeats, args.threads)
                name = f"HF transformers {info['version']}"
            else:
                runs, info = run_llama_cpp(model_path, prompt_ids, args.new_tokens, args.repeats, args.threads)
                name = f"llama.cpp (llama-cpp-python {info['version']})"
        except PeerUnavailable as exc:
            skipped[kind] = str(exc)
            print(f"{kind} peer skipped: {exc}", file=sys.stderr)
            continue
        runtimes[name] = {"peer": kind, **info, **median_of(runs),
                          "itl_ms": summary(g for r in runs for g in r["itl_s"])}
        itl_ms[name] = [1000 * g for r in runs for g in r["itl_s"]]

    bandwidth = measure_bandwidth("cpu", args.threads)
    for r in runtimes.values():
        r["bytes_per_token"] = r["weight_bytes"] + kv_bytes
        r["pct_of_roofline"] = 100 * r["decode_tok_s"] * r["bytes_per_token"] / (bandwidth * 1e9)
        r["prefill_tok_s"] = len(prompt_ids) / (r["ttft_ms"] / 1000)
    ours = runtimes["lockstep"]
    if not args.skip_startup:
        ours.update(measure_startup(args.threads, args.repeats))
    ratios = {}
    for name, r in runtimes.items():
        if r["peer"] in PEERS:
            ratios[r["peer"]] = {"runtime": name, "decode_x": ours["decode_tok_s"] / r["decode_tok_s"],
                                 "ttft_x": ours["ttft_ms"] / r["ttft_ms"], "targets": TARGETS.get(r["peer"])}
    results = {"model": str(model_path), "prompt_tokens": len(prompt_ids), "new_tokens": args.new_tokens,
               "threads": args.threads, "repeats": args.repeats, "bandwidth_GBps": bandwidth,
               "kv_bytes_per_token": kv_per_token, "runtimes": runtimes, "ratios": ratios, "skipped": skipped}

    table = markdown_table(
        ["runtime", "TTFT ms", "prefill tok/s", "decode tok/s", "ITL p50 ms", "ITL p99 ms", "MB read / token",
         "% of roofline"],
        [[name, r["ttft_ms"], r["prefill_tok_s"], r["decode_tok_s"], r["itl_ms"]["p50"], r["itl_ms"]["p99"],
          r["bytes_per_token"] / 1e6, r["pct_of_roofline"]] for name, r in runtimes.items()])
    if ratios:
        table += "\n" + markdown_table(
            ["lockstep vs", "decode (higher is better)", "TTFT (lower is better)", "target"],
            [[v["runtime"], f"{v['decode_x']:.2f}x", f"{v['ttft_x']:.2f}x",
              f"decode >= {v['targets']['decode']}x, TTFT <= {v['targets']['ttft']}x" if v["targets"] else "report"]
             for v in ratios.values()])
    if "process_start_to_ready_s" in ours:
        table += (f"\nlockstep start-up: {ours['process_start_to_ready_s']:.2f} s from process start to a ready "
                  f"engine ({ours['import_and_load_s']:.2f} s of it importing and loading).\n")
    for kind, why in skipped.items():
        table += f"\n{kind}: skipped, {why}\n"
    table += (f"\nBandwidth {bandwidth:.1f} GB/s (copy, read + write, {args.threads} threads); K/V "
              f"{kv_per_token / 1e3:.1f} kB per token, counted at the mean context.\n")
    paths = write_report(args.out, "compare", results, table)
    plots.bars(args.out / "compare_decode.png", {n: r["decode_tok_s"] for n, r in runtimes.items()},
               "batch-1 decode, default model", "tokens/s")
    plots.roofline_bars(args.out / "compare_roofline.png", {n: r["pct_of_roofline"] for n, r in runtimes.items()},
                        "decode as % of the bandwidth roofline")
    plots.latency_cdf(args.out / "compare_itl_cdf.png", itl_ms, "inter-token latency, batch 1")
    print(table)
    print(f"wrote {paths['json']}, {paths['markdown']} and plots in {args.out}", file=sys.stderr)
    return 0
