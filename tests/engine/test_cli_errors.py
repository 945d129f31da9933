"""CLI bad input: exit code 2 and one line naming the flag or field, no traceback, nothing left running.

(test_cli.py holds the smoke tests; this file the failure paths of `generate`, `record-trace` and `info`.)
"""
from __future__ import annotations

import threading

import pytest

from moe_serve.cli.main import main

# the offloading store starts an expert-copier thread: what an engine left open leaves behind
OFFLOAD = ["--expert-cache-slots", "2", "--cache-policy", "lru", "--cpu-experts", "off"]


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


@pytest.mark.parametrize("command", [["generate"], ["record-trace", "--out", "{tmp}/t.npz"]])
def test_a_failing_generation_closes_the_engine(tiny_dir, tmp_path, capsys, command):
    """A prompt over max_model_len fails inside LLM.generate, after the engine started: the CLI said
    'error: prompts[0]: ...' and exited 2, but left the engine open (its copier thread running)."""
    before = _threads()
    argv = [a.format(tmp=tmp_path) for a in command] + [
        "--model", str(tiny_dir), "--prompt", "hello " * 400, "--max-tokens", "2", *OFFLOAD]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "prompts[0]: prompt has" in err and "max_model_len" in err and "Traceback" not in err
    assert [t.name for t in _threads() - before if t.is_alive()] == []


@pytest.mark.parametrize("command", [["record-trace", "--out"], ["generate", "--record-trace"]])
def test_a_failing_run_leaves_the_trace_file_alone(tiny_dir, tmp_path, capsys, command):
    """Closing the engine writes its trace: a failed run wrote an empty trace over a good file."""
    out = tmp_path / "t.npz"
    out.write_bytes(b"a trace from an earlier run")
    argv = [*command, str(out), "--model", str(tiny_dir), "--prompt", "hello " * 400, "--max-tokens", "2"]
    assert main(argv) == 2 and "prompts[0]" in capsys.readouterr().err
    assert out.read_bytes() == b"a trace from an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]  # no temporary file left behind


@pytest.mark.parametrize("content, message", [
    (b"", "holds no prompts"), (b"\n   \n\t\n", "holds no prompts"),
    (b"caf\xe9\n", "is not UTF-8 text (invalid continuation byte at byte 3)"),
    (b"hello\x00world\n", "is not a text file (it holds NUL bytes)"),
])
def test_prompts_file_that_holds_no_text_prompts(tiny_dir, tmp_path, capsys, content, message):
    """An empty file ran the three built-in demo prompts instead (exit 0, as if they were the user's);
    a binary one said only "'utf-8' codec can't decode byte 0xe9", naming no flag nor file, or (NUL
    bytes) generated from its bytes."""
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    assert main(["generate", "--model", str(tiny_dir), "--prompts-file", str(path), "--max-tokens", "1"]) == 2
    captured = capsys.readouterr()
    tail = " (one a line; blank lines are skipped)" if "no prompts" in message else ""
    assert captured.err.strip().splitlines() == [f"moe-serve generate: error: --prompts-file {path} {message}{tail}"]
    assert captured.out == ""


def test_prompts_file_that_is_a_directory_or_absent(tiny_dir, tmp_path, capsys):
    """A directory was reported as not existing."""
    for path, message in [(tmp_path, "is not a file"), (tmp_path / "nope.txt", "does not exist")]:
        assert main(["generate", "--model", str(tiny_dir), "--prompts-file", str(path)]) == 2
        assert capsys.readouterr().err.strip() == f"moe-serve generate: error: --prompts-file {path} {message}"


