"""ADDT's pure functions (densepure_core/addt/formulas.py) against transcriptions of the reference formulas
(reference.md section 5, LYMDLUT/ADDT), on tiny models and the bundled digits models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from densepure_core.addt.formulas import (addt_lambda, addt_loss, cgpo, ema_decay, linf_perturbation, linf_ratio, rbgm,
                                 x0_estimate)


def linear_abar():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1 - betas)


def test_mixing_weights_match_the_formulas():
    abar = linear_abar()
    t = np.array([0, 5, 30, 100, 500, 999])
    ref_lambda = np.clip(0.03 * np.sqrt(abar[t]) / np.sqrt(1 - abar[t]), 0, 0.3)
    ref_r = np.clip(np.sqrt(abar[t]) / np.sqrt(1 - abar[t]), 0, 10)
    torch.testing.assert_close(addt_lambda(torch.tensor(abar[t])), torch.tensor(ref_lambda))
    torch.testing.assert_close(linf_ratio(torch.tensor(abar[t])), torch.tensor(ref_r))
    assert addt_lambda(torch.tensor(abar[[0]])).item() == 0.3  # clamped near t = 0
    assert addt_lambda(torch.tensor(abar[[999]])).item() < 1e-3


def test_rbgm_is_the_reference_mapping_and_a_sorted_gaussian_per_row():
    g = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta = rbgm(g, np.random.Generator(np.random.Philox(key=7)))
    assert delta.shape == g.shape and delta.dtype == g.dtype
    # transcription of the reference: delta_row = sorted_z[argsort(argsort(g_row))]
    z = np.sort(np.random.Generator(np.random.Philox(key=7)).standard_normal((6, 64), dtype=np.float32), axis=1)
    rows = g.reshape(6, 64).numpy()
    expected = np.stack([z[i][np.argsort(np.argsort(rows[i]))] for i in range(6)])
    np.testing.assert_array_equal(delta.reshape(6, 64).numpy(), expected.astype(np.float64))
    flat = delta.reshape(6, 64)
    for i in range(6):  # rank-preserving, and the values are a normal sample
        assert (np.argsort(rows[i]) == np.argsort(flat[i].numpy())).all()
        assert stats.kstest(flat[i].numpy(), "norm").pvalue > 0.01


def _tiny(channels=1, size=8, classes=3):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, classes))
    clf.requires_grad_(False)
    return (lambda x, t: unet(x, t).sample), unet, clf


def test_cgpo_leaves_no_parameter_gradient_and_the_loss_trains_the_model():
    model, unet, clf = _tiny()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    y, t = torch.tensor([0, 2]), torch.tensor([20, 300])
    abar = torch.tensor(linear_abar()[[20, 300]], dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    eps, delta0 = torch.randn(5, 2, 1, 8, 8, generator=gen), torch.randn(2, 1, 8, 8, generator=gen)
    delta = cgpo(model, clf, x0, y, t, abar, eps, delta0, np.random.Generator(np.random.Philox(key=3)))
    assert all(p.grad is None for p in unet.parameters())  # nothing leaks into the training step
    assert delta.shape == x0.shape and not delta.requires_grad
    loss = addt_loss(model, x0, t, abar, delta, torch.randn(2, 1, 8, 8, generator=gen))
    loss.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def _reference_cgpo(model, clf, x0, y, t, abar, noises, pseudo, delta0):
    """A direct transcription of the CGPO loop of LYMDLUT/ADDT ``train_DDPM_DDIM_ADDT/train_ADDT.py``
    (its ``torch.randn`` draws given as ``noises[i]`` and ``pseudo[i]``, iteration i; its
    ``transform_cifar10`` is the identity here, its ``accelerator.backward`` a plain backward)."""
    sqrt_alpha_prod = abar.sqrt()[:, None, None, None]
    sqrt_one_minus_alpha_prod = (1 - abar).sqrt()[:, None, None, None]
    advnoise_ratio = torch.clamp(0.03 * sqrt_alpha_prod / sqrt_one_minus_alpha_prod, 0, 0.3)
    delta = delta0.clone()
    eot = 0
    for i in range(5):
        delta.requires_grad = True
        noise = noises[i]  # drawn inside the loop: fresh every iteration
        noisy_images = sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * (
            noise * (1 - advnoise_ratio ** 2) ** 0.5 + delta * advnoise_ratio)
        noise_pred = model(noisy_images, t)
        original_samples = (noisy_images - sqrt_one_minus_alpha_prod * noise_pred) / sqrt_alpha_prod
        loss = F.cross_entropy(clf(original_samples / 2 + 0.5), y)
        loss.backward(retain_graph=True)
        grad = delta.grad.detach()
        eot += grad
        delta.grad.zero_()
        with torch.no_grad():
            psedue_noise = pseudo[i]
            psedue_noise = torch.sort(psedue_noise.reshape(psedue_noise.shape[0] * psedue_noise.shape[1], -1))[0]
            psedue_order = torch.sort(eot.reshape(eot.shape[0] * eot.shape[1], -1))[1]
            psedue_order = torch.sort(psedue_order)[1]
            psedue_noise = torch.gather(psedue_noise, 1, psedue_order)
            delta = psedue_noise.reshape(x0.shape).detach()
    return delta


def _cgpo_case():
    model, unet, clf = _tiny(channels=2, classes=4)
    gen = torch.Generator().manual_seed(11)
    x0 = torch.rand(3, 2, 8, 8, generator=gen) * 2 - 1
    y, t = torch.tensor([0, 3, 1]), torch.tensor([10, 100, 400])
    abar = torch.tensor(linear_abar()[[10, 100, 400]], dtype=torch.float32)
    noises, delta0 = torch.randn(5, 3, 2, 8, 8, generator=gen), torch.randn(3, 2, 8, 8, generator=gen)
    return model, unet, clf, x0, y, t, abar, noises, delta0


def _generators():
    return [np.random.Generator(np.random.Philox(key=100 + i)) for i in range(3)]


def _pseudo(iterations=5):
    """RBGM's draws as cgpo takes them from per-image generators: iteration i, image b, its C rows."""
    gens = _generators()
    return [torch.from_numpy(np.concatenate([g.standard_normal((2, 64), dtype=np.float32) for g in gens]))
            .reshape(3, 2, 8, 8) for _ in range(iterations)]


