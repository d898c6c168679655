"""Writes tests/goldens/smollm2_135m_hf.json: HF transformers' outputs on the default model.

HF transformers, loading the same GGUF in float32 with eager attention, is lockstep's
independent numerical reference. This script runs it once and commits what it saw, so the
golden tests need no 20-second HF load. Re-run it when a case is added:

    .venv/bin/python tests/make_goldens.py

For each chat case it records the chat-templated prompt ids (HF's template and tokenizer),
the first 32 greedy tokens, the logprob of each of those tokens, and the logprob of every
prompt token given the ones before it. lockstep's own tokenizer, template, forward and
sampler are checked against these numbers; nothing here comes from lockstep.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "goldens" / "smollm2_135m_hf.json"
NEW_TOKENS = 32

_LONG_CONTEXT = (
    "The Apollo program was the third United States human spaceflight program carried out by NASA, "
    "which succeeded in preparing and landing the first humans on the Moon from 1968 to 1972. It was "
    "first conceived in 1960 during President Dwight D. Eisenhower's administration as a three-person "
    "spacecraft to follow the one-person Project Mercury, which put the first Americans in space. "
    "Apollo was later dedicated to President John F. Kennedy's national goal for the 1960s of landing "
    "a man on the Moon and returning him safely to the Earth in an address to Congress on May 25, 1961. "
    "It was the third US human spaceflight program to fly, preceded by the two-person Project Gemini "
    "conceived in 1961 to extend spaceflight capability in support of Apollo. Kennedy's goal was "
    "accomplished on the Apollo 11 mission when astronauts Neil Armstrong and Buzz Aldrin landed their "
    "Apollo Lunar Module on July 20, 1969, and walked on the lunar surface, while Michael Collins "
    "remained in lunar orbit in the command and service module, and all three landed safely on Earth "
    "in the Pacific Ocean on July 24. Five subsequent Apollo missions also landed astronauts on the "
    "Moon, the last, Apollo 17, in December 1972. In these six spaceflights, twelve people walked on "
    "the Moon. Apollo ran from 1961 to 1972, with the first crewed flight in 1968. It encountered a "
    "major setback in 1967 when an Apollo 1 cabin fire killed the entire crew during a prelaunch test."
)

CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "Hi! Who are you?"},
     {"role": "assistant", "content": "I am a helpful AI assistant."},
     {"role": "user", "content": "Tell me one fun fact about octopuses."}],
    [{"role": "user", "content": "Translate to French: 'The weather is lovely today, let us go for a walk.'"}],
    [{"role": "user", "content": _LONG_CONTEXT + "\n\nSummarise the text above in two sentences."}],
]

TOKENIZER_STRINGS = [
    "Hello, world!", "  leading and trailing spaces  ", "naïve café — déjà vu", "日本語のテキスト",
    "emoji 🚀🔥 mixed", "def f(x):\n\treturn x**2  # square", "1234567890 3.14159 -42",
    "<|im_start|>user\nhi<|im_end|>", "multiple\n\n\nnewlines", "UPPER lower MiXeD",
]


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lockstep.runtime.fetch import ensure_model

    path = ensure_model()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    print(f"HF load: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    cases = []
    for messages in CASES:
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
        prompt_ids = [int(t) for t in prompt_ids]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.eos_token_id)
            greedy = [int(t) for t in out[0, len(prompt_ids):]]
            # Teacher-forced: one forward over prompt + greedy tokens gives every logprob.
            ids = torch.tensor([prompt_ids + greedy])
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        targets = ids[0, 1:]
        per_token = logprobs[:-1].gather(1, targets[:, None])[:, 0]
        # Gap between the best and second-best logit at each greedy step: where it is tiny,
        # rounding differences may legitimately flip argmax, and the test says so.
        top2 = logprobs[len(prompt_ids) - 1:-1].topk(2, dim=-1).values
        cases.append({
            "messages": messages,
            "prompt_text": tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            "prompt_ids": prompt_ids,
            "greedy_ids": greedy,
            "greedy_text": tokenizer.decode(greedy, skip_special_tokens=True),
            "token_logprobs": [float(x) for x in per_token[len(prompt_ids) - 1:]],
            "prompt_logprobs": [float(x) for x in per_token[:len(prompt_ids) - 1]],
            "top2_gaps": [float(x) for x in (top2[:, 0] - top2[:, 1])],
        })
        print(f"{len(prompt_ids):4d} prompt tokens -> {cases[-1]['greedy_text']!r}", file=sys.stderr)

    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "model": path.name,
        "reference": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
                     "GGUF dequantized to float32, eager attention",
        "new_tokens": NEW_TOKENS,
        "cases": cases,
        "tokenizer_cases": [{"text": s, "ids": tokenizer.encode(s, add_special_tokens=False)}
                            for s in TOKENIZER_STRINGS],
    }, indent=1))
    print(f"wrote {GOLDEN}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
