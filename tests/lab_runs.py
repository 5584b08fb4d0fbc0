"""What the lab's tests train on: a tiny corpus and a tiny run shape (a few steps, a 2-layer model)."""

TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3

TINY = dict(batch_size=2, seq_len=16, steps=4, eval_every=2, eval_batches=1,
            config={"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 4})


def write_corpus(tmp_path_factory):
    """TEXT in a fresh folder; returns the file's path."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return path
