"""``danube chat MODEL_DIR``: talk to a chat model in the terminal (one line per user turn)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO


def chat_main(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    import torch

    from danube.eval.loading import load_for_eval
    from danube.eval.mt_bench import encode_chat
    from danube.model.generate import SamplingParams, generate

    parser = argparse.ArgumentParser(prog="danube chat", description="Chat with a model (danube or Hugging Face directory).")
    parser.add_argument("model_dir")
    parser.add_argument("--tokenizer", help="tokenizer to use instead of the directory's own")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    model, tok = load_for_eval(args.model_dir, args.tokenizer, args.device, args.dtype)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop_token_ids=(tok.eos_id,),
    )
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = stdin.isatty()
    print("danube chat: /reset clears the conversation, /exit (or end of input) quits.", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(start)
            print("(conversation cleared)", file=stdout)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        out = generate(model, [encode_chat(tok, history)], params, decode=tok.decode, generator=generator)[0]
        answer = tok.decode(out).strip()
        history.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}", file=stdout, flush=True)
    return 0
