"""Weight-cache policies: same outputs as decoding every call, counters, budget, request scope."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vqdm.models.vq_layers import VQConv2d, VQLinear
from vqdm.models.weight_cache import CachePolicy, WeightCache, install_weight_cache, parse_bytes


def _random_fill(m: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    m.set_quantized(torch.randint(0, 256, m.codes.shape, generator=gen, dtype=torch.uint8),
                    torch.randn(m.codebooks.shape, generator=gen) * 0.1, torch.rand(m.n, generator=gen) + 0.5)


class Tiny(nn.Module):
    """A conv (large weight, 1 call) then two linears of different sizes."""

    def __init__(self):
        super().__init__()
        self.conv = VQConv2d(16, 32, (3, 3), num_codebooks=3, padding=(1, 1))
        self.big = VQLinear(32, 64, num_codebooks=2)
        self.small = VQLinear(64, 16, num_codebooks=4)
        for i, m in enumerate((self.conv, self.big, self.small)):
            _random_fill(m, i)

    def forward(self, x):
        h = self.conv(x)  # [B, 32, H, W]
        return self.small(self.big(h.flatten(2).transpose(1, 2)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny().eval(), torch.randn(2, 16, 6, 6)


def test_parse_policy():
    assert CachePolicy.parse("none") == CachePolicy("none")
    assert CachePolicy.parse(" request ") == CachePolicy("request")
    assert CachePolicy.parse("budget=2GB").budget_bytes == 2 * 10**9
    assert CachePolicy.parse("budget=512MiB").budget_bytes == 512 * 2**20
    assert parse_bytes("1500") == 1500 and str(CachePolicy.parse("budget=1kb")) == "budget=1000"
    for bad, msg in [("budget", "needs a size"), ("budget=lots", "byte count"), ("always", "unknown"),
                     ("request=1", "takes no argument")]:
        with pytest.raises(ValueError, match=msg):
            CachePolicy.parse(bad)


@pytest.mark.parametrize("policy", ["none", "request", "budget=1GB", "budget=20000"])
def test_outputs_match_uncached(model, policy):
    net, x = model
    with torch.no_grad():
        ref = net(x)
        cache = install_weight_cache(net, policy)
        assert (cache is None) == (policy == "none")
        for _ in range(3):
            assert torch.allclose(net(x), ref, rtol=1e-5, atol=1e-6)


def test_request_policy_reuses_within_request_and_frees_after(model):
    net, x = model
    cache = install_weight_cache(net, "request")
    with torch.no_grad(), cache.request():
        net(x)
        net(x)
        st = cache.stats()
        assert st["decodes"] == 3 and st["hits"] == 3 and st["entries"] == 3
        dense = sum(m.n * m.d * 4 for m in (net.conv, net.big, net.small))
        assert st["bytes_resident"] == dense
    st = cache.stats()
    assert st["bytes_resident"] == 0 and st["entries"] == 0
    with torch.no_grad(), cache.request():
        net(x)
    assert cache.stats()["decodes"] == 6


def test_budget_keeps_best_score_per_byte_within_budget(model):
    net, x = model
    cache = install_weight_cache(net, "budget=1GB")
    with torch.no_grad():
        net(x)
    scores = {k[0]: v for k, v in cache._scores.items()}
    assert all(v > 0 for v in scores.values())  # CPU: every layer's uncached path decodes
    by_score = sorted((net.conv, net.big, net.small), key=lambda m: -scores[id(m)])
    # A budget that fits exactly the best-scoring layer, whatever order the layers run in.
    budget = by_score[0].n * by_score[0].d * 4
    cache = install_weight_cache(net, f"budget={budget}")
    cache._scores = {(k, torch.float32): v for k, v in scores.items()}
    with torch.no_grad():
        for _ in range(2):
            net(x)
    st = cache.stats()
    assert st["bytes_resident"] <= budget and st["entries"] == 1
    assert set(k[0] for k in cache._entries) == {id(by_score[0])}
    assert st["hits"] == 1 and st["misses"] == 5


def test_stale_weights_are_redecoded(model):
    net, x = model
    cache = install_weight_cache(net, "budget=1GB")
    with torch.no_grad():
        net(x)
        _random_fill(net.big, seed=7)  # in-place copy bumps the tensors' versions
        got = net(x)
        install_weight_cache(net, "none")
        assert torch.allclose(got, net(x), rtol=1e-5, atol=1e-6)
    assert cache.stats()["decodes"] == 4


def test_bypassed_when_codebooks_train(model):
    net, x = model
    cache = install_weight_cache(net, "request")
    for m in (net.conv, net.big, net.small):
        m.codebooks.requires_grad_(True)
    net(x).sum().backward()
    assert net.big.codebooks.grad is not None and cache.stats()["decodes"] == 0


def test_weight_cache_direct_use_has_no_budget_for_zero():
    cache = WeightCache(CachePolicy.parse("budget=0"))
    m = VQLinear(16, 8, num_codebooks=1)
    assert cache.lookup(m, torch.randn(1, 16)) is not None  # decoded for this call ...
    assert cache.stats()["bytes_resident"] == 0  # ... but nothing kept
