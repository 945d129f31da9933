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
from training.train_default import parse_args, prepare

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
