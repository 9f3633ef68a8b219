"""SSIM (images and latents) equals the dense 2-D Gaussian convolution it replaced, and stays within a memory bound
on wide images (the dense form added ~3 GiB of peak memory at 1024 px)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from graphsurgeon.fidelity import latent_ssim
from graphsurgeon.images import ssim

from .conftest import REPO


def dense_ssim(x: torch.Tensor, y: torch.Tensor, size: int, peak: float) -> float:
    """The earlier computation: (maps, H, W) float64 through one 2-D window convolution per statistic."""
    x, y = x[:, None], y[:, None]
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x ** 2
    var_y = F.conv2d(y * y, window) - mu_y ** 2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


@pytest.mark.parametrize("shape", [(11, 11), (37, 50), (150, 97), (200, 64)])  # 150, 200: several strips of rows
def test_image_ssim_equals_the_dense_computation(shape):
    generator = torch.Generator().manual_seed(shape[0])
    a = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=generator)
    noise = torch.randint(-40, 41, a.shape, generator=generator)
    b = (a.int() + noise).clamp(0, 255).to(torch.uint8)
    as_maps = [t.double().permute(2, 0, 1) for t in (a, b)]
    assert ssim(a, b) == pytest.approx(dense_ssim(*as_maps, 11, 255.0), rel=1e-12, abs=1e-14)
    assert ssim(a, a) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 3, 7, 9), (1, 2, 90, 70)])  # window 11, 7 (the map), strips
def test_latent_ssim_equals_the_dense_computation(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    reference = torch.randn(shape, generator=generator)
    other = reference + 0.3 * torch.randn(shape, generator=generator)
    peak = (reference.max() - reference.min()).double().item()
    expected = dense_ssim(reference.double().flatten(0, 1), other.double().flatten(0, 1), min(11, *shape[-2:]), peak)
    assert latent_ssim(reference, other) == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_ssim_of_wide_images_stays_within_a_memory_bound():
    """In a fresh process (the peak of this one says nothing): the peak resident memory SSIM adds on two
    256 x 1024 images, against 128 MiB. The working set depends on the width only (strips of rows); the dense
    form added about 0.75 GiB here and 3 GiB at 1024 x 1024."""
    script = textwrap.dedent("""
        import resource, torch
        from graphsurgeon.images import ssim
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, 256, (256, 1024, 3), dtype=torch.uint8, generator=g)
        b = (a.int() + torch.randint(-20, 21, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        value = ssim(a, b)
        print(value, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    value, added_mib = run.stdout.split()
    assert 0 < float(value) < 1 and int(added_mib) < 128
