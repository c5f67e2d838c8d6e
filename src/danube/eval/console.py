"""``danube chat MODEL_DIR`` (a chat model, one line per user turn) and ``danube generate MODEL PROMPT``
(a base model continues a prompt), in the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO


def chat_main(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    import torch

    from danube.eval.inference import load_for_eval
    from danube.eval.mt_bench import encode_chat
    from danube.model.generate import SamplingParams, generate

    parser = argparse.ArgumentParser(prog="danube chat", description="Chat with a model (danube or Hugging Face directory).")
    parser.add_argument("model_dir")
    parser.add_argument("--system", help="system prompt")
    _sampling_args(parser, max_new_tokens=512, repetition_penalty=1.1)  # the report's MT-Bench penalty
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


def _sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int, repetition_penalty: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus: the likeliest tokens up to this mass")
    parser.add_argument("--repetition-penalty", type=float, default=repetition_penalty,
                        help=f"transformers' meaning: > 1 makes tokens already in the text less likely; default "
                        f"{repetition_penalty}, the report's and the exported generation_config.json's (1.0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--tokenizer", help="tokenizer to use instead of the directory's own")
    parser.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:N or mps: "
                        "the values evaluate.py's device= takes")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def generate_main(argv: list[str], stdout: TextIO | None = None) -> int:
    """``danube generate MODEL PROMPT``: the prompt and its continuation, once or ``--num-samples`` times."""
    import torch

    from danube.eval.inference import load_for_eval
    from danube.model.generate import SamplingParams, generate

    parser = argparse.ArgumentParser(
        prog="danube generate",
        description="Continue a prompt with a model (danube or Hugging Face directory): greedy by default, "
        "sampled with --temperature. The prompt is encoded with BOS first, as in pretraining.",
    )
    parser.add_argument("model_dir")
    parser.add_argument("prompt", help="text to continue ('-': read it from standard input)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations to draw (sampling only)")
    _sampling_args(parser, max_new_tokens=64, repetition_penalty=1.1)  # = the export's generation_config.json
    args = parser.parse_args(argv)
    stdout = stdout or sys.stdout
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and args.temperature == 0:
        raise ValueError("--num-samples > 1 needs sampling (--temperature > 0): greedy decoding gives one answer")
    params = SamplingParams(  # checks the values before the model is loaded
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tok = load_for_eval(args.model_dir, args.tokenizer, args.device, args.dtype)
    params = SamplingParams(**{**params.__dict__, "stop_token_ids": (tok.eos_id,)})
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    ids = tok.encode(prompt, bos=True)
    outs = generate(model, [ids] * args.num_samples, params, generator=generator)
    for i, out in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---", file=stdout)
        print(prompt + tok.decode(out), file=stdout, flush=True)
    return 0
