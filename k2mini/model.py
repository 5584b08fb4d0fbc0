"""The K2 decoder: embeddings, N x (MLA + dense-or-MoE FFN), final norm, lm_head.

Module and parameter names mirror the Hugging Face DeepseekV3 state dict (`model.layers.3.self_attn.
kv_b_proj.weight`, ...), except that routed experts are stacked: `mlp.experts.gate_proj` is (E, I, H)
where HF stores E separate `mlp.experts.{e}.gate_proj.weight` matrices.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .attention import LayerCache, MultiHeadLatentAttention
from .config import K2Config
from .moe import MoE, FeedForward, expert_load
from .norm import RMSNorm
from .rope import rope_cos_sin, rope_frequencies, rope_type


@dataclass
class RouterRecord:
    """One MoE layer's routing of a batch (B, T tokens)."""

    layer: int
    indices: torch.Tensor  # (B, T, k) chosen experts
    weights: torch.Tensor  # (B, T, k) mixing weights
    scores: torch.Tensor  # (B, T, E) sigmoid scores, float32, still attached to the graph
    load: torch.Tensor  # (E,) token-slots per expert


@dataclass
class Telemetry:
    max_logits: torch.Tensor  # (num_hidden_layers, num_attention_heads), softmax scale included
    routers: list[RouterRecord] = field(default_factory=list)

    @property
    def loads(self) -> torch.Tensor:
        """(n_moe_layers, E) token-slots per expert."""
        return torch.stack([r.load for r in self.routers])


@dataclass
class KVCache:
    """Per-layer MLA cache (normed latent + rotated shared rope key) for incremental decoding."""

    layers: list[LayerCache | None]

    @classmethod
    def empty(cls, config: K2Config) -> "KVCache":
        return cls([None] * config.num_hidden_layers)

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0].kv_latent.shape[1]

    def numel_per_token(self) -> int:
        return sum(c.kv_latent.shape[-1] + c.k_rope.shape[-1] for c in self.layers if c is not None)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, vocab)
    telemetry: Telemetry | None = None
    cache: KVCache | None = None


class DecoderLayer(nn.Module):
    def __init__(self, config: K2Config, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(index)
        self.mlp = MoE(config) if self.is_moe else FeedForward(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, cache=None, use_cache=False, absorbed=False):
        a, max_logit, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, use_cache, absorbed)
        x = x + a
        routing = None
        if self.is_moe:
            m, routing = self.mlp(self.post_attention_layernorm(x))
        else:
            m = self.mlp(self.post_attention_layernorm(x))
        return x + m, max_logit, routing, cache


