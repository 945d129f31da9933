"""Predictor.save: a write that fails (disk full, a missing directory) is an OSError naming the file, so
`predict fit` exits 2 with one line; it was safetensors' own SafetensorError, a traceback from the CLI.
The previous file stays whole (safetensors writes beside it and renames)."""
from __future__ import annotations

import pytest

from moe_serve.cli.main import main
from predictors.registry import load_predictor, make_predictor
from tests.predictors.synth import layer_map_trace
from tests.predictors.test_trace_save import file_size_limit


def test_a_failed_save_is_an_oserror_naming_the_file_and_leaves_the_old_one(tmp_path, capsys):
    path = tmp_path / "p.safetensors"
    small = layer_map_trace(tokens=40, L=3, E=8, K=2, seqs=2)
    make_predictor("popularity", 3, 8, 2, 1).fit([small]).save(path)
    before = path.read_bytes()
    big = make_predictor("mlp", 3, 8, 2, 1, epochs=1, dim=256).fit([small])  # ~1 MB of weights
    with file_size_limit(len(before) + 64 * 1024), pytest.raises(OSError, match=f"predictor file {path}: .*File too large"):
        big.save(path)
    assert path.read_bytes() == before and load_predictor(path).name == "popularity"
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left behind
    trace = tmp_path / "t.npz"
    small.save(trace)
    with file_size_limit(len(before) + 64 * 1024):
        rc = main(["predict", "fit", "--trace", str(trace), "--predictor", "mlp", "--param", "epochs=1",
                   "--param", "dim=256", "--out", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"moe-serve predict: error: predictor file {path}: could not write"), err
    assert path.read_bytes() == before


def test_save_to_a_missing_directory_names_it(tmp_path):
    pred = make_predictor("popularity", 3, 8, 2, 1).fit([layer_map_trace(tokens=40, L=3, E=8, K=2, seqs=2)])
    with pytest.raises(FileNotFoundError, match="no-such-dir/p.safetensors: directory .*no-such-dir does not exist"):
        pred.save(tmp_path / "no-such-dir" / "p.safetensors")
