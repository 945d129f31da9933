from moe_serve.engine.detokenizer import IncrementalDetokenizer, find_stop
from moe_serve.engine.tokenizer import Tokenizer
from tests.engine.tiny_checkpoint import train_tokenizer

TEXT = "Héllo wörld, naïve café ✓ 日本語: the quick brown fox."


def _tok():
    return Tokenizer(train_tokenizer(384), "tokenizers", [])


def test_incremental_equals_full_decode_and_never_shows_broken_chars():
    tok = _tok()
    ids = tok.encode(TEXT)
    d = IncrementalDetokenizer(tok, tok.encode("prompt "), [])
    seen = []
    for t in ids:
        d.add(t)
        seen.append(d.visible(False))
        assert "\ufffd" not in seen[-1]
    d.add(None, final=True)
    assert d.visible(True) == tok.decode(ids) == TEXT


def test_stop_string_cuts_and_holds_back():
    tok = _tok()
    d = IncrementalDetokenizer(tok, [1], ["brown fox"])
    shown = ""
    for t in tok.encode(TEXT):
        stopped = d.add(t)
        now = d.visible(stopped)
        assert now.startswith(shown)  # text already shown is never taken back
        shown = now
        if stopped:
            break
    assert stopped and shown == TEXT[: TEXT.index("brown fox")]


def test_find_stop_earliest():
    assert find_stop("abcabc", ["ca", "b"], 0) == 1
    assert find_stop("abcabc", ["ca"], 3) is None
