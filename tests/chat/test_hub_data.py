"""The report's seven datasets as the Hub ships them: local copies, Hub ids (from the datasets cache), errors.

Every dataset directory here is written in its Hub layout and Arrow types
(tests/chat/hub_layouts.py) and fine-tuned on for a step with the tiny model through
``danube.tasks.finetune.run``, as ``python finetune.py chat_data=NAME
chat_data.sources.NAME.path=DIR`` would.
"""

import logging

import pytest

from danube.data.preference import open_pairs, read_pairs
from danube.data.records import RecordError, Source, SourceError
from danube.data.sft import open_conversations, read_conversations
from danube.tasks.finetune import run
from tests.chat.conftest import compose_finetune, qa
from tests.conftest import CONF
from tests.chat.hub_layouts import REJECTED, cache_as_hub, local_copy

CPU = ["trainer=cpu", "precision=fp32", "export_hf=false", "train.max_seq_len=256", "train.log_every_n_steps=1"]

# (chat_data config, source name, Hub id, loss, rows read, items kept, reader drops)
DATASETS = [
    ("ultrachat", "ultrachat", "HuggingFaceH4/ultrachat_200k", "sft", 12, 12, 0),
    ("openorca", "openorca", "Open-Orca/OpenOrca", "sft", 12, 12, 0),
    ("metamathqa", "metamathqa", "meta-math/MetaMathQA", "sft", 12, 12, 0),
    ("oasst2", "oasst2", "OpenAssistant/oasst2", "sft", 50, 10, 0),  # 10 trees of 5 messages
    ("pref_ultrafeedback", "ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", "dpo", 12, 12, 0),
    ("pref_orca_dpo", "orca_dpo", "Intel/orca_dpo_pairs", "dpo", 12, 12, 0),
    ("pref_distilabel_math", "distilabel_math", "argilla/distilabel-math-preference-dpo", "dpo", 12, 12, 0),
    # 10 trees, 2 in German: 8 English reply groups with two ranked replies
    ("pref_oasst2", "oasst2_pairs", "OpenAssistant/oasst2", "dpo", 50, 8, 2),
]


@pytest.mark.parametrize("config, name, hub_id, loss, rows, kept, dropped", DATASETS, ids=[d[0] for d in DATASETS])
def test_each_dataset_fine_tunes_from_its_local_hub_copy(tiny_model_dir, tmp_path, caplog, config, name, hub_id,
                                                         loss, rows, kept, dropped):
    local = local_copy(tmp_path / "hub", hub_id)
    cfg = compose_finetune(CPU + [
        f"loss={loss}", f"model_dir={tiny_model_dir}", f"chat_data={config}", f"chat_data.sources.{name}.path={local}",
        f"run_dir={tmp_path / 'run'}", "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=1",
    ])
    with caplog.at_level(logging.INFO, logger="danube.tasks.finetune"):
        result = run(cfg)
    assert result.data_counts["rows"] == rows
    assert result.metrics["train/loss"] > 0 and (result.model_dir / "config.yaml").is_file()
    log = caplog.text
    split = cfg.chat_data.sources[name].split
    assert f"{rows} rows from {local} split {split} (" in log  # the split and its files are named
    assert f"-> {kept} {'conversations' if loss == 'sft' else 'pairs'}" in log
    assert "chat data read" in log and "trained" in log  # the table, with token counts
    if dropped:
        assert f"{dropped} dropped" in log


def test_several_splits_side_by_side_read_only_the_one_asked_for(tmp_path):
    local = local_copy(tmp_path, "HuggingFaceH4/ultrachat_200k")
    rows = open_conversations(Source("ultrachat", path=str(local), split="train_sft"), "ultrachat")
    assert [f.rsplit("/", 1)[1][:24] for f in rows.files] == ["train_sft-00000-of-00002", "train_sft-00001-of-00002"]
    convs = read_conversations(Source("ultrachat", path=str(local), split="test_sft"), "ultrachat")
    assert [c[0]["content"] for c in convs] == [qa(i)[0] for i in range(100, 104)]
    full = read_conversations(Source("ultrachat", path=str(local), split="train_sft"), "ultrachat")
    assert len(full) == 12 and full[3][2:] == [{"role": "user", "content": "Why?"},
                                               {"role": "assistant", "content": "Because of the type."}]


