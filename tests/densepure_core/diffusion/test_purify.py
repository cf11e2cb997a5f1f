"""Purifiers on a tiny random UNet: closed forms, diffusers' DDPMScheduler, pinned slices."""

from __future__ import annotations

import math
from pathlib import Path

import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from densepure_core.diffusion import purify
from densepure_core.diffusion.purify import (
    ReverseProcess,
    make_purifier,
    noisy_to_xt,
    one_shot,
    predict_x0,
    respace,
    respaced_timesteps,
    reverse_process,
    unet_denoiser,
)
from densepure_core.rng import REVERSE, RowNoise, derive_seed
from densepure_core.diffusion.schedule import DiffusionSchedule
from pins import FLOAT_ATOL

C, H = 3, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny UNet is ~30x slower with 2 threads on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_unet(out_channels: int = C) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=H, in_channels=C, out_channels=out_channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def eps_model():
    return unet_denoiser(_tiny_unet())


@pytest.fixture(scope="module")
def learned_model():
    return unet_denoiser(_tiny_unet(2 * C))


def _images(b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, C, H, H), generator=g)


def _noisy(b: int, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return _images(b, seed) + sigma * torch.randn((b, C, H, H), generator=g)


class ListNoise:
    """Duck-typed RowNoise that hands out given tensors and counts the draws."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.draws = 0
        self.shape = tuple(self.tensors[0].shape[1:]) if self.tensors else ()
        self._rows = self.tensors[0].shape[0] if self.tensors else 0

    def __len__(self) -> int:
        return self._rows

    def draw(self) -> torch.Tensor:
        self.draws += 1
        return self.tensors.pop(0)


def _noise_tensors(n: int, b: int, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((b, C, H, H), generator=g) for _ in range(n)]


# --------------------------------------------------------------------------- timesteps
def test_respaced_timesteps_pinned():
    assert respaced_timesteps(144, 10) == [144, 130, 115, 101, 86, 72, 58, 43, 29, 14]
    assert respaced_timesteps(144, 2) == [144, 72]
    assert respaced_timesteps(396, 10) == [396, 356, 317, 277, 238, 198, 158, 119, 79, 40]
    assert respaced_timesteps(7, 1) == [7]
    assert respaced_timesteps(5, 5) == [5, 4, 3, 2, 1]
    # Python's round(): half to even, as in DensePure's code (72.5 -> 72, 129.5 -> 130).
    assert respaced_timesteps(145, 2) == [145, 72]
    assert respaced_timesteps(259, 2) == [259, 130]


@pytest.mark.parametrize("t_star, steps", [(144, 145), (144, 0), (144, -1), (0, 1)])
def test_respaced_timesteps_refuses_bad_steps(t_star, steps):
    with pytest.raises(ValueError, match=rf"steps={steps} .*t\*={t_star}"):
        respaced_timesteps(t_star, steps)


def test_make_purifier_refuses_steps_beyond_t_star(eps_model):
    s = DiffusionSchedule.linear()
    with pytest.raises(ValueError, match=r"steps=145 .*t\*=144"):
        make_purifier("densepure", eps_model, s, 0.25, steps=145)


# --------------------------------------------------------------------------- re-spacing
def test_respaced_betas_formula():
    s = DiffusionSchedule.linear()
    abar = s.alphas_cumprod
    sp = respace(s, [144, 72])
    assert sp.timesteps == (72, 144)
    np.testing.assert_array_equal(sp.betas, [1 - abar[72], 1 - abar[144] / abar[72]])
    np.testing.assert_allclose(sp.alphas_cumprod, abar[[72, 144]], rtol=1e-14)
    pv = sp.betas * (1 - sp.alphas_cumprod_prev) / (1 - sp.alphas_cumprod)
    np.testing.assert_array_equal(sp.posterior_variance, pv)
    assert sp.posterior_log_variance_clipped[0] == np.log(pv[1])  # the clip at k = 0
    np.testing.assert_array_equal(sp.fixed_large_variance, [pv[1], sp.betas[1]])
    # k = 0: the posterior mean is the predicted x0.
    assert sp.posterior_mean_coef2[0] == 0.0 and abs(sp.posterior_mean_coef1[0] - 1) < 1e-12

    full = respace(s, range(70, -1, -1))
    np.testing.assert_allclose(full.betas, s.betas[:71], rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- forward, x0
def test_noisy_to_xt_is_the_forward_marginal():
    sigma = 0.25
    abar = 1 / (1 + 4 * sigma**2)
    x = _images(4)
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    expected = math.sqrt(abar) * (2 * x - 1) + math.sqrt(1 - abar) * e
    torch.testing.assert_close(noisy_to_xt(x + sigma * e, abar), expected, rtol=0, atol=1e-6)


def test_one_shot_equals_closed_form(eps_model):
    s = DiffusionSchedule.linear()
    t = 144
    a = s.alphas_cumprod[t]
    x_t = noisy_to_xt(_noisy(2, 0.25), a)
    eps = eps_model(x_t, torch.full((2,), t))
    expected = (x_t.double() / math.sqrt(a) - math.sqrt(1 / a - 1) * eps.double()).clamp(-1, 1)
    out = one_shot(eps_model, s, x_t, t)
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=1e-6)
    assert out.abs().max() <= 1 and not out.requires_grad


def test_predict_x0_sample_and_v_prediction():
    x_t = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(5)) * 0.5
    out = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(6)) * 0.5
    base = DiffusionSchedule.linear()
    a = base.alphas_cumprod[100]
    smp = DiffusionSchedule(base.betas, prediction_type="sample")
    torch.testing.assert_close(predict_x0(out, x_t, 100, smp), out.clamp(-1, 1))
    v = DiffusionSchedule(base.betas, prediction_type="v_prediction")
    expected = math.sqrt(a) * x_t - math.sqrt(1 - a) * out
    torch.testing.assert_close(predict_x0(out, x_t, 100, v, clip=False), expected)
    # per-row timesteps
    t = torch.tensor([10, 500])
    got = predict_x0(out, x_t, t, base, clip=False)
    for i in range(2):
        torch.testing.assert_close(got[i:i + 1], predict_x0(out[i:i + 1], x_t[i:i + 1], int(t[i]), base,
                                                            clip=False))


def test_two_c_output_needs_learned_range(learned_model):
    s = DiffusionSchedule.linear()
    x_t = torch.zeros(1, C, H, H)
    with pytest.raises(ValueError, match="learned_range"):
        one_shot(learned_model, s, x_t, 10)


# --------------------------------------------------------------------------- vs diffusers
def _diffusers_loop(denoiser, scheduler, x, timesteps, noise_list, monkeypatch):
    """diffusers' own DDPMScheduler.step loop in float64, fed the given per-step noise.

    Stock diffusers keeps alphas_cumprod in float32 and re-derives each step's beta as
    1 - abar_t / abar_prev, a cancellation that costs it ~4e-5 over 71 steps; promoting
    alphas_cumprod to float64 makes it a reference for the math itself.
    """
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    draws = [z.double() for z in noise_list]
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: draws.pop(0))
    scheduler.set_timesteps(timesteps=list(timesteps))
    x = x.double()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = denoiser(x, torch.full((x.shape[0],), int(t)))
            x = scheduler.step(out, t, x).prev_sample
    assert not draws
    return x


def test_full_chain_fixed_small_equals_diffusers(eps_model, monkeypatch):
    scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small")
    s = DiffusionSchedule.from_scheduler(scheduler)
    t_star = s.t_star(0.12)
    assert t_star == 70
    ts = list(range(t_star, -1, -1))
    x_t = noisy_to_xt(_noisy(2, 0.12), s.alphas_cumprod[t_star])
    z = _noise_tensors(len(ts) - 1, 2)
    noise = ListNoise(z)
    ours = reverse_process(eps_model, s, x_t, ts, noise)
    assert noise.draws == len(ts) - 1 == 70
    ours64 = reverse_process(eps_model, s, x_t.double(), ts, ListNoise([q.double() for q in z]))
    ref = _diffusers_loop(eps_model, scheduler, x_t, ts, z, monkeypatch)  # no draw at t = 0
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
    # float64 all through: what remains is the float32 UNet seeing 1-ulp different inputs.
    torch.testing.assert_close(ours64, ref, rtol=0, atol=1e-6)


def test_densepure_learned_range_equals_diffusers_custom_timesteps(learned_model, monkeypatch):
    # diffusers' custom timesteps re-space exactly like respace.py (abar_prev = 1 at the end).
    scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    s = DiffusionSchedule.from_scheduler(scheduler)
    ts = respaced_timesteps(144, 10)
    x_t = noisy_to_xt(_noisy(2, 0.25), s.alphas_cumprod[144])
    z = _noise_tensors(len(ts) - 1, 2)
    noise = ListNoise(z)
    ours = reverse_process(learned_model, s, x_t, ts, noise)
    assert noise.draws == 9
    ours64 = reverse_process(learned_model, s, x_t.double(), ts, ListNoise([q.double() for q in z]))
    # diffusers also draws at its last step (t = 14 > 0), with variance clamped to ~0: give zeros.
    ref = _diffusers_loop(learned_model, scheduler, x_t, ts, z + [torch.zeros_like(x_t)], monkeypatch)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours64, ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- step details
class Recorder:
    """Wraps a denoiser and records (x, t, output) of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        out = self.fn(x, t)
        self.calls.append((x.clone(), t.clone(), out.clone()))
        return out


def test_last_step_returns_predicted_x0(eps_model):
    s = DiffusionSchedule.linear()
    ts = respaced_timesteps(144, 3)
    rec = Recorder(eps_model)
    x_t = noisy_to_xt(_noisy(2, 0.25), s.alphas_cumprod[144])
    out = reverse_process(rec, s, x_t, ts, ListNoise(_noise_tensors(2, 2)))
    assert [int(c[1][0]) for c in rec.calls] == ts == [144, 96, 48]  # the original indices
    x_last, _, eps_last = rec.calls[-1]
    x0 = predict_x0(eps_last, x_last, 48, s)
    assert torch.equal(out, x0)
    # guided-diffusion's mean at re-spaced index 0 is the same thing.
    sp = respace(s, ts)
    mean0 = sp.posterior_mean_coef1[0] * x0 + sp.posterior_mean_coef2[0] * x_last
    torch.testing.assert_close(mean0, x0, rtol=0, atol=1e-6)


def test_learned_range_step_by_hand():
    s = DiffusionSchedule(DiffusionSchedule.linear().betas, variance_type="learned_range")
    abar = s.alphas_cumprod
    ta, tb = 100, 40
    v = torch.linspace(-1, 1, C * H * H).view(1, C, H, H)

    def model(x, t):
        return torch.cat([0.3 * x, v.expand_as(x)], dim=1)

    rec = Recorder(model)
    x = torch.randn(1, C, H, H, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    z = torch.randn(1, C, H, H, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    reverse_process(rec, s, x, [ta, tb], ListNoise([z]))
    x1 = rec.calls[1][0]

    # guided-diffusion, written out in float64 for the re-spaced pair (40, 100), k = 1.
    ac0 = 1 - (1 - abar[tb])  # re-spaced cumprod at k = 0
    beta1 = 1 - abar[ta] / abar[tb]
    ac1 = ac0 * (1 - beta1)
    pv1 = beta1 * (1 - ac0) / (1 - ac1)
    frac = (v.double() + 1) / 2
    log_var = frac * math.log(beta1) + (1 - frac) * math.log(pv1)
    x0 = (x / math.sqrt(abar[ta]) - math.sqrt(1 / abar[ta] - 1) * 0.3 * x).clamp(-1, 1)
    mean = beta1 * math.sqrt(ac0) / (1 - ac1) * x0 + (1 - ac0) * math.sqrt(1 - beta1) / (1 - ac1) * x
    torch.testing.assert_close(x1, mean + torch.exp(0.5 * log_var) * z, rtol=1e-12, atol=1e-12)

    sp = respace(s, [ta, tb])
    got = sp.log_variance(1, "learned_range", v.double(), x)
    torch.testing.assert_close(got, log_var, rtol=1e-12, atol=1e-12)
    assert float(sp.log_variance(1, "fixed_large", None, x).flatten()[0]) == pytest.approx(math.log(beta1), rel=1e-12)
    assert float(sp.log_variance(1, "fixed_small", None, x).flatten()[0]) == pytest.approx(math.log(pv1), rel=1e-12)


# --------------------------------------------------------------------------- purifiers
def test_purifier_kinds(eps_model):
    s = DiffusionSchedule.linear()
    expect = {  # kind, steps -> (t*, calls, stochastic)
        ("none", 1): (None, 0, False),
        ("one_shot", 1): (144, 1, False),
        ("densepure", 1): (144, 1, False),
        ("densepure", 10): (144, 10, True),
        ("full", 1): (144, 145, True),
    }
    for (kind, steps), (t, calls, stoch) in expect.items():
        p = make_purifier(kind, eps_model, s, 0.25, steps=steps)
        assert (p.kind, p.t_star, p.unet_calls_per_purification, p.stochastic) == (kind, t, calls, stoch)
    assert make_purifier("full", eps_model, s, 0.25).timesteps == tuple(range(144, -1, -1))
    assert make_purifier("one_shot", eps_model, s, 0.25, t_star_rule="first_at_or_above").t_star == 145
    x = _noisy(2, 0.25)
    assert make_purifier("none", None, None, 0.25)(x, None) is x
    with pytest.raises(ValueError, match="kind"):
        make_purifier("ddim", eps_model, s, 0.25)
    with pytest.raises(ValueError, match="noise source"):
        make_purifier("densepure", eps_model, s, 0.25, steps=2)(x, None)


def test_densepure_one_step_is_one_shot(eps_model):
    s = DiffusionSchedule.linear()
    x = _noisy(2, 0.5)
    a = make_purifier("one_shot", eps_model, s, 0.5)(x)
    b = make_purifier("densepure", eps_model, s, 0.5, steps=1)(x)
    assert torch.equal(a, b)


def test_pinned_outputs(eps_model, learned_model):
    s = DiffusionSchedule.linear()
    sl = DiffusionSchedule(s.betas, variance_type="learned_range")
    x = _noisy(2, 0.25)
    seeds = [derive_seed(0, "img", 0, k, REVERSE) for k in range(2)]
    got = {
        "one_shot": make_purifier("one_shot", eps_model, s, 0.25)(x),
        "densepure": make_purifier("densepure", eps_model, s, 0.25, steps=2)(x, RowNoise(seeds, (C, H, H))),
        "densepure_lr": make_purifier("densepure", learned_model, sl, 0.25, steps=10)(
            x, RowNoise(seeds, (C, H, H))),
    }
    pinned = {  # out[1, 0, 1, :4] (an unclipped stretch) and the mean
        "one_shot": ([0.3364640, 0.4851075, 0.6870235, 0.3851653], 0.5355372),
        "densepure": ([0.2838507, 0.6036618, 0.6496359, 0.5213696], 0.5333449),
        "densepure_lr": ([0.1198621, 0.6528988, 0.6317191, 0.3676533], 0.5148289),
    }
    for name, out in got.items():
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        row, mean = pinned[name]
        np.testing.assert_allclose(out[1, 0, 1, :4].numpy(), row, atol=1e-5, err_msg=name)
        assert float(out.mean()) == pytest.approx(mean, abs=1e-5), name


def test_row_is_batch_independent(eps_model):
    s = DiffusionSchedule.linear()
    p = make_purifier("densepure", eps_model, s, 0.25, steps=10)
    x = _noisy(5, 0.25)
    seeds = [derive_seed(0, f"img{i}", 3, 1, REVERSE) for i in range(5)]

    def rowwise(xb, t):  # the UNet's own float rounding depends on batch size: take it out
        return torch.cat([eps_model(xb[i:i + 1], t[i:i + 1]) for i in range(xb.shape[0])])

    q = make_purifier("densepure", rowwise, s, 0.25, steps=10)
    batch = q(x, RowNoise(seeds, (C, H, H)))
    alone = q(x[2:3], RowNoise(seeds[2:3], (C, H, H)))
    assert torch.equal(batch[2:3], alone)
    # With the batched UNet, the same up to that rounding.
    batched = p(x, RowNoise(seeds, (C, H, H)))
    torch.testing.assert_close(batched, batch, rtol=0, atol=1e-5)


def test_gradients_flow_only_when_asked(eps_model):
    s = DiffusionSchedule.linear()
    ts = respaced_timesteps(70, 3)
    x_t = noisy_to_xt(_noisy(1, 0.12), s.alphas_cumprod[70]).requires_grad_(True)
    assert not reverse_process(eps_model, s, x_t, ts, ListNoise(_noise_tensors(2, 1))).requires_grad
    out = reverse_process(eps_model, s, x_t, ts, ListNoise(_noise_tensors(2, 1)), grad=True)
    out.sum().backward()
    assert x_t.grad is not None and torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0


def test_reverse_process_refuses_bad_timesteps(eps_model):
    s = DiffusionSchedule.linear()
    x = torch.zeros(1, C, H, H)
    for ts in ([], [10, 10], [5, 10]):
        with pytest.raises(ValueError, match="descending"):
            reverse_process(eps_model, s, x, ts, ListNoise([]))
    with pytest.raises(ValueError, match="needs noise"):
        reverse_process(eps_model, s, x, [10, 5], None)
    assert purify.KINDS == ("none", "one_shot", "densepure", "full")


# --------------------------------------------------------------------------- the one reverse step
def _fixture_purifiers(tmp_path_factory):
    from model_factory import tiny_ddpm

    from densepure_core.models import load_diffusion

    for lr in (False, True):
        dm = load_diffusion(str(tiny_ddpm(tmp_path_factory.mktemp(f"ref{int(lr)}"), learned_range=lr)))
        sched = DiffusionSchedule.from_scheduler(dm.scheduler)
        for kind, sigma, steps in (("one_shot", 0.5, 1), ("densepure", 0.5, 3), ("densepure", 0.25, 2),
                                   ("full", 0.12, 1)):
            yield f"lr{int(lr)}-{kind}-s{sigma}-S{steps}", make_purifier(kind, unet_denoiser(dm.unet), sched,
                                                                          sigma, steps=steps)


def test_reverse_step_reproduces_the_engines_former_fast_path(tmp_path_factory):
    """tests/densepure_core/diffusion/data/fast_path_reference.pt holds the outputs of the engine's former
    ``_FastPurifier`` (its own copy of the step arithmetic, with device-cached coefficients) on
    these tiny DDPMs, for explicit noise tensors. The one ReverseProcess.step reproduces them for
    every kind and both variance types: bit for bit on the machine that stored them, within
    FLOAT_ATOL on another CPU (tests/pins.py: one AVX-512 machine differed by 2e-7 to 4e-7)."""
    ref = torch.load(Path(__file__).parent / "data" / "fast_path_reference.pt")
    seen = 0
    for key, p in _fixture_purifiers(tmp_path_factory):
        x = torch.rand((5, 3, 8, 8), generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(11)
        zs = [torch.randn((5, 3, 8, 8), generator=g) for _ in range(p.draws)]
        out = p(x, zs if zs else None)
        torch.testing.assert_close(out, ref[key], rtol=0, atol=FLOAT_ATOL, msg=key)
        # The same through a noise source handing out the same tensors (drawn after each UNet
        # call): the same computation on this machine, so bit for bit.
        if zs:
            assert torch.equal(p(x, ListNoise(zs)), out), key
        seen += 1
    assert seen == len(ref) == 8


def test_reverse_step_gives_exact_gradients_and_checkpoints(eps_model):
    """Every operation of a step is differentiable, and the noise is an argument: a step wrapped
    in torch.utils.checkpoint (memory flat in the number of steps) gives the same gradient."""
    s = DiffusionSchedule.linear()
    chain = ReverseProcess(eps_model, s, respaced_timesteps(144, 3))
    x_t = noisy_to_xt(_noisy(2, 0.25), s.alphas_cumprod[144])
    zs = _noise_tensors(chain.draws, 2)

    def run(step):
        x = x_t.clone().requires_grad_(True)
        h = x
        for i in range(chain.num_steps):
            h, x0 = step(h, i, zs[i] if i < chain.draws else None)
        (x0 * torch.linspace(-1, 1, x0.numel()).view_as(x0)).sum().backward()
        return x0.detach(), x.grad

    def checkpointed(h, i, z):
        return torch.utils.checkpoint.checkpoint(chain.step, h, i, z, use_reentrant=False)

    out, grad = run(chain.step)
    out_ck, grad_ck = run(checkpointed)
    assert torch.equal(out, out_ck) and grad.abs().sum() > 0
    torch.testing.assert_close(grad_ck, grad, rtol=0, atol=0)
    # and the same function as the no-grad chain
    assert torch.equal(out, chain.run(x_t, zs))


def test_fixed_noise_is_checked(eps_model):
    s = DiffusionSchedule.linear()
    chain = ReverseProcess(eps_model, s, [144, 72, 10])
    x_t = noisy_to_xt(_noisy(2, 0.25), s.alphas_cumprod[144])
    with pytest.raises(ValueError, match="2 tensors given|draws 2"):
        chain.run(x_t, _noise_tensors(1, 2))
    with pytest.raises(ValueError, match="needs noise"):
        chain.run(x_t, None)
    with pytest.raises(ValueError, match="strictly descending"):
        ReverseProcess(eps_model, s, [10, 72])


# --------------------------------------------------------------------------- the purifier contract
def _contract_purifiers():
    s = DiffusionSchedule.linear()
    sl = DiffusionSchedule(s.betas, variance_type="learned_range")
    eps, lrm = unet_denoiser(_tiny_unet()), unet_denoiser(_tiny_unet(2 * C))
    return {
        "none": make_purifier("none", None, None, 0.25),
        "one_shot": make_purifier("one_shot", eps, s, 0.25),
        "densepure": make_purifier("densepure", eps, s, 0.25, steps=3),
        "densepure_lr": make_purifier("densepure", lrm, sl, 0.25, steps=2),
        "full": make_purifier("full", eps, s, 0.05),
    }


@pytest.mark.parametrize("name", ["none", "one_shot", "densepure", "densepure_lr", "full"])
def test_purifier_contract(name):
    """What every PurifierProtocol implementation guarantees (see purify.PurifierProtocol)."""
    from densepure_core.diffusion.purify import PurifierProtocol

    p = _contract_purifiers()[name]
    assert isinstance(p, PurifierProtocol)
    x = _noisy(4, 0.25)
    seeds = [derive_seed(1, f"img{i}", 0, 0, REVERSE) for i in range(4)]

    def noise(rows=slice(None)):
        return RowNoise(seeds[rows], (C, H, H)) if p.stochastic else None

    out = p(x, noise())
    assert out.shape == x.shape and out.dtype == x.dtype
    # Deterministic given its noise streams.
    assert torch.equal(out, p(x, noise()))
    if name == "none":
        assert out is x  # the identity: the classifier sees the unclipped copy
        assert p.unet_calls_per_purification == 0 and not p.stochastic
        return
    assert out.min() >= 0 and out.max() <= 1  # a denoising purifier clips its own output
    assert p.unet_calls_per_purification == len(p.timesteps) >= 1
    assert p.stochastic == (p.draws > 0) == (len(p.timesteps) > 1)
    # A row depends only on itself and its stream (up to the UNet's batch-size rounding).
    torch.testing.assert_close(p(x[1:3], noise(slice(1, 3))), out[1:3], rtol=0, atol=1e-5)
    if p.stochastic:
        counter = ListNoise(_noise_tensors(p.draws, 4))
        p(x, counter)
        assert counter.draws == p.draws
        with pytest.raises(ValueError, match="noise"):
            p(x, None)
