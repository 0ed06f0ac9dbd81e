import math

import pytest
import torch

from flashcore.schedule import A_FLOOR, NoiseSchedule, ScheduleConfig, make_betas, trailing_grid


def test_linear_matches_closed_form_product():
    s = NoiseSchedule(kind="linear")
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    for t in (0, 1, 500, 999):
        expect = math.prod(1 - b for b in betas[: t + 1])
        assert s.alphas_cumprod[t].item() == pytest.approx(expect, rel=1e-9)


def test_scaled_linear_terminal_alpha_leaks_signal():
    a_T, s_T = NoiseSchedule(kind="scaled_linear").alpha_sigma(999)
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    assert a_T == pytest.approx(math.sqrt(math.prod(1 - b for b in betas)), rel=1e-9)
    assert 0.06 < a_T < 0.075
    assert a_T ** 2 + s_T ** 2 == pytest.approx(1.0, abs=1e-12)


def test_cosine_follows_its_alpha_bar_where_unclipped():
    s = NoiseSchedule(kind="cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescale(kind):
    base, z = NoiseSchedule(kind=kind), NoiseSchedule(kind=kind, zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert z.a[-1].item() == A_FLOOR                     # floored for x0_hat
    assert z.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-9)
    assert torch.all(z.alphas_cumprod[1:] <= z.alphas_cumprod[:-1])


def test_variance_preserving():
    s = NoiseSchedule(kind="scaled_linear")
    assert torch.allclose(s.a ** 2 + s.s ** 2, torch.ones(1000, dtype=torch.float64))


@pytest.mark.parametrize("n,grid", [(1, [999]), (2, [999, 499]), (3, [999, 666, 333]),
                                    (4, [999, 749, 499, 249])])
def test_trailing_grids(n, grid):
    assert trailing_grid(n) == grid


def test_teacher_grid_is_trailing_and_even():
    g = trailing_grid(50)
    assert g[0] == 999 and len(g) == 50 and all(a - b == 20 for a, b in zip(g, g[1:]))


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5])
def test_bad_grid(bad):
    with pytest.raises(ValueError, match="n_steps"):
        trailing_grid(bad)


def test_bad_schedule():
    with pytest.raises(ValueError, match="unknown kind"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="outside"):
        NoiseSchedule(ScheduleConfig()).alpha_sigma(1000)
