"""The ADDT training step (densepure_core/addt/trainer.py) in-process: keyed draws, EMA warm-up,
no CGPO gradient in the update, checkpoint state that continues the same trajectory, and the
slice-per-worker scheme that makes the global batch's gradient independent of the worker count."""

import copy

import numpy as np
import pytest
import torch
from model_factory import tiny_classifier, tiny_ddpm

from densepure_core.addt import formulas as addt
from densepure_core.config.addt import AddtConfig
from densepure_core.addt.trainer import _ID, AddtTrainer, batch_positions, step_draws
from densepure_core.models import load_classifier, load_diffusion
from densepure_core.rng import derive_seed

SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("addt-models")
    tiny_ddpm(root / "ddpm", dropout=0.1)
    tiny_classifier(root / "clf")
    return root


def make_trainer(models, **over):
    cfg = AddtConfig.model_validate({"diffusion": {"source": str(models / "ddpm")},
                                     "classifier": {"source": f"local-dir:{models / 'clf'}"},
                                     "batch_size": 4, "seed": 5, **over})
    dm = load_diffusion(str(models / "ddpm"))
    clf = load_classifier(f"local-dir:{models / 'clf'}")
    return AddtTrainer(cfg, dm.unet, dm.scheduler.alphas_cumprod, clf), cfg


DATA = torch.rand(10, *SHAPE, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1] * 5)


def run_steps(trainer, cfg, steps, examples=None):
    out = []
    for _ in range(steps):
        step = trainer.step
        examples_ = examples or range(cfg.batch_size)
        pos = batch_positions(cfg.seed, step, cfg.batch_size, len(DATA))[examples_.start:examples_.stop]
        out.append(trainer.train_step(DATA[pos], LABELS[pos], step_draws(cfg.seed, step, examples_, SHAPE, 1000)))
    return out


def test_batch_positions_cover_every_image_once_per_epoch_and_are_keyed():
    n, b = 10, 4
    seen = np.concatenate([batch_positions(7, s, b, n) for s in range(5)])  # 20 examples = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # epochs are shuffled independently
    assert np.array_equal(batch_positions(7, 3, b, n), batch_positions(7, 3, b, n))
    assert not np.array_equal(batch_positions(7, 0, b, n), batch_positions(8, 0, b, n))


def test_step_draws_of_an_example_do_not_depend_on_the_slice_it_is_in():
    whole = step_draws(1, 4, range(6), SHAPE, 1000)
    halves = [step_draws(1, 4, range(0, 3), SHAPE, 1000), step_draws(1, 4, range(3, 6), SHAPE, 1000)]
    for name in ("t", "delta0", "eps_prime", "flip"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves]))
    # CGPO's noise: [iterations, examples, ...], a fresh draw per iteration, keyed per example
    assert whole.eps.shape == (5, 6, *SHAPE)
    assert torch.equal(whole.eps, torch.cat([h.eps for h in halves], dim=1))
    assert all(not torch.equal(whole.eps[i], whole.eps[j]) for i in range(5) for j in range(i))
    assert torch.equal(step_draws(1, 4, range(6), SHAPE, 1000, iterations=2).eps, whole.eps[:2])
    assert 0 < int(whole.flip.sum()) < 6 or len(set(step_draws(1, s, range(6), SHAPE, 1000).flip.tolist()
                                                    for s in range(4))) > 1
    g = torch.randn(6, *SHAPE)
    assert torch.equal(addt.rbgm(g, whole.rbgm), torch.cat([addt.rbgm(g[:3], halves[0].rbgm),
                                                            addt.rbgm(g[3:], halves[1].rbgm)]))
    other_step = step_draws(1, 5, range(6), SHAPE, 1000)
    assert not torch.equal(whole.eps, other_step.eps)
    assert not torch.equal(whole.eps[0], whole.delta0) and not torch.equal(whole.eps[0], whole.eps_prime)


def test_ema_decay_follows_the_papers_warm_up(models):
    trainer, cfg = make_trainer(models)
    decays = [m["ema_decay"] for m in run_steps(trainer, cfg, 4)]
    assert decays == pytest.approx([addt.ema_decay(s) for s in range(4)], abs=1e-12)
    assert decays[0] == 0.0 and decays[1] == pytest.approx(1 - 2 ** -0.75)
    # the EMA after one step (decay 0) is the model itself
    trainer2, _ = make_trainer(models)
    run_steps(trainer2, cfg, 1)
    ema = trainer2.ema_unet()
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), trainer2.unet.parameters()))


