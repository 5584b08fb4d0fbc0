"""A forward pass through a checkpoint one layer piece at a time, recording how every MoE layer routes.

Memory is bounded by one piece plus activations, whatever the model's size. Each layer is the model's
own `DecoderLayer` (built on the meta device) run by its own `forward`, with its pieces standing in
for themselves: each is read from the checkpoint when the forward calls it and freed when it returns.

    norms, attention    read, run over the batch (in row chunks if its logits are large), free
    router + bias       read, route every token, free
    routed experts      an ExpertProvider for the layer's `Experts`: only those that received tokens,
                        one at a time: read, run, free
    shared experts      read, run, free       (a dense layer's FFN instead of the three above)

So the arithmetic is the model's, written once (MLA, `route`, the grouped experts' dispatch, the
residual structure), and the tokens' expert counts equal the in-memory telemetry exactly.

With `state_dir`, the residual stream and the statistics so far are written there (atomically) after
every layer, and a rerun with the same tokens resumes at the layer the interrupted one reached.
"""

from __future__ import annotations

import hashlib
import json
from itertools import pairwise
from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write
from ..moe import ExpertProvider
from ..rope import rope_cos_sin, rope_frequencies
from . import routing_stats
from .pieces import check_experts, check_piece, free_piece, load_expert, load_piece, meta_layer, piece_bytes
from .result import StreamResult
from .source import checkpoint_bytes, checkpoint_config, open_reader, resolve_layers

EMBEDDING = "model.embed_tokens.weight"
STATE_FILE = "stream-state.pt"
STATE_VERSION = 1


