"""Batch-1 decode on a GPU for synthetic models, torch vs triton backend, against the roofline.

    python bench/gpu_e2e.py --out $OUT

Roofline: a decode step must read every weight once plus the sequence's KV cache, so the best
possible step time is (weight bytes + KV bytes) / copy bandwidth, with the bandwidth measured in
this run (bench/kernels.py's definition: bytes read + written by a large device copy). Weight
bytes are the linear layers' (the vocabulary head included, the embedding lookup's one row not):
bf16 bytes for dense weights, the GGUF blocks' bytes for quantized ones.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# ":q4_1" models carry GGUF Q4_1 blocks: the triton backend reads them in its matmul (4-bit), while
# the torch backend, the peer, runs the same weights dequantized to bf16.
MODELS = ("synthetic:smollm2-135m", "synthetic:llama-3.2-1b", "synthetic:llama-3.2-1b:q4_1",
          "synthetic:llama-3.1-8b", "synthetic:llama-3.1-8b:q4_1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script on the CPU: one small quantized model, a few tokens, no results")
    args = parser.parse_args()
    if args.dry_run:
        args.models, args.prompt_tokens, args.new_tokens = ["synthetic:tiny:q4_1"], 4, 3
    elif not torch.cuda.is_available():
        print("bench/gpu_e2e.py needs a CUDA GPU; --dry-run checks the script on the CPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).parent))
    from kernels import ceilings

    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model
    from lockstep.runtime.sampling_params import SamplingParams

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    bandwidth = ceilings(device, args.dry_run)["copy_GBps"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = []
    for name in args.models:
        model = load_model(name)
        runs = [("torch", "dense"), ("triton", "dense")] + ([("triton", "quantized")] if model.quantized else [])
        for backend, weights in runs:
            engine = Engine(model, EngineConfig(backend=backend, device=device, kv_memory_bytes=2 << 30,
                                                weights=weights))
            prompt = list(range(1000, 1000 + args.prompt_tokens))
            params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
            engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
            sync()
            seq = engine.add_request(prompt, params)
            times = engine.run_until_done([seq])[seq.seq_id]
            decode_s = (times[-1] - times[0]) / (len(times) - 1)
            quantized = getattr(engine.runner, "quantized", None)
            w = engine.runner.w
            untied_embed = w.embed.numel() * w.embed.element_size() if w.embed is not w.lm_head else 0
            weight_bytes = quantized.nbytes() if quantized is not None else w.nbytes() - untied_embed
            kv_bytes = model.config.kv_bytes_per_token(2) * (args.prompt_tokens + args.new_tokens // 2)
            roofline_s = (weight_bytes + kv_bytes) / (bandwidth * 1e9)
            label = quantized.layers[0].wqkv.qtype if quantized is not None else str(dtype).removeprefix("torch.")
            row = {"model": name, "backend": backend, "weights": label, "decode_tok_s": 1 / decode_s,
                   "ms_per_token": 1000 * decode_s, "roofline_tok_s": 1 / roofline_s,
                   "pct_of_roofline": 100 * roofline_s / decode_s, "weight_bytes": weight_bytes}
            results.append(row)
            print(f"{name:34s} {backend:6s} {label:8s} {row['decode_tok_s']:8.1f} tok/s  "
                  f"{row['ms_per_token']:6.2f} ms  {row['pct_of_roofline']:5.1f}% of roofline "
                  f"({row['roofline_tok_s']:.0f} tok/s)", flush=True)
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
        del model
    if args.dry_run:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_e2e.json").write_text(json.dumps({"copy_GBps": bandwidth, "device": torch.cuda.get_device_name(),
                                                       "date": time.strftime("%Y-%m-%d"), "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
