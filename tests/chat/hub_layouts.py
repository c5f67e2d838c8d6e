"""Tiny local copies of the report's seven Hub datasets, in their Hub layouts and column types.

Each writer lays out a directory as ``huggingface-cli download --repo-type dataset ID
--local-dir DIR`` leaves it: the data files under their Hub names (shards named
``{split}-0000N-of-0000M-<hash>.parquet``, several splits side by side), ``.gitattributes``,
a README, and the download metadata under ``.cache/huggingface/``. Parquet columns have the
Hub's Arrow types: nested lists of ``{content, role}`` structs, Oasst2's nested
``emojis``/``labels``/``detoxify``, nullable ranks and ratings. Text comes from
:func:`tests.chat.conftest.qa`, so what was read can be checked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.chat.conftest import TOPICS, qa

MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])
MESSAGES = pa.list_(MESSAGE)


def shard_names(split: str, n: int) -> list[str]:
    """Hub shard names: the split, the shard index and count, a content hash."""
    return [f"data/{split}-{i:05d}-of-{n:05d}-{hashlib.sha1(f'{split}{i}'.encode()).hexdigest()[:16]}.parquet"
            for i in range(n)]


def _write_parquet(root: Path, name: str, rows: list[dict], schema: pa.Schema) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _repo(root: Path, readme_yaml: str = "") -> Path:
    """What a local download adds beside the data files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    (root / "README.md").write_text(f"---\nlicense: mit\n{readme_yaml}---\n# Dataset card\n")
    meta = root / ".cache" / "huggingface" / "download"
    for f in root.rglob("*"):
        if f.is_file() and ".cache" not in f.parts and f.name not in ("README.md", ".gitattributes"):
            target = meta / (str(f.relative_to(root)) + ".metadata")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("0123abcd\n0123abcd\n1700000000.0\n")
    return root


