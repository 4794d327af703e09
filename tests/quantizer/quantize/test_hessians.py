"""H from forward hooks equals X Xᵀ/N computed directly; im2col order matches weight_matrix; sharing."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vqdm.models import weight_matrix
from vqdm.quantizer.quantize.hessians import HessianCollector, SecondMoment, conv_rows, plan_passes
from vqdm.quantizer.recipes import recipe
from vqdm.quantizer.sampling import SamplingConfig, load_prompts, plan_batches


def im2col_loops(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows [B·H_out·W_out, k_h·k_w·C] by explicit loops over positions and taps (independent of unfold)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    b, c, h, w = x.shape
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = torch.zeros(b, h_out, w_out, kh, kw, c, dtype=torch.float64)
    for oy in range(h_out):
        for ox in range(w_out):
            for i in range(kh):
                for j in range(kw):
                    y, xx = oy * sh - ph + i * dh, ox * sw - pw + j * dw
                    if 0 <= y < h and 0 <= xx < w:  # outside: zero padding, a real zero input
                        rows[:, oy, ox, i, j] = x[:, :, y, xx].double()
    return rows.reshape(b * h_out * w_out, kh * kw * c)


def direct_h(rows: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat([r.double() for r in rows])
    return x.T @ x / x.shape[0]


def test_linear_h_equals_xxt_over_n():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    root = nn.Sequential(layer)
    xs = [torch.randn(3, 7, 12), torch.randn(2, 12)]
    with HessianCollector(root, ["0"]) as col:
        for x in xs:
            root(x)
    assert col.counts() == {"0": 23}
    h = col.hessians()["0"]
    assert h.dtype == torch.float64 and h.shape == (12, 12)
    torch.testing.assert_close(h, direct_h([x.reshape(-1, 12) for x in xs]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),  # SDXL resnet conv
    dict(kernel_size=3, stride=2, padding=1),  # SDXL downsampler
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),  # awkward everything
    dict(kernel_size=1),  # shortcut
])
@pytest.mark.parametrize("chunk_elements", [1 << 26, 40])  # one band per image, and many tiny bands
def test_conv_h_equals_im2col_xxt_over_n(kwargs, chunk_elements):
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 6, **kwargs)
    root = nn.Sequential(conv)
    xs = [torch.randn(2, 5, 7, 9), torch.randn(1, 5, 6, 5)]
    with HessianCollector(root, ["0"], chunk_elements=chunk_elements) as col:
        for x in xs:
            root(x)
    rows = [im2col_loops(x, conv) for x in xs]
    # The reference rows are the ones the weight matrix multiplies: conv(x) = rows · W_matrixᵀ + b.
    for x, r in zip(xs, rows):
        y = conv(x).permute(0, 2, 3, 1).reshape(-1, 6).double()
        torch.testing.assert_close(r @ weight_matrix(conv).double().T + conv.bias.double(), y, rtol=1e-5, atol=1e-5)
    assert col.counts()["0"] == sum(r.shape[0] for r in rows)
    torch.testing.assert_close(col.hessians()["0"], direct_h(rows), rtol=1e-12, atol=1e-12)


def test_conv_rows_streams_in_bounded_chunks():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 10, 10)
    chunks = list(conv_rows(x, conv, chunk_elements=36 * 10 * 3))
    assert all(c.numel() <= 36 * 10 * 3 for c in chunks) and len(chunks) == 2 * 4  # 4 bands of <= 3 rows per image
    torch.testing.assert_close(torch.cat(chunks).double(), im2col_loops(x, conv))


class _SelfAttentionish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        x = x * 2  # a fresh tensor each call
        return self.o(self.q(x) + self.k(x) + self.v(x))


def test_layers_reading_one_input_share_one_h():
    torch.manual_seed(2)
    root = _SelfAttentionish()
    xs = [torch.randn(4, 8), torch.randn(3, 8)]
    with HessianCollector(root, ["q", "k", "v", "o"]) as col:
        for x in xs:
            root(x)
    assert col.groups() == {"q": ["q", "k", "v"], "o": ["o"]}
    h = col.hessians()
    assert h["q"] is h["k"] is h["v"] and h["o"] is not h["q"]
    torch.testing.assert_close(h["q"], direct_h([2 * x for x in xs]), rtol=1e-12, atol=1e-12)
    with HessianCollector(root, ["q", "k"], share_inputs=False) as col:
        root(xs[0])
    h = col.hessians()
    assert h["q"] is not h["k"]
    torch.testing.assert_close(h["q"], h["k"], rtol=0, atol=0)


def test_unet_attention_inputs_are_shared():
    """In the diffusers U-Net: q/k/v of self-attention share H; cross-attention k/v share the text's H."""
    from vqdm.models import build_unet, select_layers, subset_of

    unet = build_unet("tiny-sdxl")
    names = [n for n, _ in select_layers(unet) if subset_of(n) == "mid_block"]
    cfg = unet.config
    with HessianCollector(unet, names) as col, torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, cfg.cross_attention_dim),
             added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)})
    groups = col.groups()
    attn = "mid_block.attentions.0.transformer_blocks.0."
    assert groups[attn + "attn1.to_q"] == [attn + f"attn1.to_{p}" for p in "qkv"]
    assert groups[attn + "attn2.to_k"] == [attn + "attn2.to_k", attn + "attn2.to_v"]
    assert col.counts()[attn + "attn2.to_k"] == 2 * 77 and col.counts()[attn + "attn1.to_q"] == 2 * 2 * 2
    assert sum(len(m) for m in groups.values()) == len(names)


