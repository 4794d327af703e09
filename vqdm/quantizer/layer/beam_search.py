"""Beam search over AQ codes with codebooks and scales fixed (SPEC §3.5).

Per row i the loss is ℓ_i = (w_i − ŵ_i) H (w_i − ŵ_i)ᵀ; rows are independent, so every step runs
on all rows (and all beam hypotheses of every row) at once.

`candidate_losses` is the plain reference: the SPEC's delta formula, literally, from a full decode.
For input group j (columns J), codebook m, row i, with c_old = C_m[b_ijm]:
    δ = (w_i − ŵ_i) + s_i·c_old on J,   q = δ·H[:, J]
    ℓ(k) = ℓ − 2 s_i (C_m[k] − c_old)·q + s_i² (C_m[k] H_JJ C_m[k]ᵀ − c_old H_JJ c_oldᵀ)

`beam_search_pass` is the fast path. Same formula, rearranged so a step never touches d:
with T = (w_i − ŵ_i^{−J}) H[:, J] (ŵ^{−J}: the decode without group j), a hypothesis whose group j
decodes to v (unscaled) scores s² v H_JJ vᵀ − 2 s v·T (+ a per-row constant). Swapping codeword m
of a hypothesis, v = a + C_m[k] with a = v − c_old, gives
    score(k) = [s² a H_JJ aᵀ − 2 s a·T] − 2 s C_m[k]·q + s² C_m[k] H_JJ C_m[k]ᵀ,   q = T − s a H_JJ,
which is the SPEC's ℓ(k) up to that constant. One GEMM [rows·beam, g+2] × [g+2, 2^B] scores every
codeword for every hypothesis; a row-wise top-k over beam × 2^B keeps the best `beam`.

Order and beam scope. Groups are visited in a shuffled order, the K codebooks of each group in a
shuffled order. The beam explores joint choices of the K codes of one group (the codes that
interact most: they add up to the same g weights) and collapses to each row's best hypothesis
when the search moves to the next group. Hypotheses then differ only inside J, so scoring costs
O(rows·beam·2^B·g) per step instead of the O(rows·beam·d·g) of carrying whole-row hypotheses through
the pass (AQLM's layout), which is what makes the search affordable at d = 11,520 on a CPU.
After group j, only its slice changes: R[:, J] and the running product P = R·H[:, block] (a
rank-g update); P is recomputed with one GEMM per block of groups, never per step.

Never increases the loss: each hypothesis's "keep the current code" candidate is scored too, so the
best score in the beam cannot rise, and the collapse keeps the best.
"""
from __future__ import annotations

import torch

from vqdm.vq_format import decode_groups

# Groups per block of the running product P = R·H[:, block]: one [rows, d]×[d, 32·g] GEMM per block
# keeps the per-pass product cost at one rows×d×d GEMM while P stays small.
BLOCK_GROUPS = 32
# Rows per chunk: [rows, beam, 2^B] fp32 scores = 8192·8·256·4 B = 64 MiB per scratch tensor.
MAX_ROWS = 8192


def candidate_losses(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
    group: int, codebook: int,
) -> torch.Tensor:
    """Reference: row loss ℓ_i(k) [n, 2^B] (float64) after setting code (i, group, codebook) to k.

    The SPEC §3.5 formula term by term, from a full float64 decode. Slow; for tests and checks.
    """
    w, h = w.double(), h.double()
    books, s = codebooks.double(), scales.double()
    n, d = w.shape
    g = books.shape[2]
    cols = slice(group * g, (group + 1) * g)
    w_hat = decode_groups(codes, books).reshape(n, d) * s[:, None]
    resid = w - w_hat
    loss = ((resid @ h) * resid).sum(1)  # ℓ_i, [n]
    c_old = books[codebook][codes[:, group, codebook].long()]  # [n, g]
    delta = resid.clone()
    delta[:, cols] += s[:, None] * c_old  # the residual with c_old put back
    q = delta @ h[:, cols]  # [n, g]
    h_jj = h[cols, cols]
    cand = books[codebook]  # [2^B, g]
    cand_norm = ((cand @ h_jj) * cand).sum(1)  # C_m[k] H_JJ C_m[k]ᵀ, [2^B]
    old_norm = ((c_old @ h_jj) * c_old).sum(1)  # [n]
    lin = cand @ q.T - (c_old * q).sum(1)[None, :]  # (C_m[k] − c_old)·q, [2^B, n]
    return (loss[None, :] - 2 * s[None, :] * lin + s.square()[None, :] * (cand_norm[:, None] - old_norm[None, :])).T


