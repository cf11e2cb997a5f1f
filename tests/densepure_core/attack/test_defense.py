"""Defenses: exact gradients through every reverse step (checkpointed = plain autograd, memory
flat in the steps), deterministic white-box purification, BPDA, votes and keyed noise."""

import math

import pytest
import torch
from attack_factory import tiny_defense, tiny_images

from densepure_core.attack import (AttackSpec, Defense, ThreatModel, attack_seed, majority_labels, predict,
                                   purification_noise, run_attack)
from densepure_core.diffusion.reverse import one_shot
from densepure_core.rng import REVERSE, derive_seed


def _noise(defense, n, purpose="fixed", offset=0):
    seeds = [attack_seed(0, f"img{i + offset}", purpose, 0, 0) for i in range(n)]
    return purification_noise(seeds, (3, 8, 8), defense.noise_draws)


def _input_gradient(defense, x, noise, mode):
    x = x.clone().requires_grad_(True)
    logits = defense.logits(x, noise, gradient=mode)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0][: x.shape[0]]), reduction="sum").backward()
    return x.grad


def test_exact_checkpointed_gradient_equals_plain_autograd():
    defense = tiny_defense(steps=4, t_star=120)
    x = tiny_images(4)
    noise = _noise(defense, 4)
    exact = _input_gradient(defense, x, noise, "exact")
    plain = _input_gradient(defense, x, noise, "autograd")
    assert exact.abs().sum() > 0
    torch.testing.assert_close(exact, plain, rtol=1e-5, atol=1e-8)


def _saved_images(steps, mode):
    """Bytes kept for the backward pass, in units of the input batch's size."""
    defense = tiny_defense(steps=steps, t_star=100)
    x = tiny_images(2).requires_grad_(True)
    noise = _noise(defense, 2)
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = defense.logits(x, noise, gradient=mode)
    out.sum().backward()
    return kept[0] / (x.numel() * x.element_size())


def test_exact_gradient_memory_is_flat_in_the_steps():
    """Checkpointing keeps each step's input state and noise (2 images a step) and nothing of the
    denoiser; plain autograd keeps every step's UNet activations (hundreds of images a step)."""
    exact = [_saved_images(s, "exact") for s in (2, 8)]
    plain = [_saved_images(s, "autograd") for s in (2, 8)]
    exact_per_step = (exact[1] - exact[0]) / 6
    plain_per_step = (plain[1] - plain[0]) / 6
    print(f"\nkept per reverse step (input-batch sizes): exact {exact_per_step:.2f}, autograd {plain_per_step:.1f}")
    assert exact_per_step <= 2.01
    assert plain_per_step > 50 * exact_per_step


def test_dwbox_purification_is_bit_identical_when_repeated():
    defense = tiny_defense(steps=3, t_star=100)
    x = tiny_images(3)
    first = defense.purify(x, _noise(defense, 3), gradient="none")
    again = defense.purify(x, _noise(defense, 3), gradient="none")  # the same streams, drawn again
    assert torch.equal(first, again)
    with_grad = defense.purify(x.clone().requires_grad_(True), _noise(defense, 3), gradient="exact")
    assert torch.equal(first, with_grad.detach())
    other = defense.purify(x, _noise(defense, 3, purpose="score"), gradient="none")
    assert not torch.equal(first, other)
    # a DW-box attack, run twice, gives the same example
    spec = AttackSpec("dwbox", iterations=3, eot=1)
    ids, y = ["a", "b", "c"], torch.tensor([0, 1, 2])
    a1, _ = run_attack(defense, x, y, ids, ThreatModel("linf", 8 / 255), spec, run_seed=5)
    a2, _ = run_attack(defense, x, y, ids, ThreatModel("linf", 8 / 255), spec, run_seed=5)
    assert torch.equal(a1, a2)


def test_bpda_passes_the_classifier_gradient_at_the_purified_image():
    defense = tiny_defense(steps=2, t_star=100)
    x = tiny_images(2)
    noise = _noise(defense, 2)
    bpda = _input_gradient(defense, x, noise, "bpda")
    purified = defense.purify(x, noise, gradient="none")
    bare = Defense("none", defense.classifier)
    expected = _input_gradient(bare, purified, [], "autograd")
    torch.testing.assert_close(bpda, expected)
    exact = _input_gradient(defense, x, noise, "exact")
    assert not torch.allclose(bpda, exact)


def test_one_step_purification_is_dds_one_shot_on_the_forward_marginal():
    """purify = forward diffusion x_t = sqrt(abar) (2x - 1) + sqrt(1 - abar) eps, then the chain."""
    defense = tiny_defense(steps=1, t_star=150)
    x = tiny_images(2)
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    abar = float(defense.process.schedule.alphas_cumprod[150])
    x_t = math.sqrt(abar) * (2 * x - 1) + math.sqrt(1 - abar) * eps
    expected = (one_shot(defense.process.denoiser, defense.process.schedule, x_t, 150) + 1) / 2
    torch.testing.assert_close(defense.purify(x, [eps]), expected)
    assert defense.noise_draws == 1 and defense.unet_calls == 1


def test_noise_streams_are_keyed_and_batch_independent():
    assert attack_seed(0, "img", "eot3", 1, 2) == derive_seed(0, "img", 1, 2, "attack:eot3")
    keys = {attack_seed(0, "img", p, s, k) for p in ("eot0", "eot1", "fixed", "score", "start")
            for s in range(3) for k in range(3)}
    assert len(keys) == 45
    assert attack_seed(0, "img", "fixed", 0, 0) != derive_seed(0, "img", 0, 0, REVERSE)
    seeds = [attack_seed(0, f"i{j}", "score", 0, 0) for j in range(4)]
    together = purification_noise(seeds, (3, 8, 8), 3)
    alone = purification_noise(seeds[2:3], (3, 8, 8), 3)
    assert all(torch.equal(t[2:3], a) for t, a in zip(together, alone))


def test_predictions_do_not_depend_on_the_chunking():
    defense = tiny_defense(steps=2, t_star=100, k=3)
    x = tiny_images(5)
    ids = [f"i{j}" for j in range(5)]
    big = predict(defense, x, ids, run_seed=0, purpose="score", purifications=4, max_rows=1000)
    small = predict(defense, x, ids, run_seed=0, purpose="score", purifications=4, max_rows=7)
    assert big.shape == (5, 4) and (big == small).all()


def test_majority_ties_go_to_the_earliest_vote():
    labels = torch.tensor([[2, 1, 1, 2], [0, 0, 1, 1], [3, 3, 3, 0], [1, 2, 0, 3]])
    assert majority_labels(labels, 4).tolist() == [2, 0, 3, 1]


def test_defense_refuses_inconsistent_settings():
    defense = tiny_defense(steps=2)
    with pytest.raises(ValueError, match="noise tensors"):
        defense.purify(tiny_images(1), [])
    with pytest.raises(ValueError, match="votes"):
        Defense("none", defense.classifier, votes=3)
    with pytest.raises(ValueError, match="eot must be 1"):
        AttackSpec("dwbox", eot=4)