def test_cgpo_is_the_reference_loop_with_fresh_noise_every_iteration():
    model, unet, clf, x0, y, t, abar, noises, delta0 = _cgpo_case()
    reference = _reference_cgpo(model, clf, x0, y, t, abar, noises, _pseudo(), delta0)
    unet.zero_grad(set_to_none=True)  # the transcription leaves parameter gradients; cgpo must not
    delta = cgpo(model, clf, x0, y, t, abar, noises, delta0, _generators())
    assert all(p.grad is None for p in unet.parameters())
    torch.testing.assert_close(delta, reference, rtol=0, atol=1e-6)
    # values pinned from the transcription (float32, this tiny UNet): the classifier's loss on
    # x0_hat under the last iteration's noise, with CGPO's delta and with the initial one
    pinned = {"cgpo": 1.8584685325622559, "initial": 1.7848261594772339}
    for name, d in (("cgpo", reference), ("initial", delta0)):
        assert _x0_loss(model, clf, x0, y, t, abar, noises[-1], d) == pytest.approx(pinned[name], rel=1e-4), name


def test_cgpo_with_one_draw_repeated_is_the_old_fixed_noise_variant_and_differs():
    model, _, clf, x0, y, t, abar, noises, delta0 = _cgpo_case()
    fixed = [noises[0]] * 5
    old = cgpo(model, clf, x0, y, t, abar, fixed, delta0, _generators())
    torch.testing.assert_close(old, _reference_cgpo(model, clf, x0, y, t, abar, fixed, _pseudo(), delta0),
                               rtol=0, atol=1e-6)
    assert not torch.equal(old, cgpo(model, clf, x0, y, t, abar, noises, delta0, _generators()))
    with pytest.raises(ValueError, match="one tensor of the images' shape"):
        cgpo(model, clf, x0, y, t, abar, noises[0], delta0, _generators())  # one [B, C, H, W] tensor, not 5