def test_max_rows_per_call_samples_exactly_the_cap():
    torch.manual_seed(3)
    root = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    x = torch.randn(50, 6)

    def collect(names, seed=7):
        with HessianCollector(root, names, max_rows_per_call=10) as col:
            for _ in range(3):
                col.reseed(seed)
                root(x)
        return col.counts(), col.hessians()

    counts, h = collect(["0", "1"])
    assert counts == {"0": 30, "1": 30}
    assert torch.linalg.eigvalsh(h["0"]).min() > -1e-12  # a mean of outer products of real rows
    assert not torch.allclose(h["0"], direct_h([x]))  # a strict subsample of 50 rows differs from the full mean
    # A layer's draw depends on (batch seed, layer) only, not on the other layers hooked with it,
    # so a memory-bounded calibration in several passes gives the same H as one pass.
    torch.testing.assert_close(collect(["0"])[1]["0"], h["0"], rtol=0, atol=0)
    assert not torch.equal(collect(["0"], seed=8)[1]["0"], h["0"])


def test_second_moment_running_mean_in_fp64():
    m = SecondMoment.zeros(3)
    m.add_rows(torch.tensor([[1.0, 2.0, 3.0]]))
    m.add_rows(torch.tensor([[1e8, 0.0, 1.0]], dtype=torch.float64))
    assert m.count == 2 and m.sum.dtype == torch.float64
    assert m.mean()[0, 0].item() == (1 + 1e16) / 2  # exact in fp64, lost in fp32


def test_plan_passes_bounds_memory():
    layers = [(f"l{i}", nn.Linear(d, 4)) for i, d in enumerate([16, 16, 32, 16])]
    assert plan_passes(layers, None) == [["l0", "l1", "l2", "l3"]]
    assert plan_passes(layers, 8 * (16 * 16 * 2)) == [["l0", "l1"], ["l2"], ["l3"]]


def test_prompts_and_batches(tmp_path):
    prompts = load_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    cfg = SamplingConfig(num_prompts=7, steps=4, guidance=0, resolution=64, vary_steps=True, batch_size=2)
    single = plan_batches(cfg, ["a", "b", "c"])
    assert [b.prompts for b in single] == [("a", "b"), ("c", "a"), ("b", "c"), ("a",)]
    assert [b.steps for b in single] == [1, 2, 3, 4]
    split = plan_batches(cfg, ["a", "b", "c"], 0, 2) + plan_batches(cfg, ["a", "b", "c"], 1, 2)
    assert sorted(split, key=lambda b: b.index) == single  # ranks partition the same batches
    assert len({s for b in single for s in b.seeds}) == 7
    assert recipe("sdxl").steps == 50 and recipe("sdxl").replace(steps=2).steps == 2
    empty = tmp_path / "p.txt"
    empty.write_text("\n  \n")
    from vqdm.errors import ConfigError

    with pytest.raises(ConfigError, match="no prompts"):
        load_prompts(empty)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fast_path_matches_fp64_reference(dtype):
    """fp16/bf16 rows: exact products, fp32 sums per chunk, fp64 running sum (the CUDA default)."""
    torch.manual_seed(4)
    chunks = [(torch.randn(300, 24) * 3).to(dtype) for _ in range(4)]
    fast, ref = SecondMoment.zeros(24), SecondMoment.zeros(24)
    for c in chunks:
        fast.add_rows(c, exact_low_precision=True)
        ref.add_rows(c, exact_low_precision=False)
    assert fast.count == ref.count == 1200
    torch.testing.assert_close(fast.mean(), ref.mean(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fp16/bf16"):
        fast.add_rows(torch.randn(3, 24), exact_low_precision=True)
