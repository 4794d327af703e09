"""FID (Heusel et al. 2017) against reference statistics, with the FID Inception-v3 in plain torch.

The network is the TF-ported Inception-v3 that pytorch-fid and most papers use (the 2015-12-05
graph: `FIDInceptionA/C/E` blocks, 1008-way fc), built here without torchvision, with the same
parameter names as pytorch-fid's `fid_inception_v3()`, so its weights load strictly. Weights come
from a local safetensors file; no download, no pickle. pytorch-fid ships them as a .pth; convert
once with

    python -c "import torch; from safetensors.torch import save_file; \\
               save_file(torch.load('pt_inception-2015-12-05-6726825d.pth', weights_only=True), 'inception.safetensors')"

Reference statistics are an .npz with `mu` [2048] and `sigma` [2048, 2048] (pytorch-fid's
`--save-stats` format) computed with the same network over the reference image set (e.g. COCO).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from vqdm.errors import ConfigError

FEATURES = 2048
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # The TF graph's average pools ignore padding (count_include_pad=False).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool  # the last block (Mixed_7c) max-pools in the TF graph
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Images [N, 3, H, W] in [0, 1] -> pool3 features [N, 2048] (resized to 299², scaled to [-1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for FID; kept so the weights file loads strictly

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception with weights from a local safetensors file (pytorch-fid parameter names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Inception weights not found (safetensors in pytorch-fid's layout; "
                                "see `vqdm eval --help` for how to convert pt_inception-2015-12-05.pth)")
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: give the Inception weights as .safetensors (vqdm loads no pickles); convert "
                          "the .pth once with torch.load(weights_only=True) + safetensors.torch.save_file")
    net = FIDInceptionV3()
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConfigError(f"{path}: not FID Inception-v3 weights ({len(missing)} missing, e.g. {missing[:1]}; "
                          f"{len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    return net.to(device).eval()


@torch.no_grad()
def inception_features(net: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """[N, 2048] float64 features of images [N, 3, H, W] in [0, 1]."""
    dev = next(net.parameters()).device
    out = [net(images[i:i + batch_size].to(dev, torch.float32)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64 of features [N, D] (array or CPU tensor), with the unbiased
    covariance, as pytorch-fid computes them."""
    f = np.asarray(features, dtype=np.float64)
    if f.shape[0] < 2:
        raise ValueError("FID needs at least 2 images (and thousands for a meaningful value)")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½) between two Gaussians, in float64 (FID's formula;
    arrays or CPU tensors). The one Fréchet distance of vqdm: FID and the digits' 8×8 space.

    tr((S1 S2)^½) = tr((A S2 A)^½) with A = S1^½: the eigenvalues of S1 S2 and A S2 A agree and
    the latter is symmetric PSD, so no non-symmetric matrix square root is needed.
    """
    mu1, mu2, s1, s2 = (np.asarray(t, dtype=np.float64) for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    ev, vec = np.linalg.eigh(s1)
    a = (vec * np.sqrt(ev.clip(min=0))) @ vec.T
    cross = np.linalg.eigvalsh(a @ s2 @ a).clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(cross).sum())


def features_to_statistics_distance(features, mu2, sigma2) -> float:
    """`frechet_distance(*feature_statistics(features), mu2, sigma2)`, through an n×n matrix when
    there are fewer images n than feature dimensions D (an eval of a few prompts against 2048-d
    Inception statistics): with S1 = CᵀC, C the centred features / √(n-1), the non-zero eigenvalues
    of S1 S2 are those of C S2 Cᵀ, so no D×D eigendecomposition is needed."""
    f, mu2, s2 = (np.asarray(t, dtype=np.float64) for t in (features, mu2, sigma2))
    n, d = f.shape
    if n < 2 or n > d or mu2.shape != (d,) or s2.shape != (d, d):
        return frechet_distance(*feature_statistics(f), mu2, s2)  # the D×D route, or its error message
    mu1 = f.mean(0)
    c = (f - mu1) / np.sqrt(n - 1)
    cross = np.linalg.eigvalsh(c @ s2 @ c.T).clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + (c * c).sum() + np.trace(s2) - 2.0 * np.sqrt(cross).sum())


def feature_frechet_distance(a, b) -> float:
    """`frechet_distance` between Gaussians fitted to two sets of feature vectors [n, d]."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with arrays `mu` and `sigma` (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: FID reference statistics not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
    except KeyError:
        raise ConfigError(f"{path}: FID statistics need arrays 'mu' and 'sigma' (pytorch-fid --save-stats format)") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not a readable .npz ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu.astype(np.float64), sigma.astype(np.float64)