def test_hub_column_types_read_to_the_same_records(tmp_path):
    """Empty system prompts, null ratings, a JSON array file, nested Oasst2 columns."""
    orca = read_conversations(Source(path=str(local_copy(tmp_path, "Open-Orca/OpenOrca"))), "openorca")
    assert sum(c[0]["role"] == "system" for c in orca) == 6  # the empty system prompts are left out
    math = read_conversations(Source(path=str(local_copy(tmp_path, "meta-math/MetaMathQA"))), "metamath")
    assert math[5] == [{"role": "user", "content": qa(5)[0]}, {"role": "assistant", "content": qa(5)[1]}]
    pairs = read_pairs(Source(path=str(local_copy(tmp_path, "argilla/distilabel-math-preference-dpo"))),
                       "distilabel_math")
    assert len(pairs) == 12 and {(p.chosen, p.rejected) for p in pairs[:1]} == {(qa(0)[1], REJECTED)}
    oasst = read_conversations(Source(path=str(local_copy(tmp_path, "OpenAssistant/oasst2"))), "oasst2")
    assert sorted(c[1]["content"] for c in oasst) == sorted(qa(i)[1] for i in range(10))
    uf = read_pairs(Source(path=str(local_copy(tmp_path, "HuggingFaceH4/ultrafeedback_binarized")),
                           split="train_prefs"), "ultrafeedback")
    assert uf[2].prompt == [{"role": "user", "content": qa(2)[0]}] and uf[2].chosen == qa(2)[1]


def test_a_missing_column_names_the_dataset_file_column_and_schema(tmp_path):
    local = local_copy(tmp_path, "HuggingFaceH4/ultrachat_200k")
    with pytest.raises(SourceError) as err:
        open_conversations(Source("mine", path=str(local), split="train_sft"), "openorca")
    msg = str(err.value)
    assert msg.startswith(f"chat_data.sources.mine: {local}/data/train_sft-00000-of-00002-")
    assert "no columns 'question', 'response'" in msg
    assert "OpenOrca rows need question (string), response (string)" in msg
    assert "columns there: prompt, prompt_id, messages" in msg
    # JSON records are checked one by one: the line is named.
    orca = local_copy(tmp_path, "Intel/orca_dpo_pairs")
    with pytest.raises(RecordError, match=rf"^{orca}/orca_rlhf.jsonl:1: missing \['instruction', 'chosen_response', "
                                          r"'rejected_response'\]; distilabel math preference rows need "):
        read_pairs(Source(path=str(orca)), "distilabel_math")


def test_a_split_that_does_not_exist_lists_the_splits_found(tmp_path, offline_datasets):
    local = local_copy(tmp_path, "HuggingFaceH4/ultrafeedback_binarized")
    with pytest.raises(SourceError, match=r"chat_data.sources.uf: the dataset directory .* has no split 'train'; "
                                          r"splits found: test_gen, test_prefs, test_sft, train_gen, train_prefs, "
                                          r"train_sft \(set chat_data.sources.uf.split\)"):
        open_pairs(Source("uf", path=str(local)), "ultrafeedback")
    cache_as_hub(local, "HuggingFaceH4/ultrafeedback_binarized", offline_datasets)
    with pytest.raises(SourceError, match=r"the Hub dataset HuggingFaceH4/ultrafeedback_binarized has no split "
                                          r"'prefs'; splits found: test_gen, test_prefs"):
        open_pairs(Source("uf", hub="HuggingFaceH4/ultrafeedback_binarized", split="prefs"), "ultrafeedback")


def test_a_hub_id_that_is_not_cached_fails_offline_before_any_work(tiny_model_dir, tmp_path):
    cfg = compose_finetune(CPU + [f"model_dir={tiny_model_dir}", "chat_data=openorca", f"run_dir={tmp_path / 'x'}"])
    with pytest.raises(SourceError, match="chat_data.sources.openorca: hub=Open-Orca/OpenOrca is not in the datasets "
                                          "cache .* set chat_data.sources.openorca.path to a local copy"):
        run(cfg)
    assert not (tmp_path / "x").exists()


def test_hub_ids_are_read_through_load_dataset_from_its_cache(tiny_model_dir, tmp_path, offline_datasets, caplog):
    """The default configs name Hub ids: offline, datasets.load_dataset reads them from its cache."""
    cache_as_hub(local_copy(tmp_path / "hub", "HuggingFaceH4/ultrachat_200k"), "HuggingFaceH4/ultrachat_200k",
                 offline_datasets)
    cfg = compose_finetune(CPU + [f"model_dir={tiny_model_dir}", "chat_data=ultrachat", f"run_dir={tmp_path / 'r'}",
                                  "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=1"])
    assert cfg.chat_data.sources.ultrachat.hub == "HuggingFaceH4/ultrachat_200k" and not cfg.chat_data.sources.ultrachat.path
    with caplog.at_level(logging.INFO, logger="danube.tasks.finetune"):
        result = run(cfg)
    assert result.data_counts["rows"] == 12 and result.data_counts["samples"] == 12
    assert "12 rows from HuggingFaceH4/ultrachat_200k split train_sft (ultrachat_200k-train_sft.arrow)" in caplog.text


