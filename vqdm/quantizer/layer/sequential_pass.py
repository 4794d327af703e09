"""Sequential code choice with error feedback: GPTQ's column-by-column update, one group at a time.

The beam search (`beam_search`) is coordinate descent: it changes a group's codes only when that
lowers the loss with every other code held, so from a k-means start it settles in the nearest
local minimum. This pass re-chooses every code from scratch instead, in GPTQ's way (as GPTVQ does
for vectors): walk the groups in order; choose group j's codes for the weights as they stand,
then move the not-yet-quantized weights to absorb group j's error (the optimal brain-surgeon
update). With U the upper Cholesky factor of H⁻¹ (Uᵀ U = H⁻¹) and J the columns of group j:
    cost of group j      ‖(w'_J − ŵ_J) U_JJ⁻¹‖²   = ‖w'_J − ŵ_J‖²_M,  M = (U_JJᵀ U_JJ)⁻¹
    error                E_J = (w'_J − ŵ_J) U_JJ⁻¹
    feedback             w'_{>J} −= E_J U_{J,>J}
and W − Ŵ = E·U, so the loss of the whole row is exactly Σ_j ‖E_J‖² (returned, and tested).
Each group's K codes are chosen by the same beam as the code search (`search_group`), on M.

Measured on the 36 MiniLM layers (README "AQ search"): a few passes, each after a least-squares
fit of the codebooks to the previous codes, then the usual rounds, end 8–12% below the rounds
alone from the k-means start (median over layers). Groups go in order of decreasing H diagonal (GPTQ's
act-order): the groups that matter most are chosen first, while the most weights are free to
absorb their error.
"""
from __future__ import annotations

import torch

from vqdm.quantizer.layer.beam_search import MAX_ROWS, search_group
from vqdm.quantizer.layer.cholesky import inverse_cholesky
from vqdm.vq_format import decode_groups

# Groups whose error is fed back at once to the later columns: one [rows, 32·g] × [32·g, d] GEMM per
# block (GPTQ's lazy batch update); inside a block the update is per group.
BLOCK_GROUPS = 32


def group_order(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """Groups by decreasing Σ diag(H) over their g inputs (GPTQ's act-order, per group)."""
    return torch.argsort(h.diagonal().reshape(-1, group_size).sum(1), descending=True, stable=True)


def _order_and_columns(h: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`group_order`, the input columns in that order)."""
    perm = group_order(h, group_size)
    return perm, (perm[:, None] * group_size + torch.arange(group_size, device=perm.device)).reshape(-1)


@torch.no_grad()
def sequential_code_pass(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
    beam_size: int, generator: torch.Generator, u_chol: torch.Tensor | None = None, max_rows: int = MAX_ROWS,
) -> tuple[torch.Tensor, float]:
    """One pass choosing every code with error feedback: (new codes [n, d/g, K] int64, loss).

    w [n, d], h [d, d] (positive definite), codebooks [K, 2^B, g], scales [n], one float dtype and
    device; codes [n, d/g, K] integer, the start of each group's beam. `u_chol`: the permuted
    `inverse_cholesky` for this H, when the caller reuses it across passes (it depends on H only).
    The loss is Σ‖E‖²/n = tr((Ŵ−W) H (Ŵ−W)ᵀ)/n of the new codes, in float64.
    """
    n, d = w.shape
    num_books, _, g = codebooks.shape
    perm, cols = _order_and_columns(h, g)
    if u_chol is None:
        u_chol = permuted_inverse_cholesky(h, g)
    blocks_inv = torch.linalg.solve_triangular(  # U_JJ⁻¹ for every group, [G, g, g]
        torch.stack([u_chol[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(d // g)]),
        torch.eye(g, dtype=w.dtype, device=w.device).expand(d // g, g, g), upper=True)
    metrics = blocks_inv @ blocks_inv.transpose(1, 2)
    metrics = (metrics + metrics.transpose(1, 2)) * 0.5
    book_orders = torch.argsort(torch.rand(d // g, num_books, generator=generator), dim=1).tolist()
    perm_list = perm.tolist()  # one device sync, not one per group
    new_codes = codes.long().clone()
    loss = 0.0
    for r0 in range(0, n, max_rows):
        rows = slice(r0, min(n, r0 + max_rows))
        s = scales[rows]
        work = w[rows][:, cols].clone()  # w', permuted; updated as groups are fixed
        for b0 in range(0, d // g, BLOCK_GROUPS):
            b1 = min(d // g, b0 + BLOCK_GROUPS)
            errors = torch.empty(work.shape[0], (b1 - b0) * g, dtype=w.dtype, device=w.device)
            for t in range(b0, b1):
                loc = slice(t * g, (t + 1) * g)
                j = perm_list[t]
                target = work[:, loc]
                u_j = decode_groups(new_codes[rows, j:j + 1], codebooks)[:, 0]
                chosen, chosen_u, _, _ = search_group(target @ metrics[t], metrics[t], u_j, new_codes[rows, j],
                                                      codebooks, s, beam_size, book_orders[j])
                new_codes[rows, j] = chosen
                err = (target - s[:, None] * chosen_u) @ blocks_inv[t]
                errors[:, (t - b0) * g:(t - b0 + 1) * g] = err
                in_block = slice((t + 1) * g, b1 * g)
                work[:, in_block] -= err @ u_chol[loc, in_block]
            loss += float(errors.double().square().sum())
            work[:, b1 * g:] -= errors @ u_chol[b0 * g:b1 * g, b1 * g:]
    return new_codes, loss / n


def permuted_inverse_cholesky(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """`inverse_cholesky` of H with its columns in `group_order`: what `sequential_code_pass` walks.

    In H's dtype (float32 in the search, as GPTQ does it on the GPU). A singular H (an undamped
    search on few tokens) gets the smallest ridge, from 1e-6 of its mean diagonal up, that makes it
    positive definite: only the order of code choice depends on it.
    """
    _, cols = _order_and_columns(h, group_size)
    return inverse_cholesky(h.index_select(0, cols).index_select(1, cols))
