"""CLI smoke tests through `moe_serve.cli.main.main([...])`."""
from moe_serve.cli.main import main
from predictors.traces import load_trace


def test_generate_prints_text_throughput_and_load(tiny_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nOnce upon a time\n")
    rc = main(["generate", "--model", str(tiny_dir), "--prompts-file", str(prompts), "--prompt", "def add",
               "--max-tokens", "6", "--max-num-seqs", "2", "--temperature", "0.7", "--seed", "3", "--ignore-eos"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("--- [") == 3 and "(length, 6 tokens)" in out
    assert "output tokens/s" in out and "expert load per MoE layer" in out


def test_info_and_record_trace(tiny_dir, capsys, tmp_path):
    assert main(["info", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "mixtral" in out and "top_k" in out and "active per token" in out
    trace_path = tmp_path / "t.npz"
    assert main(["record-trace", "--model", str(tiny_dir), "--prompt", "hello there", "--prompt", "abc",
                 "--max-tokens", "3", "--out", str(trace_path), "--record-hidden"]) == 0
    trace = load_trace(trace_path)
    assert trace.num_sequences == 2 and trace.hidden is not None


def test_bad_input_exits_2_with_the_field(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--top-p", "2"]) == 2
    assert "SamplingParams.top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["info", "/nonexistent/dir"]) == 2


def test_generate_with_the_offloading_store_from_flags(tiny_dir, capsys):
    """The expert-cache section's flags reach `generate` (every engine section but the server's does)."""
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "hello", "--max-tokens", "4",
               "--expert-cache-slots", "2", "--cache-policy", "lru", "--cpu-experts", "off"])
    assert rc == 0 and "(length, 4 tokens)" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--cache-policy", "nope"]) == 2
    assert "cache_policy" in capsys.readouterr().err


def _small_trace(path):
    from tests.predictors.synth import layer_map_trace

    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(path)
    return str(path)


def test_output_flags_naming_a_directory_fail_before_the_work(tiny_dir, tmp_path, capsys):
    """An output path that is a directory ended each tool in a traceback from open() (IsADirectoryError),
    after the replay / fit / generation had run; now exit 2 with one line naming the flag, up front."""
    trace = _small_trace(tmp_path / "t.npz")
    plan = tmp_path / "plan.json"
    assert main(["place", "--trace", trace, "--ep", "2", "--algorithm", "contiguous", "--out", str(plan)]) == 0
    capsys.readouterr()
    d = str(tmp_path)
    for argv, flag in [
        (["cache-sim", "--trace", trace, "--policy", "lru", "--json", d], "--json"),
        (["predict", "fit", "--trace", trace, "--predictor", "popularity", "--out", d], "--out"),
        (["predict", "eval", "--train", trace, "--test", trace, "--predictors", "popularity", "--json", d], "--json"),
        (["place", "--trace", trace, "--ep", "2", "--out", d], "--out"),
        (["place", "eval", "--plan", str(plan), "--trace", trace, "--json", d], "--json"),
        (["record-trace", "--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "1", "--out", d], "--out"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{flag} {d}: is a directory" in err and "Traceback" not in err, argv


def test_output_flags_create_missing_directories(tmp_path):
    trace = _small_trace(tmp_path / "t.npz")
    plan = tmp_path / "new" / "dir" / "plan.json"
    assert main(["place", "--trace", trace, "--ep", "2", "--algorithm", "contiguous", "--out", str(plan)]) == 0
    assert plan.is_file()


def test_one_token_per_request_prints_no_nan_time_per_output_token(tiny_dir, capsys):
    """TPOT needs a second token: with --max-tokens 1 the line said 'time per output token nan ms'."""
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hello", "--max-tokens", "1", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "time to first token" in out
    assert "no time per output token (no request made a second token)" in out
