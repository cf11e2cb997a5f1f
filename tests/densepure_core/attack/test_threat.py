"""Threat models and PGD's moves: pinned against a transcription of torchattacks' PGD and PGDL2."""

import pytest
import torch
import torch.nn.functional as F
from attack_factory import tiny_images, tiny_models

from densepure_core.attack import AttackSpec, Defense, ThreatModel, perturbation_norms, run_attack


def torchattacks_pgd(model, images, labels, eps, alpha, steps):
    """torchattacks 3.5.1 ``PGD.forward`` with ``random_start=False``, transcribed (the library
    itself cannot be installed next to this stack: it pins requests~=2.25)."""
    images = images.clone().detach()
    adv_images = images.clone().detach()
    for _ in range(steps):
        adv_images.requires_grad = True
        cost = F.cross_entropy(model(adv_images), labels)
        grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
        adv_images = adv_images.detach() + alpha * grad.sign()
        delta = torch.clamp(adv_images - images, min=-eps, max=eps)
        adv_images = torch.clamp(images + delta, min=0, max=1).detach()
    return adv_images


def torchattacks_pgdl2(model, images, labels, eps, alpha, steps, eps_for_division=1e-10):
    """torchattacks 3.5.1 ``PGDL2.forward`` with ``random_start=False``, transcribed."""
    images = images.clone().detach()
    adv_images = images.clone().detach()
    batch_size = len(images)
    for _ in range(steps):
        adv_images.requires_grad = True
        cost = F.cross_entropy(model(adv_images), labels)
        grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
        grad_norms = torch.norm(grad.view(batch_size, -1), p=2, dim=1) + eps_for_division
        grad = grad / grad_norms.view(batch_size, 1, 1, 1)
        adv_images = adv_images.detach() + alpha * grad
        delta = adv_images - images
        delta_norms = torch.norm(delta.view(batch_size, -1), p=2, dim=1)
        factor = eps / delta_norms
        factor = torch.min(factor, torch.ones_like(delta_norms))
        delta = delta * factor.view(-1, 1, 1, 1)
        adv_images = torch.clamp(images + delta, min=0, max=1).detach()
    return adv_images


@pytest.fixture(scope="module")
def bare():
    _, _, clf = tiny_models()
    return Defense("none", clf)


def test_linf_pgd_equals_torchattacks(bare):
    x, y = tiny_images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    ours, stats = run_attack(bare, x, y, [str(i) for i in range(6)], ThreatModel("linf", 8 / 255),
                             AttackSpec("pgd_eot", iterations=7, random_start=False, step_size=2 / 255), run_seed=0)
    ref = torchattacks_pgd(bare.classifier, x, y, 8 / 255, 2 / 255, 7)
    assert torch.equal(ours, ref)  # the mean vs sum of the loss does not change a sign
    assert stats.gradient_calls == 7 and stats.unet_calls == 0


def test_l2_pgd_equals_torchattacks(bare):
    x, y = tiny_images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    ours, _ = run_attack(bare, x, y, [str(i) for i in range(6)], ThreatModel("l2", 0.5),
                         AttackSpec("pgd_eot", iterations=7, random_start=False), run_seed=0)
    ref = torchattacks_pgdl2(bare.classifier, x, y, 0.5, 0.1, 7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ours.sub(x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_projection_and_random_start_stay_in_the_ball(norm, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    threat = ThreatModel(norm, eps)
    far = x + torch.randn(16, 3, 8, 8, generator=g)
    for x_adv in (threat.project(far, x),
                  threat.random_start(x, torch.rand(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g))):
        linf, l2 = perturbation_norms(x_adv, x)
        assert (x_adv >= 0).all() and (x_adv <= 1).all()
        assert ((linf if norm == "linf" else l2) <= eps + 1e-6).all()
    # a point already inside stays put
    inside = threat.project(x + 0.1 * (threat.project(far, x) - x), x)
    torch.testing.assert_close(threat.project(inside, x), inside)


def test_threat_model_refuses_bad_settings():
    with pytest.raises(ValueError, match="norm"):
        ThreatModel("l1", 0.5)
    with pytest.raises(ValueError, match="eps"):
        ThreatModel("linf", 0.0)
    assert ThreatModel("linf", 8 / 255).default_step_size() == pytest.approx(2 / 255)
    assert ThreatModel("l2", 0.5).default_step_size() == pytest.approx(0.1)
