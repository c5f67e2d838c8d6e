"""``danube chat-sample DIR``: small chat data made here, no download, for the SFT -> DPO -> DPO chain.

Every record is templated from CPython's pydoc help topics (``pydoc_data``, 79 topics):
a question about a topic ("Explain the "for" statement in Python.") answered with the
topic's opening sentences, so the answers are real English about the language the
tokenizer of the quick start was trained on. The same text always gives the same files.

Files, named as ``conf/chat_data/`` reads them from ``data/chat/`` by default::

    messages.jsonl       SFT conversations (chat_data=messages): four phrasings per topic, every
                         third with a follow-up turn, every fourth with a system prompt
    pairs.jsonl          preference pairs (chat_data=pref_pairs): chosen answers the question,
                         rejected only restates it or declines
    oasst2_train.jsonl   Oasst2 message rows (chat_data=oasst2; `danube oasst2-pairs` makes the
                         pairs of chat_data=pref_oasst2): ranked replies (the answer, a restatement,
                         a refusal), some trees with a follow-up turn, a few replies deleted or
                         unranked, a few trees in German
    tasks/chat_sample_mc.yaml, .json
                         a multiple-choice lm-eval task (evaluate.py include_path=DIR/tasks
                         tasks=[chat_sample_mc]) on a phrasing no training record uses

This is a demonstration set (a few hundred records on one subject), not training data for
a useful chat model. Its rejected replies differ from the chosen ones in a way a tiny model
learns from a few dozen pairs (they never answer), so each DPO run of the README's chain
separates held-out pairs; a rejected reply that answered another topic could only be told
apart by knowing which answer belongs to which question.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from danube.data.records import write_jsonl
from danube.files import atomic_write_text

TRAIN_QUESTIONS = (
    "Explain {t} in Python.",
    "What does the Python reference say about {t}?",
    "Give me a short summary of {t}.",
    "Tell me about {t}.",
)
EVAL_QUESTION = "In a sentence or two, what is {t}?"  # no training record is phrased so
FOLLOW_UP = "Can you tell me more?"
SYSTEM = "You are a helpful assistant who knows Python well."
DECLINE = "I am not sure, sorry."
VAGUE = "It is about {t}."  # restates the question: a reply that says nothing
REFUSE = "Sorry, I would rather not explain {t}."
TASK = "chat_sample_mc"
FILES = ("messages.jsonl", "pairs.jsonl", "oasst2_train.jsonl", f"tasks/{TASK}.yaml", f"tasks/{TASK}.json")


@dataclass(frozen=True)
class Topic:
    key: str  # pydoc's topic name
    title: str  # as a question names it: 'the "for" statement', 'lambdas'
    answer: str  # the opening sentences of its first prose paragraph
    more: str  # the same of its second prose paragraph (or a pointer to the docs)


# A sentence ending "...is equivalent to:" introduces a listing; without it, it says nothing.
_DANGLING = {"to", "as", "by", "of", "is", "are", "follows", "following", "like", "with", "in", "below", "example",
             "definitions", "syntax", "form", "forms", "statements", "rules", "methods", "operations"}


def _complete(sentence: str) -> bool:
    """A sentence that reads alone: capitalised, six words or more, ended, not leading into a listing."""
    words = sentence.rstrip(":").split()
    if len(words) < 6 or sentence[-1:] not in ".!?:" or not (sentence[0].isupper() or sentence[0] in "\"*"):
        return False
    return not (sentence.endswith(":") and words[-1].lower() in _DANGLING)


def _sentences(paragraph: str, max_chars: int = 260) -> str:
    """The paragraph's first sentences, as many as fit in ``max_chars``; "" when the first says nothing alone.

    A sentence ending in a colon introduced a listing that is not kept: it ends the answer,
    with a full stop, when it reads as a statement ("Assert statements are a convenient way
    to insert debugging assertions into a program:").
    """
    sentences = re.split(r"(?<=[.!?:])\s+(?=[A-Z\"*])", paragraph)
    if not _complete(sentences[0]):
        return ""
    out = sentences[0]
    for s in sentences[1:]:
        if out.endswith(":") or len(out) + 1 + len(s) > max_chars or not _complete(s):
            break
        out += " " + s
    out = out.rstrip(":").rstrip()
    return out if out[-1:] in ".!?" else out + "."


def _prose(text: str) -> list[str]:
    """A topic's prose paragraphs as answers: no grammar, code, lists, tables, headings or version notes."""
    answers = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or lines[0].startswith((" ", "\t", "+", "|", "*", "=", "-", ">>>", "(", "object.", "Changed in",
                                             "New in", "Deprecated", "Note:")):
            continue
        if re.match(r"\d+\.", lines[0]):  # a numbered list
            continue
        if len(lines) > 1 and set(lines[1].strip()) <= set("*=-~^"):  # a heading and its underline
            continue
        joined = " ".join(line.strip() for line in lines)
        answer = "" if "::=" in joined else _sentences(joined)
        if answer:
            answers.append(answer)
    return answers


def topics() -> list[Topic]:
    """Every pydoc help topic with at least one prose paragraph, in pydoc's key order."""
    from pydoc_data.topics import topics as pydoc_topics

    out, seen = [], set()
    for key in sorted(pydoc_topics):
        text = pydoc_topics[key]
        title = text.split("\n", 1)[0].strip()
        answers = _prose(text.split("\n", 2)[-1])
        if not title or not answers or title in seen:  # some topics share a section ("if", "elif")
            continue
        seen.add(title)
        if title[:1].isupper() and not title.split()[0].isupper():  # "Coroutines" -> "coroutines"
            title = title[0].lower() + title[1:]
        more = answers[1] if len(answers) > 1 else f"The Python reference has a section on {title}."
        out.append(Topic(key, title, answers[0], more))
    return out


def sft_conversations(items: list[Topic]) -> list[dict]:
    """``messages`` records: every topic in every training phrasing."""
    records = []
    for i, topic in enumerate(items):
        for j, template in enumerate(TRAIN_QUESTIONS):
            n = i * len(TRAIN_QUESTIONS) + j
            messages = [{"role": "system", "content": SYSTEM}] if n % 4 == 3 else []
            messages += [{"role": "user", "content": template.format(t=topic.title)},
                         {"role": "assistant", "content": topic.answer}]
            if n % 3 == 0:
                messages += [{"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": topic.more}]
            records.append({"messages": messages, "topic": topic.key})
    return records


def preference_pairs(items: list[Topic]) -> list[dict]:
    """``pairs`` records: two phrasings per topic; rejected restates the question or declines."""
    records = []
    for i, topic in enumerate(items):
        for j, template in enumerate(TRAIN_QUESTIONS[:2]):
            wrong = VAGUE.format(t=topic.title) if j == 0 else DECLINE
            records.append({"prompt": [{"role": "user", "content": template.format(t=topic.title)}],
                            "chosen": topic.answer, "rejected": wrong, "topic": topic.key})
    return records


def _row(mid: str, parent: str | None, tree: str, role: str, text: str, rank: int | None, lang: str,
         deleted: bool = False) -> dict:
    return {"message_id": mid, "parent_id": parent, "message_tree_id": tree, "role": role, "text": text,
            "rank": rank, "lang": lang, "deleted": deleted, "review_result": True}


def oasst2_rows(items: list[Topic]) -> list[dict]:
    """Oasst2 message rows: one tree per topic, replies ranked best (0) to worst: the answer, a restatement, a refusal."""
    rows = []
    for i, topic in enumerate(items):
        tree, lang = f"tree-{i:03d}", "de" if i % 10 == 9 else "en"
        question = (f"Was ist {topic.title} in Python?" if lang == "de"
                    else TRAIN_QUESTIONS[2].format(t=topic.title))
        rows.append(_row(tree, None, tree, "prompter", question, None, lang))
        replies = [topic.answer, VAGUE.format(t=topic.title), REFUSE.format(t=topic.title)]
        for rank, text in enumerate(replies):
            rows.append(_row(f"{tree}.a{rank}", tree, tree, "assistant", text, rank, lang,
                             deleted=(i % 5 == 4 and rank == 1)))
        if i % 7 == 6:  # a reply nobody ranked
            rows.append(_row(f"{tree}.u", tree, tree, "assistant", DECLINE, None, lang))
        if i % 3 == 0:  # a second turn under the best reply
            follow = f"{tree}.a0.q"
            rows.append(_row(follow, f"{tree}.a0", tree, "prompter", FOLLOW_UP, None, lang))
            rows.append(_row(f"{follow}.a0", follow, tree, "assistant", topic.more, 0, lang))
            rows.append(_row(f"{follow}.a1", follow, tree, "assistant", "No.", 1, lang))
    return rows


def eval_documents(items: list[Topic]) -> list[dict]:
    """Four choices per topic (its answer and three others'), the right one at a rotating place."""
    docs = []
    for i, topic in enumerate(items):
        others = [items[(i + k) % len(items)].answer for k in (3, 17, 29)]
        label = i % 4
        docs.append({"question": EVAL_QUESTION.format(t=topic.title),
                     "choices": others[:label] + [topic.answer] + others[label:], "label": label})
    return docs


def task_yaml(data_file: Path) -> str:
    return (
        f"# Written by `danube chat-sample`: the held-out phrasing of every topic, four answers to choose from.\n"
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )


def write_chat_sample(out_dir: str | Path, overwrite: bool = False) -> dict[str, tuple[Path, int]]:
    """Write the sample's files into ``out_dir``; returns ``{name: (path, records)}``.

    Raises:
        FileExistsError: a file would be replaced and ``overwrite`` is false (nothing is written then).
    """
    out = Path(out_dir)
    existing = [str(out / f) for f in FILES if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace them")
    items = topics()
    written: dict[str, tuple[Path, int]] = {}
    for name, records in (("messages.jsonl", sft_conversations(items)), ("pairs.jsonl", preference_pairs(items)),
                          ("oasst2_train.jsonl", oasst2_rows(items))):
        written[name] = (write_jsonl(records, out / name), len(records))
    docs = eval_documents(items)
    data_file = out / "tasks" / f"{TASK}.json"
    atomic_write_text(data_file, json.dumps(docs, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(out / "tasks" / f"{TASK}.yaml", task_yaml(data_file))
    written[f"tasks/{TASK}"] = (out / "tasks" / f"{TASK}.yaml", len(docs))
    return written


def chat_sample_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="danube chat-sample",
        description="Write small SFT, preference and Oasst2 files, templated from CPython's help topics "
        "(no download), and a multiple-choice lm-eval task on them.",
    )
    parser.add_argument("out_dir", help="directory to write to (data/chat is where conf/chat_data/ looks)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    for name, (path, n) in write_chat_sample(args.out_dir, args.overwrite).items():
        print(f"wrote {path} ({n} {'documents' if name.startswith('tasks/') else 'records'})")
    return 0