def test_info_on_a_file_says_it_is_not_a_directory(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("{}")
    assert main(["info", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"moe-serve info: error: {path} is not a directory (a checkpoint "
                                               "directory holds config.json and *.safetensors)")


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b"{not json", "tokenizer.json is not a readable tokenizer (truncated or corrupt?): "),
    ("tokenizer.json", b"\xff\xfe\x00\x01", "tokenizer.json is not a readable tokenizer (truncated or corrupt?): "),
    ("tokenizer.json", b"{}", "tokenizer.json is not a readable tokenizer (truncated or corrupt?): "),
    ("generation_config.json", b'{"eos_token_id": "x"}',
     "generation_config.json field 'eos_token_id' must be a token id or a list of token ids, got 'x'"),
])
def test_unreadable_tokenizer_files_name_the_file(tiny_dir, tmp_path, capsys, name, content, message):
    """tokenizers raises a bare Exception for a corrupt tokenizer.json: `generate` ended in a traceback;
    a string eos_token_id said only "invalid literal for int() with base 10: 'x'"."""
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    (d / name).write_bytes(content)
    assert main(["generate", "--model", str(d), "--prompt", "hello", "--max-tokens", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moe-serve generate: error: {d}/{message}")


@pytest.mark.parametrize("device, message", [
    ("nonsense", "model.device 'nonsense' is not a torch device (e.g. cpu, cuda, cuda:0)"),
    ("cuda:99", "model.device 'cuda:99': "),  # no CUDA here, or not 100 GPUs: either way refused up front
])
def test_bad_device_is_one_line(tiny_dir, capsys, device, message):
    """torch's RuntimeError (a string that names no device type) and AssertionError ('Torch not compiled
    with CUDA enabled') were tracebacks, raised after the checkpoint had been checked."""
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "1", "--device", device]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moe-serve generate: error: {message}")


def test_serve_on_an_address_in_use_is_one_line_before_the_model_loads(tmp_path, capsys):
    """uvicorn logged 'ERROR: [Errno 98] Address already in use' (no flag named) and exited with code 3,
    after the whole model had loaded; now the address is bound first. The model directory here does not
    even exist: the bind error comes before it is looked at."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = _threads()
        assert main(["serve", "--model", str(tmp_path / "absent"), "--host", "127.0.0.1", "--port", str(port)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"moe-serve serve: error: --host 127.0.0.1 --port {port}: cannot listen there "
                     "(Address already in use)"]
    assert [t.name for t in _threads() - before if t.is_alive()] == []


def test_generate_record_trace_naming_a_directory_is_refused_before_the_work(tiny_dir, tmp_path, capsys):
    """A part file is recorded and renamed over the trace asked for: the name is checked first, as the engine
    checks it (else the rename failed with IsADirectoryError, a traceback after the generation)."""
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "1",
            "--record-trace", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moe-serve generate: error: --record-trace {tmp_path}: is a directory, expected a file name"


def test_generate_record_trace_writes_the_trace(tiny_dir, tmp_path, capsys):
    from predictors.traces import load_trace

    out = tmp_path / "t.npz"
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "2", "--record-trace", str(out)]
    assert main(argv) == 0
    assert load_trace(out).num_sequences == 1 and [p.name for p in tmp_path.iterdir()] == ["t.npz"]


def test_every_os_error_is_one_line_naming_the_path(tmp_path, capsys):
    """Only FileNotFoundError was exit 2: an output name too long for the file system (OSError ENAMETOOLONG,
    raised by root too, unlike a chmod'ed directory), a directory opened as a file or a failed rename
    were tracebacks. Any OSError is now one line naming its path(s)."""
    import argparse
    import os

    from moe_serve.cli.main import run

    out = tmp_path / ("x" * 300 + ".safetensors")
    rc = main(["predict", "fit", "--trace", str(tmp_path / "t.npz"), "--predictor", "popularity", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"moe-serve predict: error: {out}: File name too long\n", err
    for func, line in (
        (lambda a: open(tmp_path, "w"), f"{tmp_path}: Is a directory"),
        (lambda a: os.rename(tmp_path / "a", tmp_path / "b"), f"{tmp_path / 'a'} -> {tmp_path / 'b'}: No such file or directory"),
        (lambda a: open(tmp_path / "none" / "f"), f"{tmp_path / 'none' / 'f'}: No such file or directory"),
    ):
        assert run(argparse.Namespace(command="x", func=func)) == 2
        assert capsys.readouterr().err == f"moe-serve x: error: {line}\n"


def test_a_programming_error_keeps_its_traceback(capsys):
    """Turning OSErrors into exit 2 must not hide bugs: a TypeError (or any non-OSError) propagates."""
    import argparse

    from moe_serve.cli.main import run

    with pytest.raises(TypeError):
        run(argparse.Namespace(command="x", func=lambda a: len(5)))
    with pytest.raises(KeyError):
        run(argparse.Namespace(command="x", func=lambda a: {}["missing"]))
    assert capsys.readouterr().err == ""