def test_the_update_uses_the_loss_gradient_only_not_cgpos(models):
    trainer, cfg = make_trainer(models, grad_clip=None)
    reference = copy.deepcopy(trainer.unet)
    pos = batch_positions(cfg.seed, 0, 4, len(DATA))
    draws = step_draws(cfg.seed, 0, range(4), SHAPE, 1000)
    trainer.train_step(DATA[pos], LABELS[pos], draws)
    # the same step by hand: CGPO's delta, then the gradient of the loss alone
    x0, y, t = DATA[pos] * 2 - 1, LABELS[pos], draws.t
    abar = trainer.abar[t]
    eps_model = lambda x, tt: reference(x, tt).sample  # noqa: E731
    torch.manual_seed(derive_seed(cfg.seed, _ID, 0, 0, "addt:dropout"))  # the dropout stream, as the trainer
    fresh = step_draws(cfg.seed, 0, range(4), SHAPE, 1000)
    delta = addt.cgpo(eps_model, trainer.classifier, x0, y, t, abar, fresh.eps, fresh.delta0, fresh.rbgm)
    reference.zero_grad(set_to_none=True)
    addt.addt_loss(eps_model, x0, t, abar, delta, fresh.eps_prime).backward()
    for (name, p), q in zip(trainer.unet.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_resumed_trainer_continues_the_same_trajectory(models, tmp_path):
    straight, cfg = make_trainer(models)
    run_steps(straight, cfg, 4)
    first, _ = make_trainer(models)
    run_steps(first, cfg, 2)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed, _ = make_trainer(models)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.step == 2
    run_steps(resumed, cfg, 2)
    for a, b in zip(straight.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)


def test_two_equal_slices_average_to_the_full_batch_gradient(models):
    """What DDP computes on 2 workers (the mean of the slices' mean-loss gradients) is the
    gradient of the whole batch, because every example's draws are keyed, not positional."""
    full, cfg = make_trainer(models, grad_clip=None, lr=1e-12, ema_max_decay=0.0)
    full.unet.eval()  # no dropout: its masks are per worker by design
    run_steps(full, cfg, 1)
    grads = [p.grad.clone() for p in full.unet.parameters()]
    halves = []
    for part in (range(0, 2), range(2, 4)):
        t, c = make_trainer(models, grad_clip=None, lr=1e-12, ema_max_decay=0.0)
        t.unet.eval()
        run_steps(t, c, 1, examples=part)
        halves.append([p.grad.clone() for p in t.unet.parameters()])
    for g, a, b in zip(grads, *halves):
        torch.testing.assert_close(g, (a + b) / 2, rtol=1e-4, atol=1e-7)


def test_the_linf_variant_trains_with_its_own_mixing_weight(models):
    trainer, cfg = make_trainer(models, variant="linf", linf_radius="8/255", linf_step="4/255")
    before = [p.clone() for p in trainer.unet.parameters()]
    (m,) = run_steps(trainer, cfg, 1)
    t = step_draws(cfg.seed, 0, range(4), SHAPE, 1000).t
    assert m["mix_mean"] == pytest.approx(float(addt.linf_ratio(trainer.abar[t]).mean()))
    assert np.isfinite(m["loss"]) and any(not torch.equal(a, b) for a, b in zip(before, trainer.unet.parameters()))


def test_bf16_autocast_runs_on_cpu_and_stays_close_to_fp32(models):
    """Mixed precision is for GPUs (bf16 or fp16 with a gradient scaler); bf16 autocast also runs
    on a CPU, which checks the wiring: the first step's loss is within bf16's precision of fp32's."""
    fp32, cfg = make_trainer(models)
    bf16, cfg16 = make_trainer(models, precision="bf16")
    (a,) = run_steps(fp32, cfg, 1)
    (b,) = run_steps(bf16, cfg16, 1)
    assert b["loss"] == pytest.approx(a["loss"], rel=0.05) and b["loss"] != a["loss"]


def test_dropout_is_forced_on_the_unet_and_flips_are_keyed_per_example(models):
    plain, _ = make_trainer(models)
    assert {m.p for m in plain.unet.modules() if isinstance(m, torch.nn.Dropout)} == {0.0, 0.1}  # the model's own
    forced, cfg = make_trainer(models, dropout=0.3)
    assert {m.p for m in forced.unet.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    # flips: the same step with random_flip equals the step without it on the pre-flipped images
    draws = step_draws(cfg.seed, 0, range(4), SHAPE, 1000)
    pos = batch_positions(cfg.seed, 0, 4, len(DATA))
    assert 0 < int(draws.flip.sum()) < 4  # this seed flips some examples and keeps others
    flipped = torch.where(draws.flip.view(-1, 1, 1, 1), DATA[pos].flip(-1), DATA[pos])
    a, _ = make_trainer(models, random_flip=True)
    b, _ = make_trainer(models)
    ma = a.train_step(DATA[pos], LABELS[pos], draws)
    mb = b.train_step(flipped, LABELS[pos], step_draws(cfg.seed, 0, range(4), SHAPE, 1000))  # RBGM's generators: fresh
    assert ma["loss"] == mb["loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))


def test_the_draws_must_match_the_configs_iterations(models):
    trainer, cfg = make_trainer(models, cgpo_iterations=3)
    pos = batch_positions(cfg.seed, 0, 4, len(DATA))
    with pytest.raises(ValueError, match="cgpo_iterations is 3"):
        trainer.train_step(DATA[pos], LABELS[pos], step_draws(cfg.seed, 0, range(4), SHAPE, 1000))
    m = trainer.train_step(DATA[pos], LABELS[pos], step_draws(cfg.seed, 0, range(4), SHAPE, 1000, iterations=3))
    assert np.isfinite(m["loss"])
