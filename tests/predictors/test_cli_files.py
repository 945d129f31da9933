"""`moe-serve predict` output files and --param: an output may not replace an input."""
from moe_serve.cli.main import main
from tests.predictors.synth import layer_map_trace


def test_an_output_may_not_replace_an_input_trace(tmp_path, capsys):
    """`predict fit --out t.npz --trace t.npz` wrote the predictor (safetensors) over the trace and `predict
    eval --json t.npz --test t.npz` the results (JSON): the next run failed on a file that was no longer a
    trace. Refused now with exit 2 naming both flags (any spelling of the path), the trace untouched."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(a)
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3, seed=1).save(b)
    before = {p: p.read_bytes() for p in (a, b)}
    b_again = str(tmp_path / "." / b.name)
    for argv, flags in (
        (["predict", "fit", "--trace", str(a), str(b), "--predictor", "popularity", "--out", b_again],
         ("--out", "--trace")),
        (["predict", "eval", "--train", str(a), "--test", str(b), "--predictors", "popularity", "--json", str(a)],
         ("--json", "--train")),
        (["predict", "eval", "--train", str(a), "--test", str(b), "--predictors", "popularity", "--json", b_again],
         ("--json", "--test")),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(f in err for f in flags) and "is also an input" in err, (argv, err)
        assert {p: p.read_bytes() for p in (a, b)} == before, argv
    out = tmp_path / "p.safetensors"  # another output is written as before
    assert main(["predict", "fit", "--trace", str(a), "--predictor", "popularity", "--out", str(out)]) == 0
    assert out.exists()

