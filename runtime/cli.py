"""The `lockstep` command line: generate, chat, serve, bench, plan and fetch.

Every command works with no flags on the default model. Errors a user can act on are printed
as one line and exit non-zero; no traceback reaches the terminal.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

from .errors import LockstepError

log = logging.getLogger("lockstep")

EXAMPLES = {
    "generate": """examples:
  lockstep generate "Write a haiku about the sea."
  lockstep generate --raw --max-tokens 64 --temperature 0 "The capital of France is"
  lockstep generate --model ./model.gguf --seed 7 --stop "\\n\\n" "List three colours:"
""",
    "chat": """examples:
  lockstep chat
  lockstep chat --system "You answer in one sentence." --temperature 0.7
commands inside the chat: /reset clears the history, /exit (or Ctrl-D) quits,
Ctrl-C stops the reply being written.
""",
    "serve": """examples:
  lockstep serve                                  # OpenAI-compatible HTTP on 127.0.0.1:8000
  lockstep serve --port 9000 --api-key s3cret     # or LOCKSTEP_API_KEY=s3cret
  lockstep serve --strict-requests --log-requests # 400 for unknown fields; log prompts and outputs
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'
""",
    "plan": """examples:
  lockstep plan                       # the default model's memory plan and step-program costs
  lockstep plan --kv-memory 4GiB --max-num-seqs 32
  lockstep plan --calibrate           # time every step program again instead of using the cached table
  lockstep plan --json                # the same, as JSON
""",
    "fetch": """examples:
  lockstep fetch                      # download and verify the default model into the cache
  LOCKSTEP_HOME=/data/lockstep lockstep fetch