def test_oasst2_pairs_reads_a_local_copy_or_the_hub_id(tmp_path, offline_datasets, capsys):
    from danube.cli import main
    from danube.data.preference import read_pairs

    local = local_copy(tmp_path / "hub", "OpenAssistant/oasst2")
    out = tmp_path / "pairs.jsonl"
    assert main(["oasst2-pairs", str(local), str(out), "--lang", "en"]) == 0
    printed = capsys.readouterr().out
    assert f"read 50 message rows from {local} split train (train-00000-of-00001-" in printed
    assert "pairs written: 8 (language en)" in printed and len(read_pairs(out, "pairs")) == 8
    assert main(["oasst2-pairs", str(local), str(out), "--split", "validation"]) == 0
    assert "pairs written: 3" in capsys.readouterr().out
    assert main(["oasst2-pairs", str(local), str(out), "--split", "test"]) == 1
    assert "has no split 'test'; splits found: train, validation" in capsys.readouterr().err
    cache_as_hub(local, "OpenAssistant/oasst2", offline_datasets)
    assert main(["oasst2-pairs", "hub:OpenAssistant/oasst2", str(out)]) == 0
    assert "read 50 message rows from OpenAssistant/oasst2 split train (oasst2-train.arrow)" in capsys.readouterr().out


def test_the_report_experiments_run_from_hub_ids(tiny_model_dir, tmp_path, offline_datasets, caplog):
    """danube_chat_sft, _dpo1 and _dpo2 as configured (Hub ids), the data in the datasets cache."""
    for hub_id in ("Open-Orca/OpenOrca", "meta-math/MetaMathQA", "HuggingFaceH4/ultrachat_200k",
                   "OpenAssistant/oasst2", "HuggingFaceH4/ultrafeedback_binarized", "Intel/orca_dpo_pairs",
                   "argilla/distilabel-math-preference-dpo"):
        cache_as_hub(local_copy(tmp_path / "hub", hub_id), hub_id, offline_datasets)
    common = CPU + [f"paths.runs_dir={tmp_path / 'runs'}", "train.max_steps=1", "trainer=cpu", "precision=fp32"]
    with caplog.at_level(logging.INFO, logger="danube.tasks.finetune"):
        sft = run(compose_finetune(common + ["experiment=danube_chat_sft", f"model_dir={tiny_model_dir}",
                                             "train.activation_checkpointing=false"]))
    table = caplog.text[caplog.text.index("chat data read (sft"):]
    for line in ("openorca    train", "metamathqa  train", "ultrachat   train_sft", "oasst2      train"):
        assert line in table
    assert sft.data_counts["rows"] == 12 + 12 + 12 + 50 and sft.data_counts["samples"] == 46
    dpo1 = run(compose_finetune(common + ["experiment=danube_chat_dpo1"]))  # model_dir: the SFT result
    assert dpo1.data_counts["pairs"] == 36
    dpo2 = run(compose_finetune(common + ["experiment=danube_chat_dpo2"]))  # model_dir: DPO 1's merged model
    assert dpo2.data_counts["pairs"] == 8  # English reply groups with two ranked replies


@pytest.mark.parametrize("config", sorted(p.stem for p in (CONF / "chat_data").glob("*.yaml")))
def test_every_chat_data_config_composes_with_a_known_format_and_split(config):
    from danube.config import FinetuneConfig, typed
    from danube.data import preference, sft
    from danube.data.records import SOURCE_KEYS
    from tests.chat.hub_layouts import LAYOUTS

    loss = "dpo" if config.startswith("pref_") or config == "danube_dpo" else "sft"
    job = typed(compose_finetune([f"chat_data={config}", "model_dir=/m", f"loss={loss}"]), FinetuneConfig, "finetune.py")
    for name, src in job.chat_data.sources.items():
        assert set(SOURCE_KEYS) <= set(vars(src)), (name, sorted(vars(src)))  # what danube.data.records reads
        assert src.format in {*sft.FORMATS, *preference.FORMATS}
        if src.hub:  # every Hub dataset a config names has a Hub-layout fixture, and a split
            assert src.hub in LAYOUTS and src.split
        else:
            assert src.path
