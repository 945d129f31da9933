"""A recorded trace may not be written over the files the same run reads (replayed trace, prompts file)."""
import pytest

from moe_serve import LLM
from moe_serve.cli.main import main


@pytest.fixture
def recorded(tiny_dir, tmp_path):
    path = tmp_path / "t.npz"
    assert main(["record-trace", "--model", str(tiny_dir), "--prompt", "hello there", "--max-tokens", "2",
                 "--out", str(path)]) == 0
    return path


def test_engine_refuses_to_record_over_the_trace_it_replays(tiny_dir, recorded):
    """LLM(record_trace=X, replay_trace=X) replayed X and, at close, wrote the new recording over it: the
    trace was gone (with other prompts or lengths it became another one). Refused on construction."""
    before = recorded.read_bytes()
    other_spelling = str(recorded.parent / "." / recorded.name)
    with pytest.raises(ValueError, match=r"trace\.record_trace .* is also trace\.replay_trace"):
        LLM(model=str(tiny_dir), record_trace=other_spelling, replay_trace=str(recorded))
    assert recorded.read_bytes() == before


def test_cli_refuses_an_output_trace_naming_an_input(tiny_dir, recorded, tmp_path, capsys):
    """record-trace --out naming its --replay-trace or --prompts-file (generate --record-trace likewise)
    replaced that input with the recording: the prompts file became an .npz archive."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\nthe cat\n")
    before = {p: p.read_bytes() for p in (recorded, prompts)}
    run = ["--model", str(tiny_dir), "--max-tokens", "2"]
    for argv, flags in (
        (["record-trace", *run, "--replay-trace", str(recorded), "--out", str(recorded)], ("--out", "--replay-trace")),
        (["record-trace", *run, "--prompts-file", str(prompts), "--out", str(prompts)], ("--out", "--prompts-file")),
        (["generate", *run, "--prompts-file", str(prompts), "--record-trace", str(prompts)],
         ("--record-trace", "--prompts-file")),
        (["generate", *run, "--replay-trace", str(recorded), "--record-trace", str(recorded)],
         ("--record-trace", "--replay-trace")),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(f in err for f in flags), (argv, err)
        assert {p: p.read_bytes() for p in (recorded, prompts)} == before, argv