def search_group(
    t: torch.Tensor, h_jj: torch.Tensor, u_j: torch.Tensor, codes_j: torch.Tensor, codebooks: torch.Tensor,
    scales: torch.Tensor, beam_size: int, order: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam search over the K codes of one group for all rows at once.

    t [r, g]: (w − ŵ without this group)·H[:, J];  h_jj [g, g];  u_j [r, g]: current unscaled decode of
    the group;  codes_j [r, K] int64;  order: codebooks in visiting order.
    Returns (new codes [r, K], new decode [r, g], old score [r], new score [r]); score(v) =
    s² v H_JJ vᵀ − 2 s v·T, so new − old is exactly the change of each row's loss ℓ_i.
    """
    r, g = u_j.shape
    q_size = codebooks.shape[1]
    s = scales[:, None, None]  # [r, 1, 1]
    s_sq = (scales * scales)[:, None, None].expand(r, 1, 1)
    ones_col = torch.ones(1, q_size, dtype=u_j.dtype, device=u_j.device)
    t3 = t[:, None, :]  # [r, 1, g]

    def score(v: torch.Tensor) -> torch.Tensor:  # s² v H_JJ vᵀ − 2 s v·T: [r, b, g] -> [r, b]
        return s[..., 0] * (s[..., 0] * ((v @ h_jj) * v).sum(-1) - 2 * (v * t3).sum(-1))

    old_score = score(u_j[:, None, :])[:, 0]
    hyp_codes = codes_j[:, None, :]  # [r, b, K]
    hyp_u = u_j[:, None, :]  # [r, b, g]
    hyp_score = old_score[:, None]
    for m in order:
        book = codebooks[m]  # [2^B, g]
        b = hyp_u.shape[1]
        a = hyp_u - book[hyp_codes[..., m]]  # the hypothesis without codebook m, [r, b, g]
        a_h = a @ h_jj
        base = s[..., 0] * (s[..., 0] * (a_h * a).sum(-1) - 2 * (a * t3).sum(-1))  # score(a), [r, b]
        q = t3 - s * a_h  # [r, b, g]
        # One GEMM: [−2 s q, s², base] · [C_mᵀ; ‖C_m[k]‖²_H; 1] = base − 2 s C_m[k]·q + s² ‖C_m[k]‖²_H.
        lhs = torch.cat([q * (-2 * s), s_sq.expand(r, b, 1), base[..., None]], dim=-1)  # [r, b, g+2]
        rhs = torch.cat([book.T, ((book @ h_jj) * book).sum(1)[None, :], ones_col], dim=0)  # [g+2, 2^B]
        scores = (lhs.reshape(r * b, g + 2) @ rhs).reshape(r, b * q_size)
        k = min(beam_size, b * q_size)
        hyp_score, best = scores.topk(k, dim=1, largest=False, sorted=True)  # [r, k]
        parent, new_code = best // q_size, best % q_size
        hyp_codes = hyp_codes.gather(1, parent[..., None].expand(r, k, hyp_codes.shape[2])).clone()
        hyp_codes[..., m] = new_code
        hyp_u = a.gather(1, parent[..., None].expand(r, k, g)) + book[new_code]
    # Sorted top-k: hypothesis 0 is each row's best. Keep the old codes where the best is no better
    # (ties and float noise must not churn codes or raise the exact loss).
    better = hyp_score[:, 0] < old_score
    new_codes = torch.where(better[:, None], hyp_codes[:, 0], codes_j)
    new_u = torch.where(better[:, None], decode_groups(new_codes[:, None, :], codebooks)[:, 0], u_j)
    return new_codes, new_u, old_score, torch.where(better, hyp_score[:, 0], old_score)


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
    groups = d // g
    order = torch.randperm(groups, generator=generator)
    book_orders = torch.argsort(torch.rand(groups, num_books, generator=generator), dim=1).tolist()
    codes = codes.long().clone()
    gain = torch.zeros(n, dtype=torch.float64, device=w.device)
    offsets = torch.arange(g, device=w.device)
    blocks = [blk.to(w.device) for blk in order.split(block_groups)]
    for r0 in range(0, n, max_rows):
        rows = slice(r0, min(n, r0 + max_rows))
        s = scales[rows]
        u = decode_groups(codes[rows], codebooks)  # [r, G, g]: decoded once per pass and chunk
        resid = w[rows] - s[:, None] * u.reshape(-1, d)  # [r, d]
        for blk in blocks:
            cols = (blk[:, None] * g + offsets).reshape(-1)  # the block's columns
            h_cols = h.index_select(1, cols)  # [d, nb·g]
            p = resid @ h_cols  # P = R·H[:, block], [r, nb·g]
            h_bb = h_cols.index_select(0, cols)  # [nb·g, nb·g]
            for t_i, j in enumerate(blk.tolist()):
                loc = slice(t_i * g, (t_i + 1) * g)
                h_jj = h_bb[loc, loc]
                u_j = u[:, j]
                t = p[:, loc] + s[:, None] * (u_j @ h_jj)  # (w − ŵ^{−J})·H_J
                new_codes, new_u, old_score, new_score = search_group(
                    t, h_jj, u_j, codes[rows, j], codebooks, s, beam_size, book_orders[j])
                gain[rows] += (new_score - old_score).double()
                dw = s[:, None] * (new_u - u_j)  # change of ŵ on J, zero for unchanged rows
                codes[rows, j] = new_codes
                u[:, j] = new_u
                resid[:, j * g:(j + 1) * g] -= dw
                p -= dw @ h_bb[loc, :]  # keep P = R·H[:, block] exact: a rank-g update
    return codes, gain
