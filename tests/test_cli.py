import subprocess
import sys

import pytest
import torch
import transformers

from danube.cli import COMMANDS, command, main
from danube.model import build_model
from danube.model.io import save_model_dir
from danube.model.loading import load_model


def test_import_export_round_trip(micro_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(micro_cfg).eval()
    save_model_dir(model, tmp_path / "native")
    assert main(["export-hf", str(tmp_path / "native"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back").eval()
    ids = torch.randint(0, micro_cfg.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_resolves_to_a_function_with_its_own_help(name, capsys):
    """A typo in COMMANDS (module or function) fails here, not in a user's terminal."""
    run = command(name)
    assert callable(run)
    try:
        code = run(["--help"])
    except SystemExit as done:  # argparse's way
        code = done.code
    assert code == 0 and capsys.readouterr().out.startswith(f"usage: danube {name} ")


def test_console_script_lists_commands():
    out = subprocess.run([sys.executable, "-m", "danube.cli", "--help"], capture_output=True, text=True, check=True)
    assert "import-hf" in out.stdout and "export-hf" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "danube.cli", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


def test_bad_input_is_one_line_naming_it_and_exit_code_1(tmp_path, capsys, monkeypatch):
    """Every command's ValueError/OSError ends as `danube NAME: error: ...`, not a traceback."""
    missing = tmp_path / "no-such-hf-dir"
    assert main(["import-hf", str(missing), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"danube import-hf: error: {missing}") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.yaml").write_text("n_embd: [not, a, number]\n")
    assert main(["export-hf", str(tmp_path / "model"), str(tmp_path / "hf")]) == 1
    assert "config.yaml" in capsys.readouterr().err
    monkeypatch.setenv("DANUBE_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        main(["import-hf", str(missing), str(tmp_path / "out")])


def test_misspelt_command_is_one_line_with_the_closest_name(capsys):
    assert main(["expor-hf", "a", "b"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("danube: error: unknown command 'expor-hf'") and "did you mean export-hf?" in captured.err
    assert main(["zzz"]) == 2  # nothing close: the names instead of a guess
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean" not in err and "import-hf, export-hf" in err


def test_no_command_is_a_usage_error_and_help_is_not(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("danube: error: no command given") and "export-hf" in captured.err
    for flag in ("--help", "-h"):
        assert main([flag]) == 0
        captured = capsys.readouterr()
        assert captured.out.startswith("usage: danube COMMAND") and captured.err == ""


def test_console_script_usage_errors_exit_2_in_one_line():
    for argv, wanted in ([], "no command given"), (["expor-hf"], "did you mean export-hf?"):
        done = subprocess.run([sys.executable, "-m", "danube.cli", *argv], capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == "", argv
        assert done.stderr.count("\n") == 1 and wanted in done.stderr, done.stderr


def test_output_cut_short_by_its_reader_is_not_an_error():
    """`danube settings | head`: a pipe its reader closed ends the command quietly, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "danube.cli", "settings"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err
