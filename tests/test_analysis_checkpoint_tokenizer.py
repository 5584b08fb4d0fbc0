"""Checkpoint tokenizers, offline: K2's tiktoken file, tokenizer.json, and the minis' bytes. The tests
write small tokenizers of each format themselves."""

import base64
import json

import pytest
import torch

from http_range_server import RangeServer
from k2mini.analysis import TokenizerError, encode_batch, load_tokenizer
from k2mini.analysis.checkpoint_tokenizer import split_runs

MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"34", b"\xe5\xa4"]


def write_tiktoken(path, merges=MERGES):
    """tiktoken.model (256 bytes, then merges, each `base64 rank`) + tokenizer_config.json, as K2 ships."""
    path.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([i]) for i in range(256)] + merges
    (path / "tiktoken.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    n = len(tokens)
    added = {str(n): {"content": "[BOS]", "special": True}, str(n + 1): {"content": "[EOS]", "special": True}}
    (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added, "bos_token": "[BOS]"}))
    (path / "config.json").write_text(json.dumps({"model_type": "kimi_k2", "vocab_size": n + 258}))
    return n


def test_tiktoken_file_as_kimi_k2_ships_it(tmp_path):
    pytest.importorskip("tiktoken")
    n = write_tiktoken(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "tiktoken" and tok.vocab_size == n + 258
    assert tok.encode("hello world") == [259, 260, ord("o"), ord("r"), ord("l"), ord("d")]
    # Kimi's split keeps numbers to 3 digits: "12345" -> "123" | "45", so the merge "34" cannot apply
    assert tok.encode("12345") == [ord(c) for c in "12345"]
    assert tok.encode("34") == tok.encode("x34")[1:] == [256 + MERGES.index(b"34")]
    assert tok.encode("[BOS]hello") == [n, 259]  # special tokens are recognized, as Kimi's encode does
    text = "Now is the winter 天地 of 2024 — déjà vu\n\n  x"
    assert tok.decode(tok.encode(text)) == text


def test_long_runs_are_encoded_in_slices():
    assert list(split_runs("a" * 10 + "  " + "b" * 3, limit=4)) == ["aaaa", "aaaa", "aa  bbb"]
    assert "".join(split_runs("xy " * 50, limit=4)) == "xy " * 50


def test_tokenizer_json_as_deepseek_v3_ships_it(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin▁of▁sentence|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["def main():\n    return 0\n", "To be, or not to be"] * 20, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "vocab_size": 300}))
    text = "def to_be():\n    return not 0"
    with RangeServer(tmp_path) as server:
        for source in (tmp_path, server.url):
            tok = load_tokenizer(source)
            assert tok.kind == "tokenizers"
            assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
            assert tok.decode(tok.encode(text)) == text


def test_tiktoken_over_http(tmp_path):
    pytest.importorskip("tiktoken")
    write_tiktoken(tmp_path)
    with RangeServer(tmp_path) as server:
        assert load_tokenizer(server.url).encode("hello") == [259]


def test_byte_level_minis_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_k2", "vocab_size": 260}))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "bytes" and tok.encode("hé") == list("hé".encode())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_k2", "vocab_size": 163840}))
    with pytest.raises(TokenizerError, match="no tokenizer files .*163840"):
        load_tokenizer(tmp_path)
    (tmp_path / "tiktoken.model").write_bytes(b"aGVsbG8= not-a-rank\n")
    pytest.importorskip("tiktoken")
    with pytest.raises(TokenizerError, match="tiktoken.model: line 1"):
        load_tokenizer(tmp_path)


def test_encode_batch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_k2", "vocab_size": 260}))
    tok = load_tokenizer(tmp_path)
    ids, labels = encode_batch(tok, {"prose": "abcdefghij" * 3, "code": "x = 1\n" * 2}, seq_len=8)
    assert ids.shape == (3 + 1, 8) and labels == ["prose"] * 3 + ["code"]
    assert ids[0].tolist() == list(b"abcdefgh") and ids.dtype == torch.int64
    ids, labels = encode_batch(tok, {"prose": "abcdefghij" * 3}, seq_len=8, rows_per_text=2)
    assert ids.shape == (2, 8)
    with pytest.raises(ValueError, match="code: the text tokenizes to no tokens"):
        encode_batch(tok, {"prose": "abc", "code": ""}, seq_len=8)
