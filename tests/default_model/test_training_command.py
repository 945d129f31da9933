"""`python -m training.train_default` on a tiny corpus made here (a few KB): its options are checked
before anything is read or written, its tokenized-data cache is the corpus's own, it never empties a
directory it did not write, and a few steps of a tiny config train and export a loadable model."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from training.data import CORPUS_FILES
from training.train_default import build_parser, parse_args, prepare

REPO = Path(__file__).resolve().parents[2]
TINY = ["--vocab-size", "300", "--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
        "--experts", "4", "--top-k", "2", "--moe-inter", "32", "--seq-len", "16", "--batch", "2", "--warmup", "1",
        "--tok-sample-chars", "100000"]


def corpus(path: Path, words: list[str], seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.mkdir()
    for name in CORPUS_FILES:
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) for _ in range(120)]
        (path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny(tmp_path):
    words = "the of and to in is that for it as with was on be by this are from at or an which python def".split()
    return corpus(tmp_path / "corpus", words)


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--corpus" in out and "--minutes" in out and "--steps" in out


def test_every_flag_has_help_that_shows_its_default():
    """--corpus, --hidden, --lr and 18 more had no help at all, and no flag said its default."""
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        text = parser._get_formatter()._expand_help(action)  # as --help prints it
        assert text.endswith(f"(default: {action.default})"), f"{action.option_strings[0]}: {text!r}"
    assert "--lr LR" in parser.format_help() and "(default: 0.003)" in parser.format_help()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),  # was: UnboundLocalError after the data was prepared
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),  # was: ZeroDivisionError at the first step
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--calibrate", "-1"], "--calibrate must be >= 0, got -1"),
    (["--minutes", "0"], "--minutes must be > 0, got 0.0"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio must lie in [0, 1], got 1.5"),
    (["--top-k", "5", "--experts", "4"], "--top-k 5 exceeds --experts 4"),
    (["--heads", "6", "--kv-heads", "4"], "--heads 6 must be a multiple of --kv-heads 4"),
    (["--seq-len", "2048"], "--seq-len 2048 needs --max-pos >= 2049, got 2048"),
    (["--vocab-size", "100"], "--vocab-size must be >= 261 (256 bytes + 5 special tokens), got 100"),
])
def test_bad_options_are_refused_naming_the_flag(argv, message, tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--corpus", str(tiny), "--out", str(tmp_path / "out"), *argv])
    assert info.value.code == 2 and f"error: {message}" in capsys.readouterr().err


def test_a_missing_corpus_is_refused_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # was: FileNotFoundError traceback from read_corpus
        parse_args(["--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2 and f"--corpus {tmp_path / 'nope'} lacks python311_docs.txt" in capsys.readouterr().err


def test_a_work_path_that_is_a_file_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "work").write_text("")
    with pytest.raises(SystemExit) as info:  # was: an OSError from mkdir once the tokenizer was trained
        parse_args(["--corpus", str(tiny), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2 and f"--work {tmp_path / 'work'} is a file, not a directory" in capsys.readouterr().err


def test_out_holding_other_files_is_refused_and_kept(tiny, tmp_path, capsys):
    # export() deleted every file of --out: a directory with the user's own files is refused, and kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as info:
        parse_args(["--corpus", str(tiny), "--out", str(mine)])
    assert info.value.code == 2 and f"--out {mine} is not empty and holds no training_info.json" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    (mine / "notes.txt").unlink()  # an empty directory, or one holding a model this command wrote, is fine
    assert parse_args(["--corpus", str(tiny), "--out", str(mine)]).out == mine
    (mine / "training_info.json").write_text("{}")
    assert parse_args(["--corpus", str(tiny), "--out", str(mine)]).out == mine


def test_the_data_cache_belongs_to_its_corpus(tiny, tmp_path):
    # keyed by vocab size and sample length only, a second corpus with the same --work got the first
    # corpus's tokenizer and token streams
    other = corpus(tmp_path / "other", "zebra quokka axolotl narwhal".split(), seed=1)
    work = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    tok_a, train_a, _ = prepare(parse_args(["--corpus", str(tiny), *work, *TINY]))
    tok_b, train_b, _ = prepare(parse_args(["--corpus", str(other), *work, *TINY]))
    text_b = (other / CORPUS_FILES[0]).read_text(encoding="utf-8")
    assert tok_b.decode(train_b[CORPUS_FILES[0]][:200].tolist()) == text_b[: len(tok_b.decode(train_b[CORPUS_FILES[0]][:200].tolist()))]
    assert "zebra" in tok_b.decode(train_b[CORPUS_FILES[0]][:50].tolist())
    again, train_a2, _ = prepare(parse_args(["--corpus", str(tiny), *work, *TINY]))  # the cache, reused
    assert (train_a2[CORPUS_FILES[0]] == train_a[CORPUS_FILES[0]]).all()
    assert len(list((tmp_path / "work").iterdir())) == 2


def _run(*argv, cwd=REPO):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "training.train_default", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_few_steps_on_a_tiny_config_export_a_loadable_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, work = tmp_path / "model", tmp_path / "work"
    proc = _run("--corpus", str(tiny), "--out", str(out), "--work", str(work), "--steps", "3", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps_done"] == 3 and info["tokens_trained"] == 3 * 2 * 16 and not info["stopped_by_wall_clock"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_experts == 4 and len(tok) <= 300 and tok.decode(tok("the python")["input_ids"]) == "the python"
    # a window longer than the corpus's held-out part: refused naming --seq-len (was: torch.stack of no windows)
    proc = _run("--corpus", str(tiny), "--out", str(out), "--work", str(work), "--steps", "1", *TINY, "--seq-len", "200")
    assert proc.returncode == 2 and "--seq-len 200 needs windows of 201 tokens" in proc.stderr, proc.stderr[-2000:]


def test_a_corpus_file_that_is_not_utf8_is_named(tiny, tmp_path, capsys):
    # was: a UnicodeDecodeError traceback naming no file
    (tiny / CORPUS_FILES[1]).write_bytes(b"fine text\n" * 50 + b"\xff\xfe\x00 binary\n")
    with pytest.raises(ValueError, match=f"corpus file {tiny / CORPUS_FILES[1]} is not UTF-8 text .*at byte 500"):
        prepare(parse_args(["--corpus", str(tiny), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *TINY]))
    proc = _run("--corpus", str(tiny), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *TINY)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        f"train_default: error: corpus file {tiny / CORPUS_FILES[1]} is not UTF-8 text (invalid start byte at byte 500)"), proc.stderr[-1500:]


def test_a_cache_left_half_written_is_rebuilt(tiny, tmp_path):
    # the tokenizer was saved first and its presence taken for a whole cache: a run stopped before the
    # token streams were written left a cache every later run failed on (FileNotFoundError on a .npy)
    argv = ["--corpus", str(tiny), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *TINY]
    tok, train, _ = prepare(parse_args(argv))
    (cache,) = (tmp_path / "work").iterdir()
    (cache / f"{CORPUS_FILES[2]}.heldout.npy").unlink()  # as a run interrupted while writing them leaves it
    again, train2, held2 = prepare(parse_args(argv))
    assert (train2[CORPUS_FILES[0]] == train[CORPUS_FILES[0]]).all() and len(held2[CORPUS_FILES[2]]) > 0
    assert (cache / f"{CORPUS_FILES[2]}.heldout.npy").is_file()


def test_an_export_that_fails_midway_leaves_the_previous_model_whole(tiny, tmp_path):
    # export emptied --out and then wrote into it: a failed write (disk full) left no model where one had
    # been (by default the shipped moe_serve/default_model). It now writes beside --out and swaps at the end.
    import torch
    from transformers import Qwen3MoeForCausalLM

    from tests.predictors.test_trace_save import file_size_limit
    from training.train_default import build_config, export

    out = tmp_path / "model"
    a = parse_args(["--corpus", str(tiny), "--work", str(tmp_path / "work"), "--out", str(out), *TINY])
    tok, _, _ = prepare(a)
    torch.manual_seed(0)
    export(Qwen3MoeForCausalLM(build_config(a, tok)), tok, a, out, {"run": 1})
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with file_size_limit(4096), pytest.raises(Exception):  # the weights (~80 KB in bf16) cannot be written
        export(Qwen3MoeForCausalLM(build_config(a, tok)), tok, a, out, {"run": 2})
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "model", "work"]  # nothing half-written beside
    export(Qwen3MoeForCausalLM(build_config(a, tok)), tok, a, out, {"run": 3})
    assert json.loads((out / "training_info.json").read_text()) == {"run": 3} and set(before) == {f.name for f in out.iterdir()}


def test_a_corpus_of_one_long_line_per_file_still_has_held_out_text(tmp_path):
    # the held-out split began at the first line break after the cut: with none, it was empty, and
    # encoding it failed in np.concatenate ('need at least one array'), exit 2 naming nothing useful
    from training.data import encode_stream, split_text

    train, held = split_text("abcdefghij" * 10, heldout_fraction=0.2)
    assert (len(train), len(held)) == (80, 20) and train + held == "abcdefghij" * 10
    assert split_text("ab\ncd\nef\ngh\nij\n", 0.5) == ("ab\ncd\nef\n", "gh\nij\n")  # cut at a line break, as before
    path = tmp_path / "one_line"
    path.mkdir()
    rng = random.Random(0)
    words = "the of and to in is that for it as with was on be by this python def".split()
    for name in CORPUS_FILES:
        (path / name).write_text(" ".join(rng.choice(words) for _ in range(1500)), encoding="utf-8")
    tok, train_streams, held_streams = prepare(parse_args(["--corpus", str(path), "--work", str(tmp_path / "w"),
                                                            "--out", str(tmp_path / "o"), *TINY]))
    assert all(len(held_streams[n]) > 17 and len(train_streams[n]) > len(held_streams[n]) for n in CORPUS_FILES)
    assert encode_stream(tok, "").size == 0