class K2Model(nn.Module):
    def __init__(self, config: K2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class K2ForCausalLM(nn.Module):
    def __init__(self, config: K2Config):
        super().__init__()
        self.config = config
        self.model = K2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Normal(0, initializer_range) matrices, unit norms, zero correction bias (as the reference)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias") and b.device.type != "meta":
                b.zero_()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def moe_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.model.layers if layer.is_moe]

    def compile_layers(self, check: bool = True, **compile_kwargs) -> "K2ForCausalLM":
        """Opt-in torch.compile of every layer's static-shaped parts, in place: attention, norms, dense
        FFNs, shared experts. The routed experts stay eager: how many tokens each expert gets changes
        every step, and tracing those shapes costs more than it saves. Same function, to float
        tolerance (inductor fuses the elementwise work); the first steps pay the compilation
        (about a minute on 2 CPU cores). benchmarks/bench_train_step.py --compile measures it.

        Safe by construction (k2mini/compile_guard.py): the compiled code runs only while autograd records
        (training steps) at the thread count checked here; under no_grad or inference mode (`evaluate`,
        `generate`) every part runs eager. With `check` (the default) a child process first compiles a
        two-layer model of this config with this environment and thread count and compares it with eager;
        if it crashes, fails or differs, this raises CompileUnsafeError naming the reason and the settings,
        and the model stays eager. torch.compile on CPU has aborted with heap corruption under no_grad
        with 2 threads, and returned garbage under ATEN_CPU_CAPABILITY=avx2, on some machines.
        """
        from .compile_guard import CompileUnsafeError, GradOnly, check_compile, settings

        threads = torch.get_num_threads()
        if check and (reason := check_compile(self.config, threads, compile_kwargs)) is not None:
            raise CompileUnsafeError(f"compile_layers() refused: torch.compile is not safe with {settings(threads)}: "
                                     f"{reason}. The model stays eager (same results, no compilation).")
        parts = [self.model.norm]
        for layer in self.model.layers:
            parts += [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm,
                      layer.mlp.shared_experts if layer.is_moe else layer.mlp]
        for part in parts:
            if part is not None:
                eager = part.forward.eager if isinstance(part.forward, GradOnly) else part.forward
                part.forward = GradOnly(eager, torch.compile(eager, **compile_kwargs), threads)
        return self

    def _check_ids(self, input_ids: torch.Tensor):
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch tensor (batch, seq), got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if not input_ids.numel():  # attention and routing need at least one token
            raise ValueError(f"input_ids has no tokens (shape {tuple(input_ids.shape)}); pass at least one per row")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")

    def forward(
        self,
        input_ids: torch.Tensor,
        telemetry: bool = False,
        cache: KVCache | None = None,
        absorbed: bool = False,
    ) -> CausalLMOutput:
        """input_ids (B, T) -> logits (B, T, vocab).

        telemetry: also return per-MoE-layer routing and per-layer, per-head max attention logits.
        cache: a KVCache to extend (decoding); positions continue after its length.
        absorbed: run MLA in its absorbed form (attention over the cached latent).
        """
        self._check_ids(input_ids)
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=input_ids.device)
        inv_freq = self.inv_freq
        if start + T > self.config.max_position_embeddings and rope_type(self.config) == "dynamic":
            # NTK-aware past the trained length: the frequencies follow this call's length (up to it they are
            # the stored ones, so the common case recomputes nothing)
            inv_freq = rope_frequencies(self.config, seq_len=start + T)[0].to(input_ids.device)
        cos, sin = rope_cos_sin(positions, inv_freq, self.rope_attention_factor)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        max_logits, routers = [], []
        for i, layer in enumerate(self.model.layers):
            x, max_logit, routing, layer_cache = layer(
                x, cos, sin, None if cache is None else cache.layers[i], cache is not None, absorbed
            )
            if cache is not None:
                cache.layers[i] = layer_cache
            max_logits.append(max_logit)
            if telemetry and routing is not None:
                k = routing.indices.shape[-1]
                routers.append(
                    RouterRecord(
                        layer=i,
                        indices=routing.indices.reshape(B, T, k),
                        weights=routing.weights.reshape(B, T, k),
                        scores=routing.scores.reshape(B, T, -1),
                        load=expert_load(routing.indices, layer.mlp.n_experts),
                    )
                )
        logits = self.lm_head(self.model.norm(x))
        tel = Telemetry(torch.stack(max_logits), routers) if telemetry else None
        return CausalLMOutput(logits=logits, telemetry=tel, cache=cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        absorbed: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Decode with the MLA cache: prefill once, then one token per step (greedy or sampling).

        Returns (B, T + new) token ids. With eos_token_id, a sequence that emitted it keeps emitting it.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if do_sample:
            check_sampling(temperature, top_k, top_p)
        else:
            unused = [f"{n}={v!r}" for n, v, default in (("temperature", temperature, 1.0), ("top_k", top_k, None),
                                                          ("top_p", top_p, None)) if v != default]
            if unused:
                warnings.warn(f"generate: {', '.join(unused)} only apply when sampling; this call decodes greedily. "
                              "Pass do_sample=True to sample", UserWarning, stacklevel=3)
        prompt = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else 0
        if prompt + max_new_tokens > self.config.max_position_embeddings:
            warnings.warn(f"generate: {prompt} prompt + {max_new_tokens} new tokens go past "
                          f"max_position_embeddings ({self.config.max_position_embeddings}), the longest context the "
                          "model's positions are made for; later tokens are unreliable", UserWarning, stacklevel=3)
        if eos_token_id is not None and not (isinstance(eos_token_id, int) and 0 <= eos_token_id < self.config.vocab_size):
            raise ValueError(f"eos_token_id {eos_token_id!r} is outside the vocabulary [0, {self.config.vocab_size})")
        cache = KVCache.empty(self.config)
        out = self(input_ids, cache=cache, absorbed=absorbed)
        tokens = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in tqdm(range(max_new_tokens), disable=not progress, desc="generate"):
            next_logits = out.logits[:, -1].float()
            if do_sample:
                nxt = sample(next_logits, temperature, top_k, top_p, generator)
            else:
                nxt = next_logits.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
            out = self(nxt[:, None], cache=cache, absorbed=absorbed)
        return tokens


def check_sampling(temperature, top_k, top_p) -> None:
    """ValueError for sampling arguments that would give torch errors or nonsense later."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k filter), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1):
        raise ValueError(f"top_p must be a number in [0, 1] (or None for no nucleus filter), got {top_p!r}")


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature), optionally top-k / nucleus filtered."""
    check_sampling(temperature, top_k, top_p)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
