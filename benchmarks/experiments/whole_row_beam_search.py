"""EXPERIMENT (not used by vqdm): the beam search with whole-row hypotheses, as AQLM keeps them.

Measured against the product beam (`vqdm.quantizer.layer.beam_search`, which settles each group
before the next) in benchmarks/results/aq_whole_row_beam.json: no lower error at beam 8 on the
MiniLM layers measured, 12-29% more time per layer, so the product keeps its beam. To rerun: copy
this file over vqdm/quantizer/layer/beam_search.py in a scratch copy of the tree, install that copy
with `pip install --no-deps --target DIR .`, and run benchmarks/quant_quality.py with
PYTHONPATH=DIR; then benchmarks/compare_quality.py on the two runs.

Beam search over AQ codes with codebooks and scales fixed (SPEC §3.5).

Per row i the loss is ℓ_i = (w_i − ŵ_i) H (w_i − ŵ_i)ᵀ; rows are independent, so every step runs
on all rows (and all beam hypotheses of every row) at once.

`candidate_losses` is the plain reference: the SPEC's delta formula, literally, from a full decode.
For input group j (columns J), codebook m, row i, with c_old = C_m[b_ijm]:
    δ = (w_i − ŵ_i) + s_i·c_old on J,   q = δ·H[:, J]
    ℓ(k) = ℓ − 2 s_i (C_m[k] − c_old)·q + s_i² (C_m[k] H_JJ C_m[k]ᵀ − c_old H_JJ c_oldᵀ)

`beam_search_pass` is the fast path: the same formula, rearranged so a step never touches d.
Hypotheses are whole rows (every code of the row, as AQLM's search keeps them): each row carries
its `beam` best code assignments through the whole pass and the best one is taken at the end, so
a choice made at one group can be revised by what the later groups find.

With T_b = (w_i − ŵ_b^{−J}) H[:, J] for hypothesis b (ŵ^{−J}: its decode without group j), and L_b
its loss relative to the row's loss at the start of the pass, hypothesis b with group j decoding to
v (unscaled) has loss L_b − score_b(u_bj) + score_b(v), score_b(v) = s² v H_JJ vᵀ − 2 s v·T_b.
Swapping codeword m, v = a + C_m[k] with a = v − c_old:
    loss(k) = [L_b − score_b(u_bj) + score_b(a)] − 2 s C_m[k]·q + s² C_m[k] H_JJ C_m[k]ᵀ,   q = T_b − s a H_JJ.
One GEMM [rows·beam, g+2] × [g+2, 2^B] scores every codeword for every hypothesis; a row-wise top-k
over beam × 2^B keeps the best `beam`. Within a pass each code is visited once, so all hypotheses
still hold the pass's starting code where the search stands, and the top-k never holds duplicates.

Cost. Groups are visited block by block (`block_groups` groups, in a shuffled order; codebooks
shuffled per group). Within a block a hypothesis is its block-start ancestor plus changes inside
the block's columns, so a step gathers only block-sized state ([rows, beam, block·g]): the running
product P_b = R_b·H[:, block] (rank-g updates after each group) and the block's residual and codes.
At the end of a block the whole-row residuals and codes are gathered once from the ancestors and
P is recomputed for the next block with one GEMM over all hypotheses ([rows·beam, d] × [d, block·g]).

Never increases the loss: each hypothesis's "keep the current code" candidate is scored too, so the
best score in the beam cannot rise; a row whose best hypothesis is not better keeps its codes.
"""
from __future__ import annotations

import torch

from vqdm.quantizer.layer.beam_search import candidate_losses  # noqa: F401  (the same reference formula)
from vqdm.vq_format import decode_groups

# Groups per block: one [rows·beam, d]×[d, 32·g] GEMM per block recomputes P = R·H[:, block].
BLOCK_GROUPS = 32
# Scratch budget: rows per chunk are chosen so rows·beam·d (the whole-row residuals) stays at most this.
MAX_HYPOTHESIS_ELEMENTS = 1 << 25
# and never more than this many rows ([rows, beam, 2^B] fp32 scores = 64 MiB at 8192 rows, beam 8).
MAX_ROWS = 8192


