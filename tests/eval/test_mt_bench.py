"""MT-Bench answers (FastChat format), chat template, HTTP judge, Table-3 tabulation, chat console."""

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from hydra import compose, initialize_config_dir

from danube.data.chat import render_chat_prompt
from danube.eval.inference import TextTokenizer, load_for_eval
from danube.eval.mt_bench import encode_chat, load_questions
from danube.model.generate import SamplingParams, generate
from danube.tasks.evaluate import run
from tests.eval.test_evaluate_task import REPO

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short note about Python lists.", "Now make it rhyme."]},
    {"question_id": 101, "category": "reasoning", "turns": ["What comes after two?", "And after that?"]},
    {"question_id": 121, "category": "coding", "turns": ["Write a sort function.", "Make it faster."]},
    {"question_id": 111, "category": "math", "turns": ["What is 3 + 4?", "Times two?"], "reference": ["7", "14"]},
]


@pytest.fixture
def questions_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def test_chat_template_renders_the_released_format():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]
    assert render_chat_prompt(msgs) == "<|system|>Be brief.</s><|prompt|>Hi</s><|answer|>Hello!</s><|prompt|>Why?</s><|answer|>"
    with pytest.raises(ValueError, match="must end with a message of role .user."):
        render_chat_prompt(msgs[:3])


def test_chat_ids_match_the_hugging_face_tokenizer(model_dirs):
    # "</s>" is the EOS token as the released tokenizer parses it, not the characters.
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
    hf = TextTokenizer(model_dirs[1])
    expected = hf.hf.encode(render_chat_prompt(msgs))
    assert encode_chat(TextTokenizer(model_dirs[0]), msgs) == expected == encode_chat(hf, msgs)
    assert expected.count(2) == 3 and expected[0] == 1


def test_questions_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n{\"question_id\": 2, \"turns\": \"not a list\"}\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2"):
        load_questions(bad)


def test_mt_bench_answers_both_turns_in_fastchat_format(model_dirs, questions_file, tmp_path):
    out = tmp_path / "mt.json"
    cfg = _cfg(model_dirs[0], questions_file, out, "max_new_tokens=6")
    result = run(cfg)
    answers = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 101, 111]  # coding skipped by default
    for a in answers:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and a["model_id"] == "tiny"
        assert len(a["choices"][0]["turns"]) == 2
    assert result["sampling"]["repetition_penalty"] == 1.1 and result["sampling"]["temperature"] == 0.0
    # Turn 2 is conditioned on the model's own first answer: re-generate it by hand.
    model, tok = load_for_eval(model_dirs[0])
    q, a = QUESTIONS[0], answers[0]["choices"][0]["turns"]
    history = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a[0]},
               {"role": "user", "content": q["turns"][1]}]
    params = SamplingParams(max_new_tokens=6, repetition_penalty=1.1, stop_token_ids=(tok.eos_id,))
    assert tok.decode(generate(model, [encode_chat(tok, history)], params)[0]).strip() == a[1]


class _JudgeHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][-1]["content"]
        score = 7 if "turn 1." in prompt else 4
        score += 2 if "What is 3 + 4?" in prompt else 0
        reply = {"choices": [{"message": {"role": "assistant", "content": f"Fine. Rating: [[{score}]]"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_over_http_and_table3(model_dirs, questions_file, tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    try:
        out = tmp_path / "mt.json"
        cfg = _cfg(model_dirs[0], questions_file, out, "max_new_tokens=4",
                   f"judge.url=http://127.0.0.1:{server.server_port}/v1", "judge.model=test-judge",
                   "judge.api_key_env=TEST_JUDGE_KEY")
        result = run(cfg)
    finally:
        server.shutdown()
    assert len(_JudgeHandler.seen) == 6
    path, auth, body = _JudgeHandler.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "test-judge"
    math_turn2 = next(b for _, _, b in _JudgeHandler.seen if "3 + 4" in b["messages"][-1]["content"] and "turn 2." in b["messages"][-1]["content"])
    assert "Reference answer to turn 2\n14" in math_turn2["messages"][-1]["content"]
    assert result["scores"] == {"1": {"writing": 7.0, "reasoning": 7.0, "math": 9.0}, "2": {"writing": 4.0, "reasoning": 4.0, "math": 6.0}}
    table = out.with_suffix(".md").read_text()
    assert "| Math | 1.20 | 2.40 | 3.50 | 3.80 | 9.00 |" in table
    assert "| Average | 3.70 | 4.64 | 5.79 | 4.63 | 4.67 |" in table
    assert "| STEM | 6.60 | 6.50 | 7.35 | 8.10 | — |" in table


def test_chat_console_keeps_the_conversation(model_dirs):
    from danube.eval.console import chat_main

    out = io.StringIO()
    rc = chat_main([str(model_dirs[0]), "--max-new-tokens", "5", "--device", "cpu"],
                   stdin=io.StringIO("Hello there\nAnd then?\n/reset\nHello there\n"), stdout=out)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("assistant> ")]
    assert rc == 0 and len(lines) == 3
    assert lines[0] == lines[2]  # after /reset the same question gets the same greedy answer
    # the second answer was conditioned on the first exchange
    model, tok = load_for_eval(model_dirs[0])
    first = lines[0][len("assistant> "):]
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    params = SamplingParams(max_new_tokens=5, repetition_penalty=1.1, stop_token_ids=(tok.eos_id,))
    with torch.no_grad():
        expected = tok.decode(generate(model, [encode_chat(tok, history)], params)[0]).strip()
    assert lines[1] == f"assistant> {expected}"


def _cfg(model_dir, questions, out, *extra):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[f"model_dir={model_dir}", "suite=mt_bench", f"questions={questions}",
                                              f"output_path={out}", "device=cpu", "model_name=tiny", *extra])