def test_addt_loss_is_the_reference_transcription():
    model, _, _ = _tiny()
    gen = torch.Generator().manual_seed(2)
    x0, delta, eps_p = (torch.randn(2, 1, 8, 8, generator=gen) for _ in range(3))
    t = torch.tensor([5, 600])
    abar = torch.tensor(linear_abar()[[5, 600]], dtype=torch.float32)
    lam = torch.clamp(0.03 * abar.sqrt() / (1 - abar).sqrt(), 0, 0.3).view(-1, 1, 1, 1)
    noise = torch.sqrt(1 - lam ** 2) * eps_p + lam * delta
    x_t = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        expected = F.mse_loss(model(x_t, t), noise)
        torch.testing.assert_close(addt_loss(model, x0, t, abar, delta, eps_p), expected)
        # x0_estimate inverts the forward marginal when the model predicts the noise exactly
        torch.testing.assert_close(x0_estimate(lambda x, tt: noise, x_t, t, abar), x0, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def digits():
    from densepure_core.config import DatasetConfig, resolve_source
    from densepure_core.data.sources import enumerate_records, load_image, select_records
    from densepure_core.models import load_classifier, load_diffusion
    from densepure_core.diffusion.schedule import DiffusionSchedule

    ds = DatasetConfig(kind="digits", split="test", every=15, max_images=16)
    recs = select_records(enumerate_records(ds)[0], ds)
    x0 = torch.stack([load_image(r, ds) for r in recs]) * 2 - 1
    y = torch.tensor([r.label for r in recs])
    clf = load_classifier(resolve_source("local-dir:bundled:digits/classifier_clean")).eval().requires_grad_(False)
    dm = load_diffusion(resolve_source("bundled:digits/ddpm"))
    dm.unet.eval().requires_grad_(False)
    abar = torch.tensor(DiffusionSchedule.from_scheduler(dm.scheduler).alphas_cumprod, dtype=torch.float32)
    return x0, y, clf, (lambda x, t: dm.unet(x, t).sample), abar


def _x0_loss(model, clf, x0, y, t, abar, eps, delta):
    lam = addt_lambda(abar).view(-1, 1, 1, 1)
    a = abar.view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * ((1 - lam ** 2).sqrt() * eps + lam * delta)
    with torch.no_grad():
        return F.cross_entropy(clf(x0_estimate(model, x_t, t, abar) / 2 + 0.5), y).item()


def test_cgpo_raises_the_classifier_loss_over_a_random_delta_on_digits(digits):
    x0, y, clf, model, abar_all = digits
    t = torch.full((len(y),), 150)
    abar = abar_all[t]
    gen = torch.Generator().manual_seed(4)
    eps, delta0, random_delta = (torch.randn(x0.shape, generator=gen) for _ in range(3))
    fresh = torch.randn(5, *x0.shape, generator=gen)
    delta = cgpo(model, clf, x0, y, t, abar, fresh, delta0, np.random.Generator(np.random.Philox(key=9)))
    # scored under a noise draw that CGPO never saw
    adv, rand = _x0_loss(model, clf, x0, y, t, abar, eps, delta), _x0_loss(model, clf, x0, y, t, abar, eps, random_delta)
    print(f"\nclassifier loss on x0_hat at t=150: CGPO delta {adv:.4f}, random delta {rand:.4f}")
    assert adv > rand


def test_linf_variant_stays_in_the_ball_and_raises_the_loss(digits):
    x0, y, clf, model, abar_all = digits
    t = torch.full((len(y),), 100)
    abar = abar_all[t]
    gen = torch.Generator().manual_seed(5)
    eps, fresh = torch.randn(x0.shape, generator=gen), torch.randn(5, *x0.shape, generator=gen)
    delta = linf_perturbation(model, clf, x0, y, t, abar, fresh)
    x01 = x0 / 2 + 0.5
    assert delta.abs().max() <= 8 / 255 + 1e-6 and (x01 + delta).min() >= -1e-6 and (x01 + delta).max() <= 1 + 1e-6
    a, r = abar.view(-1, 1, 1, 1), linf_ratio(abar).view(-1, 1, 1, 1)

    def loss(d):
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * (eps + r * 2 * d)
        with torch.no_grad():
            return F.cross_entropy(clf(x0_estimate(model, x_t, t, abar) / 2 + 0.5), y).item()

    assert loss(delta) > loss(torch.zeros_like(delta))


def test_ema_decay_warm_up():
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == pytest.approx(1 - 2 ** -0.75)
    assert ema_decay(10 ** 7) == 0.9999