def _split_rows(rows: list[dict], schema: pa.Schema, root: Path, split: str, shards: int) -> None:
    names = shard_names(split, shards)
    per = -(-len(rows) // shards)
    for i, name in enumerate(names):
        _write_parquet(root, name, rows[i * per:(i + 1) * per], schema)


def _conversation(i: int) -> list[dict]:
    q, a = qa(i)
    msgs = [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]
    if i % 3 == 0:
        msgs += [{"content": "Why?", "role": "user"}, {"content": "Because of the type.", "role": "assistant"}]
    return msgs


# -- SFT ------------------------------------------------------------------------------------
def ultrachat_200k(root: Path, n: int = 12) -> Path:
    """data/{train_sft (2 shards), test_sft, train_gen, test_gen}-*.parquet: prompt, prompt_id, messages."""
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", MESSAGES)])

    def rows(offset: int, count: int) -> list[dict]:
        return [{"prompt": qa(i)[0], "prompt_id": f"{i:064x}", "messages": _conversation(i)}
                for i in range(offset, offset + count)]

    _split_rows(rows(0, n), schema, root, "train_sft", 2)
    _split_rows(rows(100, 4), schema, root, "test_sft", 1)
    _split_rows(rows(200, 3), schema, root, "train_gen", 1)
    _split_rows(rows(300, 2), schema, root, "test_gen", 1)
    return _repo(root)


def openorca(root: Path, n: int = 12) -> Path:
    """1M-GPT4-Augmented.parquet and 3_5M-GPT3_5-Augmented.parquet: id, system_prompt (often ''), question, response."""
    schema = pa.schema([("id", pa.string()), ("system_prompt", pa.string()), ("question", pa.string()),
                        ("response", pa.string())])
    rows = [{"id": f"{'flan' if i % 2 else 'niv'}.{i}", "system_prompt": "Be brief." if i % 2 else "",
             "question": qa(i)[0], "response": qa(i)[1]} for i in range(n)]
    _write_parquet(root, "1M-GPT4-Augmented.parquet", rows[: n // 2], schema)
    _write_parquet(root, "3_5M-GPT3_5-Augmented.parquet", rows[n // 2:], schema)
    return _repo(root)


def metamathqa(root: Path, n: int = 12) -> Path:
    """MetaMathQA-395K.json: one indented JSON array of {type, query, original_question, response}."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"type": "GSM_Rephrased" if i % 2 else "MATH_AnsAug", "query": qa(i)[0],
             "original_question": qa(i)[0].upper(), "response": qa(i)[1]} for i in range(n)]
    (root / "MetaMathQA-395K.json").write_text(json.dumps(rows, indent=4, ensure_ascii=False))
    return _repo(root)


OASST2_SCHEMA = pa.schema([
    ("message_id", pa.string()), ("parent_id", pa.string()), ("user_id", pa.string()),
    ("created_date", pa.string()), ("text", pa.string()), ("role", pa.string()), ("lang", pa.string()),
    ("review_count", pa.int32()), ("review_result", pa.bool_()), ("deleted", pa.bool_()), ("rank", pa.int32()),
    ("synthetic", pa.bool_()), ("model_name", pa.string()),
    ("detoxify", pa.struct([("toxicity", pa.float64()), ("insult", pa.float64())])),
    ("message_tree_id", pa.string()), ("tree_state", pa.string()),
    ("emojis", pa.struct([("name", pa.list_(pa.string())), ("count", pa.list_(pa.int32()))])),
    ("labels", pa.struct([("name", pa.list_(pa.string())), ("value", pa.list_(pa.float64())),
                          ("count", pa.list_(pa.int32()))])),
])


def oasst2_tree(i: int, lang: str = "en") -> list[dict]:
    """One tree: a prompt, three ranked replies (the worst deleted every 4th tree) and an unranked one."""
    q, a = qa(i)
    tree = f"{i:08x}-tree"

    def msg(mid, parent, role, text, rank=None, deleted=False):
        return {"message_id": mid, "parent_id": parent, "user_id": f"user{i % 5}",
                "created_date": "2023-04-01T12:00:00.000000+00:00", "text": text, "role": role, "lang": lang,
                "review_count": 3, "review_result": True, "deleted": deleted, "rank": rank, "synthetic": False,
                "model_name": None, "detoxify": None if role == "assistant" else {"toxicity": 0.01, "insult": 0.0},
                "message_tree_id": tree, "tree_state": "ready_for_export",
                "emojis": {"name": ["+1"], "count": [2]} if rank == 0 else None,
                "labels": {"name": ["spam", "quality"], "value": [0.0, 0.8], "count": [3, 3]}}

    return [
        msg(tree, None, "prompter", q),
        msg(f"{tree}-a0", tree, "assistant", a, rank=0),
        msg(f"{tree}-a1", tree, "assistant", f"Maybe {TOPICS[(i + 1) % 8]}.", rank=1),
        msg(f"{tree}-a2", tree, "assistant", "I do not know.", rank=2, deleted=i % 4 == 3),
        msg(f"{tree}-a3", tree, "assistant", "Unranked reply.", rank=None),
    ]


def oasst2(root: Path, n_trees: int = 10) -> Path:
    """data/{train,validation}-*.parquet, one row per message; every 5th tree in German."""
    train = [m for i in range(n_trees) for m in oasst2_tree(i, "de" if i % 5 == 4 else "en")]
    val = [m for i in range(100, 103) for m in oasst2_tree(i)]
    _split_rows(train, OASST2_SCHEMA, root, "train", 1)
    _split_rows(val, OASST2_SCHEMA, root, "validation", 1)
    # The repository also holds the raw exports; datasets' split patterns leave them out.
    (root / "2023-11-05_oasst2_ready.trees.jsonl.gz").write_bytes(b"\x1f\x8b not read")
    return _repo(root)


# -- preference -----------------------------------------------------------------------------
REJECTED = "No idea, sorry."


def ultrafeedback_binarized(root: Path, n: int = 12) -> Path:
    """data/{train,test}_{prefs,sft,gen}-*.parquet: prompt, prompt_id, chosen, rejected, messages, scores."""
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
                        ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()),
                        ("score_rejected", pa.float64())])

    def rows(offset: int, count: int) -> list[dict]:
        out = []
        for i in range(offset, offset + count):
            q, a = qa(i)
            chosen = [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]
            out.append({"prompt": q, "prompt_id": f"{i:064x}", "chosen": chosen,
                        "rejected": [{"content": q, "role": "user"}, {"content": REJECTED, "role": "assistant"}],
                        "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.5})
        return out

    for k, split in enumerate(("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")):
        _split_rows(rows(0, n) if split == "train_prefs" else rows(100 * (k + 1), 3), schema, root, split, 1)
    readme = "configs:\n- config_name: default\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: data/{s}-*\n"
        for s in ("train_prefs", "train_sft", "test_prefs", "test_sft", "train_gen", "test_gen"))
    return _repo(root, readme)


def orca_dpo_pairs(root: Path, n: int = 12) -> Path:
    """orca_rlhf.jsonl: system (often ''), question, chosen, rejected."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"system": "You are an AI assistant." if i % 2 else "", "question": qa(i)[0],
                         "chosen": qa(i)[1], "rejected": REJECTED}) for i in range(n)]
    (root / "orca_rlhf.jsonl").write_text("\n".join(lines) + "\n")
    return _repo(root)


def distilabel_math(root: Path, n: int = 12) -> Path:
    """data/train-*.parquet: metadata, instruction, chosen_response, chosen_rating (null in some rows), ..."""
    schema = pa.schema([("metadata", pa.string()), ("instruction", pa.string()), ("chosen_response", pa.string()),
                        ("chosen_rating", pa.float64()), ("rejected_response", pa.string()),
                        ("rejected_rating", pa.float64())])
    rows = [{"metadata": json.dumps({"source": "math", "length-input": 40}), "instruction": qa(i)[0],
             "chosen_response": qa(i)[1], "chosen_rating": None if i % 4 == 0 else 9.0,
             "rejected_response": REJECTED, "rejected_rating": None if i % 4 == 0 else 6.5} for i in range(n)]
    _split_rows(rows, schema, root, "train", 1)
    return _repo(root)


LAYOUTS = {
    "HuggingFaceH4/ultrachat_200k": ultrachat_200k,
    "Open-Orca/OpenOrca": openorca,
    "meta-math/MetaMathQA": metamathqa,
    "OpenAssistant/oasst2": oasst2,
    "HuggingFaceH4/ultrafeedback_binarized": ultrafeedback_binarized,
    "Intel/orca_dpo_pairs": orca_dpo_pairs,
    "argilla/distilabel-math-preference-dpo": distilabel_math,
}


def local_copy(root: Path, hub_id: str) -> Path:
    """A local copy of ``hub_id`` under ``root``, named as the repository is."""
    return LAYOUTS[hub_id](root / hub_id.split("/")[1])


def cache_as_hub(local: Path, hub_id: str, cache_dir: Path) -> None:
    """Put ``local`` in the datasets cache as an online ``load_dataset(hub_id)`` leaves it.

    datasets prepares a Hub dataset into ``CACHE/OWNER___NAME/CONFIG/VERSION/HASH/``; a local
    directory of the same name goes to ``CACHE/NAME/...`` with the same Arrow files, so the
    local copy is prepared there and moved under the owner's name. Offline,
    ``load_dataset(hub_id)`` then reads it exactly as it reads a real download.
    """
    import datasets
    from datasets.naming import camelcase_to_snakecase

    owner, name = hub_id.split("/")
    assert local.name == name
    builder = datasets.load_dataset_builder(str(local), cache_dir=str(cache_dir))
    builder.download_and_prepare()
    prepared = cache_dir / Path(builder.cache_dir).relative_to(cache_dir).parts[0]  # CACHE/<snake_case name>
    target = cache_dir / f"{owner}___{camelcase_to_snakecase(name)}"
    shutil.rmtree(target, ignore_errors=True)
    prepared.rename(target)
