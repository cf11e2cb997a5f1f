"""AddtConfig (densepure_core/config/addt.py): the presets load, the paper's defaults, and every
refusal names the field and the fix; the config hash ignores operational fields (steps included)."""

import pytest

from densepure_core.config.addt import AddtConfig
from densepure_core.config import ConfigError, load_config

BASE = {"diffusion": {"source": "bundled:digits/ddpm"},
        "classifier": {"source": "local-dir:bundled:digits/classifier_clean"}}


def test_presets_load_with_the_papers_optimiser():
    cfg = load_config("addt_default", model=AddtConfig)
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.grad_clip, cfg.ema_max_decay) == (2e-4, (0.95, 0.999), 1e-6,
                                                                                       1.0, 0.9999)
    assert cfg.dataset.split == "train" and cfg.variant == "gaussian" and cfg.cgpo_iterations == 5
    gpu = load_config("addt_cifar10", model=AddtConfig)
    assert gpu.batch_size == 256 and gpu.workers == 8 and gpu.checkpoint_every == 2000


def test_linf_settings_accept_fractions():
    cfg = AddtConfig.model_validate({**BASE, "variant": "linf", "linf_radius": "8/255", "linf_step": "4/255"})
    assert cfg.linf_radius == pytest.approx(8 / 255) and cfg.linf_step == pytest.approx(4 / 255)


@pytest.mark.parametrize("over, words", [
    ({"batch_size": 6, "workers": 4}, ["batch_size 6", "workers 4", "multiple"]),
    ({"precision": "fp16", "device": "cpu"}, ["fp16", "GPU"]),
    ({"betas": [0.95, 1.0]}, ["betas", "[0, 1)"]),
    ({"steps": 0}, ["steps"]),
    ({"out": "s3://key:secret@bucket/x"}, ["credentials"]),
])
def test_bad_settings_are_refused_naming_the_field(over, words):
    with pytest.raises(ConfigError) as err:
        load_config(data={**BASE, **over}, model=AddtConfig)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_operational_fields_do_not_change_the_hash_and_the_votes_do():
    a = AddtConfig.model_validate(BASE)
    assert a.config_hash() == AddtConfig.model_validate({**BASE, "steps": 5000, "workers": 2,
                                                         "checkpoint_every": 7, "out": "elsewhere"}).config_hash()
    assert a.config_hash() != AddtConfig.model_validate({**BASE, "lr": 1e-4}).config_hash()
    assert a.config_hash() != AddtConfig.model_validate({**BASE, "seed": 1}).config_hash()


def test_each_command_points_to_the_other_jobs_command(tmp_path):
    from densepure_core.config.attack import AttackConfig

    with pytest.raises(ConfigError, match="densepure train-addt --config addt_default"):
        load_config("addt_default")  # certify
    with pytest.raises(ConfigError, match="densepure train-addt --config addt_default"):
        load_config("addt_default", model=AttackConfig)
    with pytest.raises(ConfigError, match="densepure attack --config attack_default"):
        load_config("attack_default", model=AddtConfig)
    with pytest.raises(ConfigError, match="densepure certify --config default"):
        load_config("default", model=AddtConfig)


def test_dropout_and_flips_are_fields_on_in_the_cifar10_preset_and_old_hashes_stay():
    digits = load_config("addt_default", model=AddtConfig)
    assert digits.dropout is None and digits.random_flip is False  # digits are not mirror-symmetric
    assert digits.config_hash() == "0ed15eef34d5af62"  # the hash before the two fields existed
    gpu = load_config("addt_cifar10", model=AddtConfig)
    assert gpu.dropout == 0.1 and gpu.random_flip is True  # LYMDLUT/ADDT's ADDT.sh: --random_flip, dropout 0.1
    a = AddtConfig.model_validate(BASE)
    for over in ({"dropout": 0.1}, {"dropout": 0.0}, {"random_flip": True}):
        assert AddtConfig.model_validate({**BASE, **over}).config_hash() != a.config_hash(), over
    with pytest.raises(ConfigError, match="dropout"):
        load_config(data={**BASE, "dropout": 1.5}, model=AddtConfig)
