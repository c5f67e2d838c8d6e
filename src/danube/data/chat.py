"""The H2O-Danube chat format, as text and as token ids.

Text::

    <|system|>{system}</s><|prompt|>{user}</s><|answer|>{assistant}</s><|prompt|>...

The markers are plain text (tokenized as ordinary characters); ``</s>`` stands for the
EOS token. Token ids are built piece by piece so that ``</s>`` becomes the EOS *id*
(never the characters ``<``, ``/``, ``s``, ``>``), and so that a prompt rendered for
generation is exactly a prefix of the same conversation with its answer:

    BOS
    [ enc("<|system|>" + system) EOS ]                         optional, first only
    enc("<|prompt|>" + user) EOS enc("<|answer|>")             each turn: the prompt part
    enc(assistant) EOS                                         each turn: the answer part

The answer text is encoded apart from its ``<|answer|>`` marker: encoding them together
could merge characters across the boundary, and the prompt would no longer be a prefix.
The prompt part up to ``<|answer|>`` is split at ``</s>`` exactly as the Hugging Face
tokenizer splits the rendered string at its EOS token, so a prompt for generation gets
the ids ``tokenizer(render_chat_prompt(messages))`` gets there.
"""

from __future__ import annotations

from typing import Protocol, Sequence

SYSTEM, PROMPT, ANSWER, END = "<|system|>", "<|prompt|>", "<|answer|>", "</s>"
ROLE_MARKERS = {"system": SYSTEM, "user": PROMPT, "assistant": ANSWER}

Message = dict[str, str]


class ChatTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


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


def render_chat(messages: Sequence[Message]) -> str:
    """A whole conversation as text, every turn closed with ``</s>``."""
    check_messages(messages)
    return "".join(ROLE_MARKERS[m["role"]] + m["content"] + END for m in messages)


def render_chat_prompt(messages: Sequence[Message]) -> str:
    """A conversation ending with a user turn, followed by an open ``<|answer|>`` for the model."""
    check_messages(messages, ends_with="user")
    return render_chat(messages) + ANSWER


def _encode_with_eos(tok: ChatTokenizer, text: str) -> list[int]:
    """``text`` with each ``</s>`` as the EOS id; the pieces between are encoded separately."""
    pieces = text.split(END)
    ids = tok.encode(pieces[0]) if pieces[0] else []
    for piece in pieces[1:]:
        ids += [tok.eos_id] + (tok.encode(piece) if piece else [])
    return ids


def encode_chat_prompt(tok: ChatTokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of :func:`render_chat_prompt`: BOS, every turn, an open ``<|answer|>``; for generation."""
    check_messages(messages, ends_with="user")
    return encode_conversation(tok, list(messages))[0]


def encode_conversation(tok: ChatTokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Ids of a conversation and, per id, whether it is a trained (assistant) token.

    Trained tokens are each assistant reply and the EOS that closes it; everything else
    (BOS, system, user turns, the markers) is context only. A conversation that ends with
    a user turn ends with an open ``<|answer|>`` (a generation prompt).
    """
    check_messages(messages)
    ids = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
    trained = [False] * len(ids)
    for m in messages:
        if m["role"] == "assistant":
            part = (tok.encode(m["content"]) if m["content"] else []) + [tok.eos_id]
            flags = [True] * len(part)
        else:
            # "<|prompt|>{user}</s><|answer|>" (or "<|system|>{system}</s>") as one piece of text.
            text = ROLE_MARKERS[m["role"]] + m["content"] + END + (ANSWER if m["role"] == "user" else "")
            part = _encode_with_eos(tok, text)
            flags = [False] * len(part)
        ids += part
        trained += flags
    return ids, trained
