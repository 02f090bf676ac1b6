"""`moecoder info | generate | demo` through the real entry point (moecoder.cli.main)."""

import json
import sys

import pytest
from checkpoint_fixtures import tiny_checkpoint

from moecoder import cli, engine_cli
from moecoder.checkpoint import load_checkpoint
from moecoder.config import get_preset
from moecoder.generate import SamplingParams, generate_text
from moecoder.sizing import size_model
from moecoder.tokenizer import Tokenizer


def run(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of `moecoder *args`, in process."""
    monkeypatch.setattr(sys, "argv", ["moecoder", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_info_preset_table_and_json(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "info", "review-270b-a40b")
    assert code == 0
    s = size_model(get_preset("review-270b-a40b"), 4096)
    assert f"{s.total_params:,}" in out and f"{s.active_params:,}" in out and "KV cache" in out
    code, out, _ = run(monkeypatch, capsys, "info", "minimax-m2", "--json", "--context", "1000")
    d = json.loads(out)
    s = size_model(get_preset("minimax-m2"), 1000)
    assert d["total_params"] == s.total_params and d["flops_per_token"] == s.flops_per_token
    assert d["context"] == 1000 and d["config"]["n_experts"] == 256 and "conventions" in d


def test_info_on_checkpoint_folder(monkeypatch, capsys, model_dir):
    code, out, _ = run(monkeypatch, capsys, "info", str(model_dir), "--json")
    assert code == 0
    n = sum(p.numel() for p in load_checkpoint(model_dir).model.parameters())
    assert json.loads(out)["total_params"] == n


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "no-such-preset"], "neither a preset"),
        (["info", "debug", "--bogus"], "No such option: --bogus"),
        (["info", "debug", "--context", "0"], "--context must be a positive"),
        (["generate", "--prompt", "x", "--model", "/no/such/dir"], "model folder /no/such/dir does not exist"),
        (["generate", "--model", "/tmp"], "Missing option '--prompt'"),
        (["generate", "--prompt", "x", "--max-new-tokens", "many"], "Invalid value for '--max-new-tokens'"),
    ],
)
def test_errors_are_one_line_exit_2(monkeypatch, capsys, args, message):
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "float8"], "--dtype must be one of"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--device", "tpu"], "--device must be"),
    ],
)
def test_generate_bad_values(monkeypatch, capsys, model_dir, extra, message):
    code, _, err = run(monkeypatch, capsys, "generate", "-m", str(model_dir), "-p", "x", *extra)
    assert code == 2 and message in err and err.count("\n") == 1


def test_generate_matches_library_and_stream_matches_batch(monkeypatch, capsys, model_dir):
    ckpt, tok = load_checkpoint(model_dir), Tokenizer.from_dir(model_dir)
    expect = generate_text(ckpt.model, tok, [tok.encode("def square(x):")], 20, SamplingParams(), eos_ids=[0])[0]
    code, out, err = run(monkeypatch, capsys, "generate", "-m", str(model_dir), "-p", "def square(x):", "-n", "20")
    assert code == 0 and out == expect.text + "\n"
    assert f"{len(expect.tokens)} new tokens" in err
    code, streamed, _ = run(monkeypatch, capsys, "generate", "-m", str(model_dir), "-p", "def square(x):", "-n", "20",
                            "--stream")
    assert streamed == out
    stop = expect.text[3:5]
    code, cut, err = run(monkeypatch, capsys, "generate", "-m", str(model_dir), "-p", "def square(x):", "-n", "20",
                         "--stop", stop)
    assert cut == expect.text[: expect.text.index(stop)] + "\n" and "finish: stop" in err


def test_generate_sampling_seed_and_chat(monkeypatch, capsys, model_dir):
    args = ["generate", "-m", str(model_dir), "-p", "hello", "-n", "15", "-t", "1.0", "--top-k", "20"]
    a = run(monkeypatch, capsys, *args, "--seed", "1")[1]
    b = run(monkeypatch, capsys, *args, "--seed", "1")[1]
    c = run(monkeypatch, capsys, *args, "--seed", "2")[1]
    assert a == b and a != c
    code, chat_out, _ = run(monkeypatch, capsys, "generate", "-m", str(model_dir), "-p", "hi", "-n", "5", "--chat",
                       "--dtype", "bfloat16")
    assert code == 0 and chat_out.endswith("\n")


def test_no_default_model_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engine_cli, "BUNDLED_MODEL", tmp_path / "absent")
    code, _, err = run(monkeypatch, capsys, "generate", "-p", "x")
    assert code == 2 and "pass --model" in err


def test_demo_builds_caches_and_streams(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engine_cli, "BUNDLED_MODEL", tmp_path / "absent")
    monkeypatch.setenv("MOECODER_CACHE", str(tmp_path / "cache"))
    code, out, _ = run(monkeypatch, capsys, "demo", "-n", "12")
    assert code == 0
    assert "268,051,886,080" in out  # the review model's sizing table comes first
    assert "building a random-weight" in out and out.index("268,051,886,080") < out.index("building")
    assert "def fibonacci(n):" in out and "12 new tokens" in out
    folder = tmp_path / "cache" / "demo-model"
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    code, again, _ = run(monkeypatch, capsys, "demo", "-n", "12")
    assert code == 0 and "building" not in again
    # same seed, same model: the same completion
    completion = lambda text: text.split("def fibonacci(n):")[1].split("[10 prompt tokens")[0]
    assert completion(again) == completion(out) and completion(out).strip()


def test_demo_rebuilds_a_damaged_cache(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engine_cli, "BUNDLED_MODEL", tmp_path / "absent")
    monkeypatch.setenv("MOECODER_CACHE", str(tmp_path))
    folder = tmp_path / "demo-model"
    folder.mkdir()
    (folder / "config.json").write_text("{broken")
    code, out, _ = run(monkeypatch, capsys, "demo", "-n", "4")
    assert code == 0 and "unusable" in out and "4 new tokens" in out
    assert json.loads((folder / "config.json").read_text())["vocab_size"] > 256


def test_generate_reads_prompt_from_stdin(monkeypatch, capsys, model_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("def square(x):"))
    code, from_stdin, _ = run(monkeypatch, capsys, "generate", "-m", str(model_dir), "-p", "-", "-n", "6")
    code2, direct, _ = run(monkeypatch, capsys, "generate", "-m", str(model_dir), "-p", "def square(x):", "-n", "6")
    assert code == code2 == 0 and from_stdin == direct
