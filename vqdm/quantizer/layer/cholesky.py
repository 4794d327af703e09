"""The upper Cholesky factor of H⁻¹ that GPTQ-style error feedback walks (`scalar.gptq_quantize`,
`sequential_pass.sequential_code_pass`), with a ridge on H's diagonal when H is not positive definite."""
from __future__ import annotations

from typing import Iterable

import torch

# Ridges tried in turn, as fractions of mean(diag H): the smallest that makes H positive definite is used.
SEARCH_RIDGES = (0.0, 1e-6, 1e-4, 1e-2, 1.0)


def relative_ridges(h: torch.Tensor, fractions: Iterable[float] = SEARCH_RIDGES) -> list[float]:
    """Each fraction times mean(diag H): absolute amounts for `inverse_cholesky`."""
    mean_diag = float(h.diagonal().mean())
    return [f * mean_diag for f in fractions]


def inverse_cholesky(h: torch.Tensor, ridges: Iterable[float] | None = None) -> torch.Tensor:
    """Upper U with Uᵀ U = (H + r·I)⁻¹, in H's dtype, for the first ridge r in `ridges` that works.

    `ridges`: absolute amounts added to the diagonal, tried in order (default: `relative_ridges(h)`,
    from 0 up to H's mean diagonal). A ridge works when H + r·I is positive definite and the factor
    of its inverse is finite. At most two d×d temporaries besides H (d = 23,040 at SDXL's largest conv).
    """
    for ridge in relative_ridges(h) if ridges is None else ridges:
        ridged = h
        if ridge:
            ridged = h.clone()
            ridged.diagonal().add_(ridge)
        l_factor, info = torch.linalg.cholesky_ex(ridged)
        del ridged
        if int(info) != 0:
            continue
        h_inv = torch.cholesky_inverse(l_factor)
        del l_factor
        u, info = torch.linalg.cholesky_ex(h_inv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(u).all()):
            return u
    raise ValueError("H is not positive definite even with a ridge on its diagonal: check the "
                     "calibration statistics (NaN rows, an all-zero input channel?)")