def search_group(
    t: torch.Tensor, h_jj: torch.Tensor, codes_j: torch.Tensor, loss: torch.Tensor, codebooks: torch.Tensor,
    scales: torch.Tensor, beam_size: int, order: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Extend every row's hypotheses over the K codes of one group.

    t [r, b, g]: T_b = (w − ŵ_b without this group)·H[:, J];  h_jj [g, g];  codes_j [r, b, K] int64:
    each hypothesis's codes of the group;  loss [r, b]: each hypothesis's loss relative to the row's
    start;  order: codebooks in visiting order.
    Returns (parent [r, b'] index into the b input hypotheses, codes of the group [r, b', K],
    unscaled decode of the group [r, b', g], loss [r, b']), b' = min(beam, ...), sorted best first.
    """
    r, b0, g = t.shape
    q_size = codebooks.shape[1]
    s = scales[:, None, None]  # [r, 1, 1]
    s_sq = (scales * scales)[:, None, None]
    ones_col = torch.ones(1, q_size, dtype=t.dtype, device=t.device)

    def score(v: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:  # s² v H_JJ vᵀ − 2 s v·T: [r, b, g] -> [r, b]
        return s[..., 0] * (s[..., 0] * ((v @ h_jj) * v).sum(-1) - 2 * (v * t_b).sum(-1))

    hyp_u = decode_groups(codes_j, codebooks)  # [r, b, g]
    const = loss.to(t.dtype) - score(hyp_u, t)  # L_b − score_b(u_bj): the loss without group j's terms
    parent = torch.arange(b0, device=t.device).expand(r, b0)
    hyp_codes, hyp_score = codes_j, loss.to(t.dtype)
    for m in order:
        book = codebooks[m]  # [2^B, g]
        b = hyp_u.shape[1]
        t_b = t.gather(1, parent[..., None].expand(r, b, g))
        a = hyp_u - book[hyp_codes[..., m]]  # the hypothesis without codebook m, [r, b, g]
        a_h = a @ h_jj
        base = const.gather(1, parent) + s[..., 0] * (s[..., 0] * (a_h * a).sum(-1) - 2 * (a * t_b).sum(-1))
        q = t_b - s * a_h  # [r, b, g]
        # One GEMM: [−2 s q, s², base] · [C_mᵀ; ‖C_m[k]‖²_H; 1] = base − 2 s C_m[k]·q + s² ‖C_m[k]‖²_H.
        lhs = torch.cat([q * (-2 * s), s_sq.expand(r, b, 1), base[..., None]], dim=-1)  # [r, b, g+2]
        rhs = torch.cat([book.T, ((book @ h_jj) * book).sum(1)[None, :], ones_col], dim=0)  # [g+2, 2^B]
        scores = (lhs.reshape(r * b, g + 2) @ rhs).reshape(r, b * q_size)
        k = min(beam_size, b * q_size)
        hyp_score, best = scores.topk(k, dim=1, largest=False, sorted=True)  # [r, k]
        within, new_code = best // q_size, best % q_size
        parent = parent.gather(1, within)
        hyp_codes = hyp_codes.gather(1, within[..., None].expand(r, k, hyp_codes.shape[2])).clone()
        hyp_codes[..., m] = new_code
        hyp_u = a.gather(1, within[..., None].expand(r, k, g)) + book[new_code]
    return parent, hyp_codes, hyp_u, hyp_score


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [r, b, ...] -> x[i, idx[i, j], ...] [r, b', ...]."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


@torch.no_grad()
def beam_search_pass(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
    beam_size: int = 8, generator: torch.Generator | None = None,
    block_groups: int = BLOCK_GROUPS, max_rows: int = MAX_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over every code of the layer: (new codes [n, d/g, K] int64, row loss change [n]).

    w [n, d], h [d, d], codebooks [K, 2^B, g], scales [n] in one float dtype on one device; codes
    [n, d/g, K] integer. Groups in shuffled order (from `generator`), codebooks shuffled per group.
    """
    n, d = w.shape
    num_books, _, g = codebooks.shape
    order = torch.randperm(d // g, generator=generator)
    book_orders = torch.argsort(torch.rand(d // g, num_books, generator=generator), dim=1).tolist()
    codes = codes.long().clone()
    gain = torch.zeros(n, dtype=torch.float64, device=w.device)
    blocks = [blk.to(w.device) for blk in order.split(block_groups)]
    step = max(1, min(max_rows, MAX_HYPOTHESIS_ELEMENTS // (beam_size * d)))
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        best_codes, best_loss = _search_rows(w[rows], h, codes[rows], codebooks, scales[rows], beam_size, blocks,
                                             book_orders)
        better = best_loss < 0  # ties and float noise must not churn codes or raise the exact loss
        codes[rows] = torch.where(better[:, None, None], best_codes, codes[rows])
        gain[rows] = torch.where(better, best_loss, torch.zeros_like(best_loss))
    return codes, gain


def _search_rows(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                 s: torch.Tensor, beam_size: int, blocks: list[torch.Tensor], book_orders: list[list[int]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass for one chunk of rows: (best hypothesis's codes [r, G, K], its loss change [r] float64)."""
    r, d = w.shape
    g = codebooks.shape[2]
    offsets = torch.arange(g, device=w.device)
    # Whole-row hypotheses: residuals [r, b, d], codes [r, b, G, K], loss vs. the pass start [r, b].
    resid = (w - s[:, None] * decode_groups(codes, codebooks).reshape(r, d))[:, None, :]
    hyp_codes = codes.to(torch.uint8)[:, None]  # 2^B <= 256 (uint8 codes): 8x less to gather than int64
    hyp_loss = torch.zeros(r, 1, dtype=torch.float64, device=w.device)
    for blk in blocks:
        cols = (blk[:, None] * g + offsets).reshape(-1)  # the block's columns
        h_cols = h.index_select(1, cols)  # [d, nb·g]
        h_bb = h_cols.index_select(0, cols)  # [nb·g, nb·g]
        b = resid.shape[1]
        p = (resid.reshape(r * b, d) @ h_cols).reshape(r, b, -1)  # P_b = R_b·H[:, block]
        local_r = resid.index_select(2, cols)  # block residual [r, b, nb·g]
        local_c = hyp_codes.index_select(2, blk).long()  # block codes [r, b, nb, K]
        origin = torch.arange(b, device=w.device).expand(r, b)  # block-start ancestor of each hypothesis
        for t_i, j in enumerate(blk.tolist()):
            loc = slice(t_i * g, (t_i + 1) * g)
            h_jj = h_bb[loc, loc]
            u_j = decode_groups(local_c[:, :, t_i], codebooks)  # [r, b, g]
            t = p[:, :, loc] + s[:, None, None] * (u_j @ h_jj)  # (w − ŵ_b^{−J})·H_J
            parent, new_codes, new_u, new_loss = search_group(
                t, h_jj, local_c[:, :, t_i], hyp_loss, codebooks, s, beam_size, book_orders[j])
            dw = s[:, None, None] * (new_u - _gather(u_j, parent))  # change of ŵ_b on J
            hyp_loss = new_loss.double()
            origin = origin.gather(1, parent)
            local_c = _gather(local_c, parent).clone()
            local_c[:, :, t_i] = new_codes
            local_r = _gather(local_r, parent).clone()
            local_r[:, :, loc] -= dw
            p = _gather(p, parent) - dw @ h_bb[loc, :]  # keep P_b exact: a rank-g update
        resid = _gather(resid, origin).clone()
        resid[:, :, cols] = local_r
        hyp_codes = _gather(hyp_codes, origin).clone()
        hyp_codes[:, :, blk] = local_c.to(torch.uint8)
    return hyp_codes[:, 0].long(), hyp_loss[:, 0]
