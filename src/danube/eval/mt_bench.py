"""MT-Bench: answer both turns with the chat template; optionally judge with an LLM; tabulate.

Answers are written in FastChat's ``model_answer`` JSONL format, so FastChat's own
``gen_judgment.py`` can grade them exactly as the report did (GPT-4). The built-in judge
is a convenience for any OpenAI-compatible endpoint: it asks for a 1-10 rating written
as ``[[N]]`` and tabulates mean scores per category and turn (the report's Table 3).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from danube.data.chat import encode_chat_prompt
from danube.data.records import read_jsonl
from danube.eval.inference import TextTokenizer
from danube.model import Danube
from danube.model.generate import SamplingParams, generate

log = logging.getLogger(__name__)

def encode_chat(tok: TextTokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The generation prompt: ``apply_chat_template(messages, add_generation_prompt=True)`` of the export."""
    return encode_chat_prompt(tok, messages)


def load_questions(path: str | Path, skip_categories: Iterable[str] = ("coding",)) -> list[dict[str, Any]]:
    """FastChat ``question.jsonl``: ``{question_id, category, turns: [str, ...]}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MT-Bench questions not found: {path} (FastChat's data/mt_bench/question.jsonl)")
    skip = {c.lower() for c in skip_categories}
    questions, skipped = [], 0
    for lineno, q in read_jsonl(path):  # names the line of bad JSON or bytes that are not UTF-8
        if not (q.get("question_id") is not None and isinstance(q.get("turns"), list) and q["turns"]
                and all(isinstance(t, str) for t in q["turns"])):
            raise ValueError(f"{path}:{lineno}: expected {{question_id, category, turns: [str, ...]}}")
        if str(q.get("category", "")).lower() in skip:
            skipped += 1
            continue
        questions.append(q)
    log.info("%s: %d questions (%d skipped: categories %s)", path, len(questions), skipped, sorted(skip))
    return questions


def answer_questions(
    model: Danube,
    tok: TextTokenizer,
    questions: list[dict[str, Any]],
    model_id: str,
    params: SamplingParams,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Answer every turn; turn k+1 sees the model's own answers to turns 1..k.

    Questions are batched per turn, longest prompt first.
    """
    params = SamplingParams(**{**params.__dict__, "stop_token_ids": tuple({*params.stop_token_ids, tok.eos_id})})
    history = [[{"role": "system", "content": system_prompt}] if system_prompt else [] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        todo = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        for i in todo:
            history[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        prompts = {i: encode_chat(tok, history[i]) for i in todo}
        todo.sort(key=lambda i: -len(prompts[i]))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            outs = generate(model, [prompts[i] for i in chunk], params, decode=tok.decode, pad_id=tok.eos_id)
            for i, out in zip(chunk, outs):
                text = tok.decode(out).strip()
                answers[i].append(text)
                history[i].append({"role": "assistant", "content": text})
        log.info("MT-Bench turn %d: %d answers", turn + 1, len(todo))
    return [
        {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": a}],
            "tstamp": time.time(),
        }
        for q, a in zip(questions, answers)
    ]


# Our own judging instructions (FastChat's prompts are not copied; use FastChat itself for
# numbers comparable with the report).
JUDGE_SYSTEM = (
    "You are a strict, impartial grader of AI assistant answers. Judge the helpfulness, relevance, "
    "accuracy, depth and clarity of the answer to the user's latest question. A reference answer, "
    "when given, is correct: compare against it. First explain briefly, then give a rating from 1 to "
    "10 in exactly this form: [[rating]], for example [[6]]."
)


def judge_prompt(question: dict[str, Any], answers: list[str], turn: int) -> str:
    lines = []
    for k in range(turn):
        lines.append(f"### User (turn {k + 1})\n{question['turns'][k]}")
        lines.append(f"### Assistant (turn {k + 1})\n{answers[k]}")
    refs = question.get("reference") or []
    if turn - 1 < len(refs) and refs[turn - 1]:
        lines.append(f"### Reference answer to turn {turn}\n{refs[turn - 1]}")
    lines.append(f"Rate the assistant's answer to turn {turn}.")
    return "\n\n".join(lines)


RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


class Judge:
    """An OpenAI-compatible chat-completions endpoint asked for ``[[rating]]`` verdicts."""

    def __init__(self, url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 120) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model, self.timeout_s = model, timeout_s
        self.api_key = os.environ.get(api_key_env) if api_key_env else None

    def complete(self, prompt: str) -> str:
        body = json.dumps({
            "model": self.model,
            "temperature": 0,
            "max_tokens": 1024,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
        except OSError as err:
            raise ConnectionError(f"judge endpoint {self.url} failed: {err}") from err
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"judge endpoint {self.url} returned no chat completion: {str(reply)[:200]}") from err

    def rate(self, question: dict[str, Any], answers: list[str], turn: int) -> tuple[float | None, str]:
        text = self.complete(judge_prompt(question, answers, turn))
        found = RATING.findall(text)
        return (float(found[-1]) if found else None), text


def judge_answers(judge: Judge, questions: list[dict[str, Any]], answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One judgment per (question, turn): ``{question_id, category, turn, score, judge, judgment}``."""
    by_id = {q["question_id"]: q for q in questions}
    out, unrated = [], 0
    for a in answers:
        q = by_id[a["question_id"]]
        turns = a["choices"][0]["turns"]
        for turn in range(1, len(turns) + 1):
            score, text = judge.rate(q, turns, turn)
            unrated += score is None
            out.append({
                "question_id": q["question_id"], "category": q.get("category", ""), "turn": turn,
                "score": score, "judge": judge.model, "judgment": text, "model_id": a["model_id"],
            })
    if unrated:
        log.warning("%d judgments had no [[rating]]; they are left out of the means", unrated)
    return out


def tabulate(judgments: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Mean score per turn and category (unrated judgments left out)."""
    acc: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for j in judgments:
        if j["score"] is not None:
            acc[j["turn"]][j["category"]].append(j["score"])
    return {turn: {c: sum(v) / len(v) for c, v in cats.items()} for turn, cats in sorted(acc.items())}
