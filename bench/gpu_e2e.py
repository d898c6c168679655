"""Batch-1 decode on a GPU for synthetic models, torch vs triton backend, against the roofline.

    python bench/gpu_e2e.py --out $OUT

Roofline: a decode step must read every weight once plus the sequence's KV cache, so the best
possible step time is (weight bytes + KV bytes) / copy bandwidth, with the bandwidth measured in
this run (bench/kernels.py's definition: bytes read + written by a large device copy).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

MODELS = ("synthetic:smollm2-135m", "synthetic:llama-3.2-1b", "synthetic:llama-3.1-8b")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_e2e.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).parent))
    from kernels import ceilings

    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model
    from lockstep.runtime.sampling_params import SamplingParams

    bandwidth = ceilings("cuda", False)["copy_GBps"]
    results = []
    for name in args.models:
        model = load_model(name)
        for backend in ("torch", "triton"):
            engine = Engine(model, EngineConfig(backend=backend, device="cuda", kv_memory_bytes=2 << 30))
            prompt = list(range(1000, 1000 + args.prompt_tokens))
            params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
            engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
            torch.cuda.synchronize()
            seq = engine.add_request(prompt, params)
            times = engine.run_until_done([seq])[seq.seq_id]
            decode_s = (times[-1] - times[0]) / (len(times) - 1)
            weight_bytes = engine.runner.w.nbytes()
            kv_bytes = model.config.kv_bytes_per_token(2) * (args.prompt_tokens + args.new_tokens // 2)
            roofline_s = (weight_bytes + kv_bytes) / (bandwidth * 1e9)
            row = {"model": name, "backend": backend, "dtype": "bf16", "decode_tok_s": 1 / decode_s,
                   "ms_per_token": 1000 * decode_s, "roofline_tok_s": 1 / roofline_s,
                   "pct_of_roofline": 100 * roofline_s / decode_s, "weight_bytes": weight_bytes}
            results.append(row)
            print(f"{name:28s} {backend:6s} {row['decode_tok_s']:8.1f} tok/s  {row['ms_per_token']:6.2f} ms  "
                  f"{row['pct_of_roofline']:5.1f}% of roofline ({row['roofline_tok_s']:.0f} tok/s)", flush=True)
            del engine
            torch.cuda.empty_cache()
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_e2e.json").write_text(json.dumps({"copy_GBps": bandwidth, "device": torch.cuda.get_device_name(),
                                                       "date": time.strftime("%Y-%m-%d"), "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
