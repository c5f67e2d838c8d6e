"""The H2O-Danube chat format, as text and as token ids.

Text::

    <|system|>{system}</s><|prompt|>{user}</s><|answer|>{assistant}</s><|prompt|>...

The markers are plain text; ``</s>`` is the EOS token. The ids of a conversation are
those of ``BOS + text`` read as markup (:meth:`danube.data.tokenizer.Tokenizer.encode_with_specials`):
cut at ``</s>``, each stretch between encoded on its own. That is exactly what the
exported Hugging Face tokenizer gives for ``apply_chat_template(messages)`` with the
template :func:`hf_chat_template` writes, so a model fine-tuned here is served with the
ids it was trained on (``transformers``, vLLM), and a generation prompt here is
``apply_chat_template(messages, add_generation_prompt=True)`` there.

An assistant reply is encoded together with its ``<|answer|>`` marker, as one stretch,
the way the rendered string is; its trained tokens are found from the pieces' character
offsets: every token that spells a character of the reply, and the EOS closing it. When
one piece spans the marker's end and the reply's start (the Mistral tokenizer has ``>"``
and ``>(``), that token is trained, and the generation prompt, which ends with ``>``, is
then not a prefix of the trained ids; otherwise it is.
"""

from __future__ import annotations

from typing import Protocol, Sequence

SYSTEM, PROMPT, ANSWER, END = "<|system|>", "<|prompt|>", "<|answer|>", "</s>"
ROLE_MARKERS = {"system": SYSTEM, "user": PROMPT, "assistant": ANSWER}

Message = dict[str, str]


class ChatTokenizer(Protocol):
    """What prompts need: :class:`danube.data.tokenizer.Tokenizer` or :class:`danube.eval.inference.TextTokenizer`."""

    bos_id: int
    eos_id: int
    eos_text: str

    def encode_with_specials(self, text: str) -> list[int]: ...


class TrainingTokenizer(ChatTokenizer, Protocol):
    """What trained conversations need on top: :class:`danube.data.tokenizer.Tokenizer`."""

    def encode(self, text: str) -> list[int]: ...

    def encode_split(self, text: str, at: int) -> tuple[list[int], int]: ...

    def split_specials(self, text: str): ...


def check_messages(messages: Sequence[Message], *, ends_with: str | None = None) -> None:
    """Raise ``ValueError`` unless ``messages`` is: optional system, then user/assistant turns alternating."""
    if not messages:
        raise ValueError("the conversation is empty")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected {{role, content}}, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLE_MARKERS:
            raise ValueError(f"message {i}: role {role!r}; expected one of {sorted(ROLE_MARKERS)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            continue
        if role != expected:
            raise ValueError(f"message {i}: expected a {expected} message (turns alternate user, assistant)")
        expected = "assistant" if role == "user" else "user"
    if ends_with is not None and messages[-1]["role"] != ends_with:
        raise ValueError(f"the conversation must end with a message of role {ends_with!r}, "
                         f"got {messages[-1]['role']!r}")


def render_chat(messages: Sequence[Message], eos: str = END) -> str:
    """A whole conversation as text, every turn closed with ``eos``."""
    check_messages(messages)
    return "".join(ROLE_MARKERS[m["role"]] + m["content"] + eos for m in messages)


def render_chat_prompt(messages: Sequence[Message], eos: str = END) -> str:
    """A conversation ending with a user turn, followed by an open ``<|answer|>`` for the model."""
    check_messages(messages, ends_with="user")
    return render_chat(messages, eos) + ANSWER


def hf_chat_template(bos: bool = True) -> str:
    """The Jinja chat template of the exported tokenizer: :func:`render_chat` after ``bos_token``.

    It refuses what :func:`check_messages` refuses (unknown roles, a late system message,
    turns out of order), so a server cannot feed the model a shape it never saw.
    """
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% if not loop.first %}{{ raise_exception('a system message may only come first') }}{% endif %}"
        "{{ '" + SYSTEM + "' + message['content'] + eos_token }}"
        "{% elif message['role'] == ['user', 'assistant'][(loop.index0 - offset) % 2] %}"
        "{{ ('" + PROMPT + "' if message['role'] == 'user' else '" + ANSWER + "') + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('turns must be system (first), then user and assistant alternating; got '"
        " + message['role'] + ' at position ' + loop.index0|string) }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + ANSWER + "' }}{% endif %}"
    )


def _bos(tok: ChatTokenizer) -> list[int]:
    return [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []


def encode_chat_prompt(tok: ChatTokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of ``BOS +`` :func:`render_chat_prompt`, for generation: ``apply_chat_template(..., add_generation_prompt=True)``."""
    return _bos(tok) + tok.encode_with_specials(render_chat_prompt(messages, tok.eos_text))


def encode_conversation(
    tok: TrainingTokenizer, messages: Sequence[Message], last_reply_only: bool = False
) -> tuple[list[int], list[bool]]:
    """Ids of ``BOS +`` :func:`render_chat` and, per id, whether it is trained.

    Trained are the tokens that spell an assistant reply and the EOS closing it (with
    ``last_reply_only``, the last reply only: a DPO completion); everything else (BOS,
    system, user turns, the markers) is context. A conversation that ends with a user
    turn ends with an open ``<|answer|>`` (a generation prompt).
    """
    check_messages(messages)
    text = render_chat(messages, tok.eos_text)
    spans = []  # (start, end) of each trained reply and its closing EOS, in characters of `text`
    pos = 0
    for m in messages:
        start = pos + len(ROLE_MARKERS[m["role"]])
        pos = start + len(m["content"]) + len(tok.eos_text)
        if m["role"] == "assistant":
            spans.append((start, pos))
    if last_reply_only:
        spans = spans[-1:]
    if messages[-1]["role"] == "user":
        text += ANSWER

    def trained(b: int, e: int) -> bool:
        # An empty span (the dummy prefix, a byte-fallback piece) belongs where it stands.
        return any((b < t and e > s) or (b == e and s <= b < t) for s, t in spans)

    ids, flags = _bos(tok), [False] * len(_bos(tok))
    for start, end, special in tok.split_specials(text):
        if special is not None:
            ids.append(special)
            flags.append(trained(start, end))
            continue
        # A reply starts inside this stretch ("<|answer|>{reply}"; it runs to the EOS that ends
        # the stretch): context up to the reply's first token, trained from there on.
        reply = next((s for s, _ in spans if start < s < end), None)
        if reply is None:  # wholly inside or outside a reply: one flag for every piece
            part = tok.encode(text[start:end])
            ids += part
            flags += [trained(start, end)] * len(part)
        else:
            part, before = tok.encode_split(text[start:end], reply - start)
            ids += part
            flags += [False] * before + [True] * (len(part) - before)
    return ids, flags
