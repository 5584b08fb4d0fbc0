"""k2mini.data.dataset: the token stream, its train/validation split and the batches of each step."""

import pytest
import torch

from k2mini.data import ByteTokenizer, Corpus, TokenDataset, make_dataset
from k2mini.data.dataset import _derive_seed


def toy_corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    letters = [
        "".join(chr(97 + int(c)) for c in torch.randint(0, 13, (n,), generator=g)) for n in (3000, 2500, 4000)
    ]
    digits = ["".join(str(int(c)) for c in torch.randint(0, 10, (n,), generator=g)) for n in (2000, 1500)]
    return Corpus("letters", letters, ["l1", "l2", "l3"]) + Corpus("digits", digits, ["d1", "d2"])


@pytest.fixture(scope="module")
def ds():
    return make_dataset(toy_corpus(), val_fraction=0.2, seed=3, block_size=256)


def test_stream_layout(ds):
    corpus = toy_corpus()
    assert len(ds) == corpus.num_bytes + len(corpus) - 1
    assert int((ds.tokens == ByteTokenizer.doc_id).sum()) == len(corpus) - 1
    assert ds.tokens.dtype == torch.int16 and ds.vocab_size == 260
    n_blocks = -(-len(ds) // 256)
    assert ds.block_is_val.shape == (n_blocks,)
    # every domain contributes validation blocks
    assert all(ds.num_tokens("val", d) > 0 for d in ("letters", "digits"))
    # train and val segments tile the stream exactly
    segs = sorted(ds.segments("train") + ds.segments("val"))
    assert segs[0][0] == 0 and segs[-1][1] == len(ds)
    assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))


def test_batches_are_deterministic_per_step(ds):
    x1, y1 = ds.batch_for_step("train", 7, 4, 32)
    x2, y2 = ds.batch_for_step("train", 7, 4, 32, seed=3)  # the dataset's seed is the default
    again = make_dataset(toy_corpus(), val_fraction=0.2, seed=3, block_size=256)  # a "resumed run"
    x3, y3 = again.batch_for_step("train", 7, 4, 32)
    assert torch.equal(x1, x2) and torch.equal(x1, x3) and torch.equal(y1, y3)
    assert x1.shape == y1.shape == (4, 32) and x1.dtype == torch.long
    assert not torch.equal(x1, ds.batch_for_step("train", 8, 4, 32)[0])
    assert not torch.equal(x1, ds.batch_for_step("train", 7, 4, 32, seed=4)[0])
    assert not torch.equal(x1, ds.batch_for_step("val", 7, 4, 32)[0])
    assert torch.equal(ds.batch_for_step("val", 7, 4, 32)[0], ds.batch_for_step("val", 7, 4, 32)[0])
    # the domain is part of the key: a domain's batch is not the whole stream's
    assert not torch.equal(x1, ds.batch_for_step("train", 7, 4, 32, domain="letters")[0])


def test_derived_seed_is_pinned():
    # batch_for_step must give the same batches in every process and release; changing this
    # derivation silently changes every resumed run's data order
    assert _derive_seed("k2mini.data", 0, "train", None, 0) == 1663581141857642798


def test_targets_are_inputs_shifted(ds):
    starts = ds.sample_starts("train", 16, 40, ds.step_generator("train", 5))
    x, y = ds.batch_for_step("train", 5, 16, 40)
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == ds.tokens[s : s + 40].tolist()
        assert y[row].tolist() == ds.tokens[s + 1 : s + 41].tolist()


def _covered_blocks(ds, starts, seq_len):
    positions = starts[:, None] + torch.arange(seq_len + 1)
    return ds.block_is_val[positions // ds.block_size]


def test_train_and_validation_windows_are_disjoint(ds):
    g = torch.Generator().manual_seed(0)
    for seq_len in (1, 20, 100):
        assert not _covered_blocks(ds, ds.sample_starts("train", 2000, seq_len, g), seq_len).any()
        assert _covered_blocks(ds, ds.sample_starts("val", 2000, seq_len, g), seq_len).all()
        assert _covered_blocks(ds, ds.val_starts(seq_len), seq_len).all()


def test_domain_batches_stay_in_their_domain(ds):
    digit_ids = set(range(48, 58)) | {ByteTokenizer.doc_id}
    x, y = ds.batch_for_step("train", 0, 64, 50, domain="digits")
    assert set(x.flatten().tolist()) <= digit_ids and set(y.flatten().tolist()) <= digit_ids
    x, _ = ds.batch_for_step("val", 0, 64, 50, domain="letters")
    assert set(x.flatten().tolist()) <= set(range(97, 110)) | {ByteTokenizer.doc_id}
    for x, _ in ds.iter_val_batches(64, 50, domain="digits"):
        assert set(x.flatten().tolist()) <= digit_ids
    with pytest.raises(ValueError, match="unknown domain 'klingon'"):
        ds.batch_for_step("train", 0, 1, 8, domain="klingon")


def test_validation_batches_are_fixed(ds):
    first = list(ds.iter_val_batches(4, 32, max_batches=3))
    second = list(ds.iter_val_batches(4, 32, max_batches=3))
    assert len(first) == 3 and all(x.shape == (4, 32) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    everything = list(ds.iter_val_batches(4, 32))
    n_windows = sum(len(x) for x, _ in everything)
    assert n_windows == len(ds.val_starts(32)) > 12
    thinned = ds.val_starts(32, 12)
    assert len(thinned) == 12 and len(set(thinned.tolist())) == 12
    assert thinned[-1] > ds.val_starts(32)[len(ds.val_starts(32)) // 2]  # spans the whole val set


def test_split_depends_on_seed_and_fraction():
    corpus = toy_corpus()
    a = make_dataset(corpus, val_fraction=0.2, seed=0, block_size=256).block_is_val
    b = make_dataset(corpus, val_fraction=0.2, seed=1, block_size=256).block_is_val
    assert not torch.equal(a, b)
    assert make_dataset(corpus, val_fraction=0.0, block_size=256).num_tokens("val") == 0


def test_dataset_errors_are_clear(ds):
    with pytest.raises(ValueError, match="split must be one of"):
        ds.batch_for_step("test", 0, 1, 8)
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 1000 tokens"):
        ds.batch_for_step("val", 0, 1, 999)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ds.batch_for_step("train", 0, 0, 8)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(ds.iter_val_batches(0, 8))
    with pytest.raises(ValueError, match="val_fraction"):
        make_dataset(toy_corpus(), val_fraction=1.0)


def test_domain_spans_must_tile_the_stream():
    with pytest.raises(ValueError, match="domain_spans must tile"):
        TokenDataset(torch.zeros(10, dtype=torch.long), [(0, 5, "a"), (6, 10, "b")])