""",
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1.5GB' or a byte count -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 512MiB or 2GiB")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="a .gguf file, an HF model directory, or synthetic:llama-3.2-1b / synthetic:llama-3.1-8b "
                        "(random weights, for benchmarks) (default: SmolLM2-135M-Instruct Q4_1, fetched on first use)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--kv-memory", type=parse_size, default=parse_size("1GiB"),
                   help="memory for the KV cache arena (default: 1GiB)")
    g.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + output tokens")
    g.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="forward implementation: torch (reference) or triton (lockstep's kernels); "
                        "auto = triton on CUDA, torch on the CPU")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    g.add_argument("--attention", choices=("triton", "cuda"), default="triton",
                   help="decode attention of the triton backend: Triton, or hand-written CUDA C++ (needs cupy)")
    g.add_argument("--weights", choices=("auto", "quantized", "dense"), default="auto",
                   help="triton backend linear layers: GGUF Q8_0/Q4_0/Q4_1 blocks dequantized in the kernel, "
                        "or float weights (auto: quantized on CUDA for such a GGUF)")
    g.add_argument("--cpu-kernels", choices=("native", "torch"), default="native",
                   help="torch backend matmuls on the CPU: lockstep's C++ kernel on the GGUF's blocks "
                        "(batch-invariant), or torch's float GEMM")
    g.add_argument("--max-num-seqs", type=int, default=64,
                   help="most sequences in one step; decode buckets are 1, 2, 4, ... up to it (default: 64)")
    g.add_argument("--max-batched-tokens", type=int, default=256,
                   help="token rows of the largest step program (default: 256)")
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help="most prompt tokens one step takes (default: --max-batched-tokens)")
    g.add_argument("--itl-target-ms", type=float, default=50.0,
                   help="inter-token latency kept for interactive requests; batch work is held back "
                        "to meet it (default: 50)")
    g.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not share KV blocks between requests with a common prompt prefix")
    g.add_argument("--no-held-logits", dest="held_logits", action="store_false",
                   help="do not keep a prefill-only sequence's last logits; commit computes its last token "
                        "again (saves --max-num-seqs rows of the vocabulary in float32)")
    g.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                   help="launch each step before taking in the step before's tokens, and take them in and make "
                        "their outputs while the device runs it; auto: on CUDA, where the forward runs "
                        "asynchronously (on the CPU it would hold each token back a step)")
    g.add_argument("--calibrate", dest="calibrate", action="store_const", const="measure", default="auto",
                   help="time every step program at start-up, even if this machine has a cached cost table")
    g.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=0.2,
                   help="0 is greedy (default: 0.2, the default model's recommendation)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top one")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lockstep", description="lockstep: a latency-first LLM inference runtime.",
        epilog="run `lockstep COMMAND --help` for a command's options and examples",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    gen = command("generate", "Generate a reply to one prompt, streamed to stdout as it comes.")
    gen.add_argument("prompt", help="the prompt (read from stdin if it is '-')")
    gen.add_argument("--raw", action="store_true", help="complete the text as-is, without the chat template")
    gen.add_argument("--system", default=None, help="a system message (chat template only)")
    gen.add_argument("--quiet", action="store_true", help="do not print timing figures to stderr")
    _add_sampling_args(gen)
    add_model_args(gen)

    chat = command("chat", "An interactive chat that keeps the conversation's history.")
    chat.add_argument("--system", default=None, help="a system message for the conversation")
    _add_sampling_args(chat)
    add_model_args(chat)

    serve = command("serve", "Serve the model over the OpenAI-compatible HTTP API, with /metrics.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("LOCKSTEP_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' (default: $LOCKSTEP_API_KEY, else none)")
    serve.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (default: 50051)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests that may wait for a seat; beyond it, 429 (default: 256)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: file name)")
    serve.add_argument("--strict-requests", action="store_true",
                       help="answer 400 to request fields lockstep does not know (default: ignore them)")
    serve.add_argument("--log-requests", action="store_true",
                       help="log each request's prompt, parameters and output (default: never logged)")
    add_model_args(serve)

    plan = command("plan", "Print the static plan: memory regions, KV capacity and each step program's cost.")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_model_args(plan)

    from lockstep.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)

    fetch = command("fetch", "Download and verify the default model into lockstep's cache.")
    fetch.add_argument("--quiet", action="store_true", help="print only the model's path")
    return parser


def engine_from_args(args: argparse.Namespace):
    from .config import EngineConfig
    from .engine import Engine
    from .loader import load_model

    model = load_model(args.model)
    return Engine(model, EngineConfig(kv_memory_bytes=args.kv_memory, max_model_len=args.max_model_len,
                                      threads=args.threads, backend=args.backend, device=args.device,
                                      attention=args.attention, weights=args.weights,
                                      cpu_kernels=args.cpu_kernels, max_num_seqs=args.max_num_seqs,
                                      max_batched_tokens=args.max_batched_tokens,
                                      prefill_chunk=args.prefill_chunk, itl_target_ms=args.itl_target_ms,
                                      prefix_cache=args.prefix_cache, held_logits=args.held_logits,
                                      calibrate=args.calibrate, overlap=args.overlap)), model


def _params(args: argparse.Namespace):
    from .sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=list(args.stop))


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = _params(args)  # checked before the model loads: bad flags fail fast
    t_start = time.perf_counter()
    engine, model = engine_from_args(args)
    if args.raw:
        ids = engine.tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = engine.encode_chat(messages)
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for out in engine.stream(ids, params):
        if out.token_id is not None:
            n += 1
            last = time.perf_counter()
            first = first or last
        if out.text:
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet and first is not None:
        decode = f", {(n - 1) / (last - first):.1f} tok/s decode" if n > 1 and last > first else ""
        print(f"[lockstep] {len(ids)} prompt tokens, {n} generated; load {model.load_s:.2f} s, "
              f"TTFT {1000 * (first - t0):.0f} ms{decode}; total {time.perf_counter() - t_start:.1f} s",
              file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    engine, model = engine_from_args(args)
    print(f"lockstep chat: {model.source.name} ({model.config.num_layers} layers), loaded in "
          f"{model.load_s:.1f} s. /reset clears the history, /exit quits.", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = engine.encode_chat(system + history)
            log.info("turn %d: %d prompt tokens from %d messages", (len(history) + 1) // 2, len(ids),
                     len(system) + len(history))
            reply = []
            try:
                for out in engine.stream(ids, params):
                    if out.text:
                        reply.append(out.text)
                        sys.stdout.write(out.text)
                        sys.stdout.flush()
            except KeyboardInterrupt:
                # Barge-in: the reply so far stays in the history; the sequence is cancelled.
                sys.stdout.write(" [stopped]")
            print()
            history.append({"role": "assistant", "content": "".join(reply)})
        except LockstepError as exc:
            history.pop()
            print(f"lockstep: error: {exc}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    engine, model = engine_from_args(args)
    name = args.served_model_name or model.source.name
    return serve(engine, name, host=args.host, port=args.port, api_key=args.api_key, max_waiting=args.max_waiting,
                 grpc_port=args.grpc_port, strict=args.strict_requests,
                 log_requests=args.log_requests)


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan_report import plan_json, plan_text

    engine, model = engine_from_args(args)
    print(json.dumps(plan_json(engine), indent=1) if args.json else plan_text(engine, model.source.name))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lockstep.bench.cli import run

    return run(args)


def cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import ensure_model

    path = ensure_model(quiet=args.quiet)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="lockstep: %(message)s")
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "plan": cmd_plan,
                "fetch": cmd_fetch, "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except LockstepError as exc:
        print(f"lockstep: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
