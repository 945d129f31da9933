"""Tokenizer.token_bytes: a token's own bytes, also for part of a multi-byte UTF-8 character (whose
decoded text is U+FFFD), checked against GPT-2's byte alphabet as transformers writes it."""
from pathlib import Path

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from moe_serve.engine.tokenizer import load_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "moe_serve" / "default_model"
UNICODE = "Héllo wörld, naïve café: unicode text ✓ 日本語 too."


def reference_bytes(tok, token_id: int) -> bytes:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(byte_of[c] for c in tok.backend.id_to_token(token_id))


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_token_bytes_rebuild_text_split_inside_characters(which, tiny_dir):
    tok = load_tokenizer(tiny_dir if which == "tiny" else DEFAULT_MODEL)
    ids = tok.encode(UNICODE)
    partial = [t for t in ids if "\ufffd" in tok.decode([t])]
    assert partial, "the text must put part of a character in a token of its own"
    for t in partial:
        assert tok.token_bytes(t) == reference_bytes(tok, t)
        assert tok.token_bytes(t) != "\ufffd".encode()  # the old bytes: those of the replacement character
    assert b"".join(tok.token_bytes(t) for t in ids).decode("utf-8") == UNICODE
    # every ordinary token of the vocabulary: its bytes are those its spelling stands for
    added = set(tok.backend.get_added_tokens_decoder())
    for t in range(tok.backend.get_vocab_size()):
        if t not in added:
            assert tok.token_bytes(t) == reference_bytes(tok, t), t
    eos = tok.eos_token_ids[0]  # a special token: its text
    assert tok.token_bytes(eos) == tok.decode([eos], skip_special_tokens=False).encode()


def test_a_single_byte_token_is_that_byte(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    lead = tok.backend.token_to_id(bytes_to_unicode()[0xE2])  # the first byte of "✓" (E2 9C 93) alone
    assert tok.decode([lead]) == "\ufffd" and tok.token_bytes(lead) == b"\xe2"


def sentencepiece_style_dir(tmp_path) -> Path:
    """A Llama/Mixtral-style tokenizer.json: BPE over "▁"-for-space pieces with byte fallback (<0xNN>
    tokens for bytes no piece covers), decoded by Replace, ByteFallback, Fuse, Strip."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "h", "i", "w", "o", "▁h", "▁hi", "▁w", "▁wo"):
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "i"), ("▁", "w"), ("▁w", "o")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_byte_fallback_tokens_and_spaces_of_a_sentencepiece_vocabulary(tmp_path):
    tok = load_tokenizer(sentencepiece_style_dir(tmp_path))
    ids = tok.encode("hi 日 wo")
    pieces = [tok.backend.id_to_token(t) for t in ids]
    assert pieces == ["▁hi", "▁", "<0xE6>", "<0x97>", "<0xA5>", "▁wo"], pieces
    assert [tok.token_bytes(t) for t in ids] == [b" hi", b" ", b"\xe6", b"\x97", b"\xa5", b" wo"]
    # decoded alone, a piece loses its space (Strip) and a lone byte is U+FFFD: the bytes keep both
    assert tok.decode([ids[-1]]) == "wo" and tok.decode([ids[2]]) == "\ufffd"
    assert b"".join(tok.token_bytes(t) for t in ids).decode() == " hi 日 wo"
    assert tok.token_bytes(tok.backend.token_to_id("</s>")) == b"</s>"


def test_reading_the_decoder_does_not_serialize_the_vocabulary():
    """TokenBytes is built at the first logprobs request, on the server's event loop: it serialized the
    whole tokenizer to JSON to read its decoder (0.47 s for 150k tokens on a busy 2-core CPU, every stream
    held up meanwhile). It reads only the decoder now: far below one serialization, timed in the same run."""
    import time

    from tokenizers import Tokenizer, decoders, models

    from moe_serve.engine.token_bytes import TokenBytes

    tok = Tokenizer(models.BPE(vocab={f"tok{i}": i for i in range(150_000)}, merges=[]))
    tok.decoder = decoders.ByteLevel()
    start = time.perf_counter()
    tok.to_str()
    serialize = time.perf_counter() - start
    start = time.perf_counter()
    table = TokenBytes(tok)
    build = time.perf_counter() - start
    assert table.byte_level and build < serialize / 5, (build, serialize)
    assert table(tok.token_to_id("tok7")) == b"tok7"