def as_token_batch(token_ids, vocab_size: int) -> torch.Tensor:
    """token_ids as a (B, T) int64 tensor: a tensor (1-D or 2-D), a list of ints or of equal-length lists."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids
    else:
        rows = list(token_ids)
        if rows and not isinstance(rows[0], int) and not hasattr(rows[0], "__len__"):
            raise TypeError(f"token_ids: expected ints or lists of ints, got {type(rows[0]).__name__}")
        if rows and not isinstance(rows[0], int):
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise ValueError(f"token_ids: rows have different lengths {sorted(lengths)}; pass equal-length rows")
        ids = torch.tensor(rows, dtype=torch.int64)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"token_ids must be (batch, seq) or a single sequence, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be integers, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"token_ids is empty (shape {tuple(ids.shape)}): there is nothing to route")
    ids = ids.to(torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token_ids contains token id {bad}, outside the checkpoint's vocabulary [0, {vocab_size})")
    return ids


def embedding_rows(reader, ids: torch.Tensor, max_gap: int = 64, max_rows: int = 4096) -> torch.Tensor:
    """embed_tokens(ids) reading only the table rows the tokens use (nearby rows in one read).

    Memory: the distinct rows plus one read of at most `max_rows` rows, never the whole table.
    """
    H = reader.shape(EMBEDDING)[1]
    uniq = torch.unique(ids)  # sorted
    table = torch.empty(len(uniq), H, dtype=torch.float32)
    values = uniq.tolist()
    start = 0
    while start < len(values):
        end = start + 1
        while end < len(values) and values[end] - values[end - 1] <= max_gap and values[end] - values[start] < max_rows:
            end += 1
        a, b = values[start], values[end - 1] + 1
        block = reader.get(EMBEDDING, torch.float32, rows=slice(a, b))
        table[start:end] = block[uniq[start:end] - a]
        del block
        start = end
    return table[torch.searchsorted(uniq, ids)]  # (B, T, H)


def run_attention(attn, h, cos, sin, budget_bytes: int):
    """The attention module over the batch; split into row chunks only when the (B, heads, T, T) logits
    would exceed `budget_bytes` (unsplit, it is exactly the model's call)."""
    B, T = h.shape[:2]
    per_row = 3 * attn.num_heads * T * T * 4  # logits, masked copy and probabilities, float32
    step = max(1, budget_bytes // per_row)
    if step >= B:
        out, max_logit, _ = attn(h, cos, sin)
        return out, max_logit
    outs, maxes = [], []
    for s in range(0, B, step):
        o, m, _ = attn(h[s : s + step], cos, sin)
        outs.append(o)
        maxes.append(m)
    return torch.cat(outs), torch.stack(maxes).amax(0)


def _fingerprint(config_hf: dict, ids: torch.Tensor, chosen: list[int], labels) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(config_hf, sort_keys=True, default=str).encode())
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    h.update(json.dumps([chosen, labels]).encode())
    return h.hexdigest()


def _save_state(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside `path`, flushed, then renamed over it."""
    with atomic_write(path) as f:
        torch.save(state, f)


def _load_state(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable stream state ({type(e).__name__}: {e}); remove it to start over") from None
    if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{path}: this state was written for other tokens, layers or another model; "
            "use another state_dir or remove the file to start over"
        )
    return state


def stream_activations(
    source,
    token_ids,
    layers=None,
    labels=None,
    state_dir=None,
    attention_budget_bytes: int = 2**30,
    progress: bool = True,
    fs=None,
) -> StreamResult:
    """Push tokens through a checkpoint layer by layer and record how every MoE layer routes them.

    source: a checkpoint directory, `hf://owner/repo`, an http(s) URL, or an open CheckpointReader.
    token_ids: (B, T) ints (or one sequence), in the checkpoint's vocabulary.
    layers: the layers whose routing is recorded (None: all). The pass runs from layer 0 to the last
        one selected; out-of-range indices are a ValueError.
    labels: one string per batch row (e.g. "prose", "code"); counts are then also kept per label.
    state_dir: a directory for the resumable state (residual stream + statistics after each layer).
    attention_budget_bytes: attention runs over row chunks when the batch's logits would exceed this.
    Returns a StreamResult (counts, mean weights, co-activation, entropy, parameter shares, hidden).
    """
    reader, own = open_reader(source, fs)
    try:
        return _stream(reader, token_ids, layers, labels, state_dir, attention_budget_bytes, progress)
    finally:
        if own:
            reader.close()


def _stream(reader, token_ids, layers, labels, state_dir, budget, progress) -> StreamResult:
    config = checkpoint_config(reader)
    ids = as_token_batch(token_ids, config.vocab_size)
    B, T = ids.shape
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != B:
            raise ValueError(f"labels: {len(labels)} given for a batch of {B} rows (one per row)")
    chosen = resolve_layers(config, layers)
    recorded = [i for i in chosen if config.is_moe_layer(i)]
    if not recorded:
        raise ValueError(f"layers {layers!r}: no MoE layer selected (first_k_dense_replace={config.first_k_dense_replace})")
    stop = chosen[-1] + 1
    E, k = config.n_routed_experts, config.num_experts_per_tok

    # every tensor the pass will read: present, floating, of the config's shape (headers only)
    reader.check(EMBEDDING, shape=(config.vocab_size, config.hidden_size), floating=True)
    for i in range(stop):
        layer = meta_layer(config, i)
        prefix = f"model.layers.{i}."
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm"):
            check_piece(reader, getattr(layer, name), prefix + name + ".")
        if layer.is_moe:
            check_piece(reader, layer.mlp.gate, prefix + "mlp.gate.")
            if layer.mlp.shared_experts is not None:
                check_piece(reader, layer.mlp.shared_experts, prefix + "mlp.shared_experts.")
            check_experts(reader, i, E, config.hidden_size, config.moe_intermediate_size)
        else:
            check_piece(reader, layer.mlp, prefix + "mlp.")

    config_hf = config.to_hf()
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    fingerprint = _fingerprint(config_hf, ids, chosen, labels)
    state = _load_state(state_path, fingerprint) if state_path is not None else None
    resumed_at = None
    if state is None:
        state = {"version": STATE_VERSION, "fingerprint": fingerprint, "next_layer": 0, "records": [],
                 "max_logits": [], "touched": torch.zeros(B * T, dtype=torch.int64), "bytes_read": 0}
        x = None
    else:
        x = state["hidden"]
        resumed_at = state["next_layer"] if state["next_layer"] < stop else None
    bytes_before = reader.bytes_read - state["bytes_read"]

    with torch.no_grad():
        if x is None:
            x = embedding_rows(reader, ids)  # (B, T, H)
        cos, sin = rope_cos_sin(torch.arange(T), *rope_frequencies(config, seq_len=T))
        bar = tqdm(range(state["next_layer"], stop), desc="layers", unit="layer", disable=not progress,
                   initial=state["next_layer"], total=stop)
        for i in bar:
            x, max_logit, record = _layer(reader, config, i, x, cos, sin, budget, bar)
            state["max_logits"].append(max_logit)
            if record is not None:
                state["touched"] += routing_stats.distinct_per_token(record["indices"])
                if i in recorded:
                    state["records"].append(_summarize(record, i, E, B, labels))
            state.update(next_layer=i + 1, hidden=x, bytes_read=reader.bytes_read - bytes_before)
            if state_path is not None:
                _save_state(state_path, state)

    records = state["records"]
    b = config.param_breakdown()
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    fixed = sum(b["active"].values()) - b["active"]["routed_experts"]
    uncomputed = sum(1 for i in range(stop, config.num_hidden_layers) if config.is_moe_layer(i))
    touched = state["touched"].to(torch.float64) + k * uncomputed  # layers not run: k experts assumed
    share = (fixed + expert * touched) / sum(b["total"].values())
    by_label = {}
    if labels is not None:
        for lab in dict.fromkeys(labels):
            by_label[lab] = torch.stack([r["by_label"][lab] for r in records])
    return StreamResult(
        source=str(reader.source),
        config=config_hf,
        layers=[r["layer"] for r in records],
        top_k=k,
        n_tokens=B * T,
        counts=torch.stack([r["counts"] for r in records]),
        weight_sum=torch.stack([r["weight_sum"] for r in records]),
        coactivation=torch.stack([r["coactivation"] for r in records]),
        weight_entropy=torch.stack([r["weight_entropy"] for r in records]),
        token_param_share=share.reshape(B, T),
        hidden=state["hidden"],
        max_logits=torch.stack(state["max_logits"]),
        labels=labels,
        counts_by_label=by_label,
        experts_loaded=[int(r["experts_loaded"]) for r in records],
        bytes_read=state["bytes_read"],
        checkpoint_bytes=checkpoint_bytes(reader),
        resumed_at=resumed_at,
    )


class OnDemand(nn.Module):
    """Stands in for one piece of a meta layer: reads it from the checkpoint when called, runs it
    (through `run` if given, else the piece itself), and frees it when it returns."""

    def __init__(self, reader, piece: nn.Module, prefix: str, run=None):
        super().__init__()
        self.reader, self.piece, self.prefix, self.run = reader, piece, prefix, run

    def forward(self, *args):
        load_piece(self.reader, self.piece, self.prefix)
        try:
            return (self.run or self.piece)(*args)
        finally:
            free_piece(self.piece)


class CheckpointExperts(ExpertProvider):
    """Layer `layer`'s routed experts read from the checkpoint one at a time; the next one is announced
    to the reader before the current one is read. Reports progress on `bar`."""

    def __init__(self, reader, layer: int, bar):
        self.reader, self.layer, self.bar = reader, layer, bar
        self.following, self.loaded, self.n_done = {}, 0, 0

    def plan(self, experts):
        self.following = dict(pairwise(experts))
        self.loaded, self.n_done = len(experts), 0

    def get(self, e):
        if e in self.following:
            self.reader.will_need_expert(self.layer, self.following[e])
        return load_expert(self.reader, self.layer, e)

    def done(self, e):
        self.n_done += 1
        self.bar.set_postfix_str(f"layer {self.layer}: expert {self.n_done}/{self.loaded}", refresh=False)


def streamed_layer(reader, config, i: int, budget: int, bar):
    """The model's DecoderLayer i on the meta device, every piece read on demand (see the module doc)."""
    layer = meta_layer(config, i)
    prefix = f"model.layers.{i}."
    attn = layer.self_attn

    def attention(h, cos, sin, *_):  # no cache: the whole sequence at once
        return (*run_attention(attn, h, cos, sin, budget), None)

    layer.self_attn = OnDemand(reader, attn, prefix + "self_attn.", attention)
    for name in ("input_layernorm", "post_attention_layernorm"):
        setattr(layer, name, OnDemand(reader, getattr(layer, name), prefix + name + "."))
    if not layer.is_moe:
        layer.mlp = OnDemand(reader, layer.mlp, prefix + "mlp.")
        return layer
    moe = layer.mlp
    moe.gate = OnDemand(reader, moe.gate, prefix + "mlp.gate.")
    if moe.shared_experts is not None:
        moe.shared_experts = OnDemand(reader, moe.shared_experts, prefix + "mlp.shared_experts.")
    moe.experts.provider = CheckpointExperts(reader, i, bar)
    return layer


def _layer(reader, config, i, x, cos, sin, budget, bar):
    """One decoder layer: (x, max_logit per head, routing record or None for a dense layer)."""
    layer = streamed_layer(reader, config, i, budget, bar)
    x, max_logit, routing, _ = layer(x, cos, sin)
    if routing is None:
        return x, max_logit, None
    loaded = layer.mlp.experts.provider.loaded
    record = {"indices": routing.indices, "weights": routing.weights, "experts_loaded": loaded}
    return x, max_logit, record


def _summarize(record, layer, n_experts, batch, labels) -> dict:
    """A layer's routing reduced to what the result keeps (counts, weights, pairs, entropy)."""
    idx, w = record["indices"], record["weights"]
    out = {
        "layer": layer,
        "counts": routing_stats.expert_counts(idx, n_experts),
        "weight_sum": routing_stats.weight_sums(idx, w, n_experts),
        "coactivation": routing_stats.coactivation_counts(idx, n_experts),
        "weight_entropy": routing_stats.weight_entropy(w).mean(),
        "experts_loaded": record["experts_loaded"],
        "by_label": {},
    }
    if labels is not None:
        rows = rearrange(idx, "(b t) k -> b t k", b=batch)
        for lab in dict.fromkeys(labels):
            keep = torch.tensor([x == lab for x in labels])
            out["by_label"][lab] = routing_stats.expert_counts(rows[keep], n_experts)
    return out


def memory_estimate(config, batch: int, seq_len: int, attention_budget_bytes: int = 2**30) -> dict:
    """The design's memory bound for streaming B x T tokens, in bytes (beyond the interpreter itself).

    largest_piece: the biggest module ever materialized at once (float32): attention with its norms, a
    dense FFN, the router, the shared experts or one routed expert. activations: the residual stream
    and its temporaries, attention projections and the (chunked) logits, routing scores, the largest
    expert or FFN intermediate, and the embedding rows. The reader's fp8 scratch adds a fixed 16 MiB.
    """
    c = config
    layer_pieces = {}
    for i in sorted({0, c.first_k_dense_replace} & set(range(c.num_hidden_layers))):
        layer = meta_layer(c, i)
        attn = sum(piece_bytes(m) for m in (layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm))
        layer_pieces["attention"] = attn
        if layer.is_moe:
            layer_pieces["router"] = piece_bytes(layer.mlp.gate)
            if layer.mlp.shared_experts is not None:
                layer_pieces["shared_experts"] = piece_bytes(layer.mlp.shared_experts)
            layer_pieces["routed_expert"] = 3 * c.hidden_size * c.moe_intermediate_size * 4
        else:
            layer_pieces["dense_ffn"] = piece_bytes(layer.mlp)
    name = max(layer_pieces, key=layer_pieces.get)
    N, H, heads, f = batch * seq_len, c.hidden_size, c.num_attention_heads, 4
    per_row = 3 * heads * seq_len * seq_len * f
    rows = min(batch, max(1, attention_budget_bytes // per_row))
    width = max(c.moe_intermediate_size * max(c.n_shared_experts, 1), c.intermediate_size if c.first_k_dense_replace else 0)
    activations = (
        10 * N * H * f  # residual stream, normed copies, attention and FFN outputs
        + 2 * N * heads * (c.qk_head_dim + c.qk_nope_head_dim + c.v_head_dim) * f  # q, k, v per head
        + 2 * N * ((c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim) * f  # latents
        + rows * per_row  # logits, masked copy, probabilities
        + 4 * N * c.n_routed_experts * f  # router scores and choice
        + 3 * N * width * f  # SwiGLU intermediates
        + (N + min(c.vocab_size, 4096)) * H * f  # embedding rows and one read of them
        + 16 * 2**20  # the reader's scratch
    )
    return {"largest_piece": layer_pieces[name], "largest_name": name, "pieces": layer_pieces, "activations": activations}
