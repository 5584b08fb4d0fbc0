"""Checkpoints over HTTP (a range-capable server on 127.0.0.1) and hf:// addresses (resolved, not
fetched: the Hub cannot be reached from the tests)."""

import json
import socket

import pytest
import torch

import k2mini
from checkpoint_factory import fp8_checkpoint, header_of
from http_range_server import RangeServer
from k2mini.checkpoint import CheckpointError, CheckpointReader, NetworkError, save_pretrained
from k2mini.checkpoint.sources import FsspecSource, http_filesystem, open_source


def backend_fs(backend):
    if backend == "aiohttp":
        pytest.importorskip("aiohttp")
    return http_filesystem(backend)


BACKENDS = ["aiohttp", "requests"]  # fsspec's HTTP filesystem and its requests-based twin


@pytest.fixture(scope="module")
def ckpt():
    return fp8_checkpoint()


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_over_http_equals_load_from_disk(ckpt, backend):
    path, config, served, _ = ckpt
    local = k2mini.load_pretrained(path, progress=False)
    with RangeServer(path) as server:
        remote = k2mini.load_pretrained(server.url, progress=False, fs=backend_fs(backend))
        assert all(m == "HEAD" or r is not None or p.endswith(".json") for m, p, r in server.requests)
    for (n, a), (_, b) in zip(local.state_dict().items(), remote.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # local logits equal transformers' (test_checkpoint_load); remote equal local
        assert torch.equal(remote(ids).logits, local(ids).logits)


@pytest.fixture(scope="module")
def many_experts(tmp_path_factory):
    """~19 MB of fp8 experts (64 per layer) in 10 shards, other tensors in bfloat16 as K2 stores them."""
    config = k2mini.K2Config(
        vocab_size=300, hidden_size=256, intermediate_size=256, moe_intermediate_size=192, num_hidden_layers=3,
        n_routed_experts=64, num_experts_per_tok=4, q_lora_rank=64, kv_lora_rank=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("many-experts") / "ckpt"
    save_pretrained(k2mini.K2ForCausalLM(config), path, fp8=True, max_shard_bytes=2 * 2**20, dtype=torch.bfloat16, progress=False)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_router_tensor_transfers_under_one_percent(many_experts, backend):
    path = many_experts
    total = sum(f.stat().st_size for f in path.iterdir())
    name = "model.layers.2.mlp.gate.weight"
    with RangeServer(path) as server:
        reader = CheckpointReader(server.url, fs=backend_fs(backend))
        router = reader.get(name)
        sent = server.bytes_served
        shards_touched = {p for p in server.bytes_by_path if p.endswith(".safetensors")}
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][name]
    header, data_start = header_of(shard)
    # exactly config.json + the index + one shard's header + the router's bytes, nothing else
    assert sent == (path / "config.json").stat().st_size + (path / "model.safetensors.index.json").stat().st_size + data_start + router.numel() * 2
    assert shards_touched == {shard.name} and len(index["weight_map"]) > 700 and len(set(index["weight_map"].values())) >= 10
    assert sent / total < 0.01, f"{sent} of {total} bytes ({sent / total:.2%})"
    assert reader.bytes_read == sent
    print(f"one router tensor: {sent} of {total} bytes served ({sent / total:.3%})")


def test_row_slice_transfers_only_those_rows(many_experts):
    with RangeServer(many_experts) as server:
        reader = CheckpointReader(server.url)
        reader.info("model.layers.0.mlp.gate_proj.weight")  # headers first
        before = server.bytes_served
        rows = reader.get("model.layers.0.mlp.gate_proj.weight", rows=slice(130, 140))
        scale = reader.info("model.layers.0.mlp.gate_proj.weight_scale_inv")
        assert server.bytes_served - before == rows.numel() + scale.nbytes  # fp8 rows + their block scales
        assert torch.equal(rows, CheckpointReader(many_experts).get("model.layers.0.mlp.gate_proj.weight")[130:140])


def test_missing_shard_and_server_errors_name_the_address(ckpt):
    path, *_ = ckpt
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = index["weight_map"][name]
    with RangeServer(path) as server:
        server.fail[shard] = 404
        with pytest.raises(CheckpointError, match=f"{server.url}/{shard}: missing .*{name}"):
            CheckpointReader(server.url).get(name)
        server.fail[shard] = 500
        with pytest.raises(NetworkError, match=f"{server.url}/{shard}"):
            CheckpointReader(server.url).get(name)
        server.fail["config.json"] = 404
        with pytest.raises(CheckpointError, match=f"{server.url}/config.json: missing"):
            CheckpointReader(server.url)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_address_is_a_network_error(backend):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/checkpoints/k2"
    with pytest.raises(NetworkError, match=f"{url}/config.json: could not be fetched"):
        CheckpointReader(url, fs=backend_fs(backend))
    with pytest.raises(ConnectionError):  # NetworkError is a ConnectionError
        k2mini.load_pretrained(url, progress=False, fs=backend_fs(backend))


def test_hf_addresses_resolve_to_hf_filesystem_paths():
    from huggingface_hub import HfFileSystem, constants

    src = open_source("hf://moonshotai/Kimi-K2-Instruct")
    assert isinstance(src, FsspecSource) and isinstance(src.fs, HfFileSystem)
    assert src.path("config.json") == "moonshotai/Kimi-K2-Instruct/config.json"
    assert src.url("model.safetensors.index.json") == (
        f"{constants.ENDPOINT}/moonshotai/Kimi-K2-Instruct/resolve/main/model.safetensors.index.json"
    )
    src = open_source("hf://deepseek-ai/DeepSeek-V3@v1.0/weights")
    assert src.path("model-00001-of-000163.safetensors") == "deepseek-ai/DeepSeek-V3@v1.0/weights/model-00001-of-000163.safetensors"
    assert src.url("config.json") == f"{constants.ENDPOINT}/deepseek-ai/DeepSeek-V3/resolve/v1.0/weights/config.json"
    for bad in ("hf://", "hf://datasets/owner/data", "ftp://host/x"):
        with pytest.raises(ValueError, match="hf://|not a Hugging Face|model repositories|unsupported"):
            open_source(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_server_that_never_answers_times_out_naming_the_url(backend):
    """Used to stall for 300 s before a bare FSTimeoutError."""
    import time

    from http_range_server import SilentServer

    with SilentServer() as url:
        t0 = time.perf_counter()
        with pytest.raises(NetworkError, match=rf"{url}/checkpoints/k2/config\.json: could not be fetched .*(timed out|[Tt]imeout)"):
            CheckpointReader(f"{url}/checkpoints/k2", fs=http_filesystem(backend, timeout=0.5))
        with pytest.raises(NetworkError, match=rf"{url}/config\.json"):  # the default filesystem, its timeout set
            k2mini.load_pretrained(url, progress=False, timeout=0.5)
        assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stalled_tensor_read_names_the_url_and_the_tensor(ckpt, backend):
    import time

    path, *_ = ckpt
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = index["weight_map"][name]
    with RangeServer(path) as server:
        reader = CheckpointReader(server.url, fs=http_filesystem(backend, timeout=0.5))
        server.stall.add(shard)
        t0 = time.perf_counter()
        with pytest.raises(NetworkError, match=rf"{server.url}/{shard}: could not be fetched .*reading tensor '{name}'"):
            reader.get(name)
        assert time.perf_counter() - t0 < 10
        with pytest.raises(NetworkError, match=rf"reading tensor '{name}(_scale_inv)?'"):  # once its header is known
            server.stall.discard(shard)
            reader.info(name)
            server.stall.add(shard)
            reader.get(name)


def test_the_default_timeout_is_tens_of_seconds_and_configurable(monkeypatch):
    from k2mini.checkpoint import sources

    assert 10 <= sources.DEFAULT_TIMEOUT <= 120
    assert sources._check_timeout(None) == sources.DEFAULT_TIMEOUT and sources._check_timeout(2) == 2.0
    monkeypatch.setenv("K2MINI_HTTP_TIMEOUT", "7.5")
    assert sources._check_timeout(None) == 7.5
    for bad in ("soon", "0", "nan"):
        monkeypatch.setenv("K2MINI_HTTP_TIMEOUT", bad)
        with pytest.raises(ValueError, match=r"\$K2MINI_HTTP_TIMEOUT must be"):
            http_filesystem()
    monkeypatch.delenv("K2MINI_HTTP_TIMEOUT")
    with pytest.raises(ValueError, match="timeout"):
        http_filesystem(timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        CheckpointReader("http://127.0.0.1:1/x", timeout=-1)
