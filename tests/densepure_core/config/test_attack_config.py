"""The attack configuration: presets, derived names, partitions, validation messages, the hash."""

import pytest

from densepure_core.config.attack import AttackConfig, parse_eps
from densepure_core.config import ConfigError, load_config, unclassified_fields


def _data(**over):
    data = {
        "job": "attack",
        "diffusion": {"source": "bundled:digits/ddpm"},
        "classifier": {"source": "local-dir:bundled:digits/classifier_clean"},
        "defenses": [{"kind": "none"}, {"kind": "purify", "t_fraction": 0.1, "steps": 4, "k": 3}],
        "threats": [{"norm": "linf", "eps": "8/255"}, {"norm": "l2", "eps": 0.5}],
        "attacks": [{"kind": "pgd_eot", "eot": 4}, {"kind": "dwbox"}, {"kind": "bpda"}],
    }
    data.update(over)
    return data


@pytest.mark.parametrize("name", ["attack_default", "attack_cifar10", "attack_imagenet"])
def test_packaged_presets_validate(name):
    cfg = load_config(name, model=AttackConfig)
    assert cfg.job == "attack" and cfg.partitions()
    assert len(cfg.config_hash()) == 16


def test_labels_partitions_and_defaults():
    cfg = AttackConfig.model_validate(_data())
    assert [d.label for d in cfg.defenses] == ["none", "purify-t0.1-s4-k3"]
    assert [t.label for t in cfg.threats] == ["linf-8", "l2-0.5"]
    assert cfg.threats[0].eps == pytest.approx(8 / 255)
    # the bare classifier is attacked by pgd_eot only: dwbox and bpda attack the purifier
    assert cfg.partitions() == [("none", "linf-8", "pgd_eot"), ("none", "l2-0.5", "pgd_eot")] + [
        ("purify-t0.1-s4-k3", t, a) for t in ("linf-8", "l2-0.5") for a in ("pgd_eot", "dwbox", "bpda")]
    assert [a.eot_samples for a in cfg.attacks] == [4, 1, 10]
    assert cfg.score_purifications == 10
    assert not unclassified_fields(AttackConfig)


def test_the_hash_follows_the_rows_not_the_operations():
    base = AttackConfig.model_validate(_data())
    assert AttackConfig.model_validate(_data(batch_size=7, workers=3, out="x")).config_hash() == base.config_hash()
    assert AttackConfig.model_validate(_data(score_purifications=20)).config_hash() != base.config_hash()
    assert AttackConfig.model_validate(_data(seed=1)).config_hash() != base.config_hash()


@pytest.mark.parametrize("over,message", [
    ({"defenses": [{"kind": "purify", "steps": 4}]}, "exactly one of sigma"),
    ({"defenses": [{"kind": "purify", "sigma": 0.25, "t_fraction": 0.1}]}, "exactly one of sigma"),
    ({"defenses": [{"kind": "none", "k": 3}]}, "bare classifier"),
    ({"defenses": [{"kind": "purify", "sigma": 0.25, "t_fraction_of": "vp_sde"}]}, "has no t_fraction"),
    ({"defenses": [{"kind": "purify", "t_fraction": 0.1, "t_fraction_of": "sde"}]}, "t_fraction_of"),
    ({"defenses": [{"kind": "purify", "sigma": 0.25, "reverse": "one_shot", "steps": 4}]}, "one denoiser call"),
    ({"attacks": [{"kind": "dwbox", "eot": 4}]}, "eot must be 1"),
    ({"threats": [{"norm": "linf", "eps": "8/zero"}]}, "fraction"),
    ({"threats": [{"norm": "linf", "eps": 0}]}, "eps must be a finite number > 0"),
    ({"defenses": [{"kind": "none"}], "attacks": [{"kind": "bpda"}]}, "no \\(defense, threat, attack\\)"),
    ({"diffusion": None}, "diffusion.source is required"),
    ({"iterate_purifications": 16}, "any_iterate: true"),
    ({"threats": [{"norm": "linf", "eps": 0.1}, {"norm": "linf", "eps": 0.1}]}, "distinct names"),
])
def test_bad_settings_are_refused_naming_the_field(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data=_data(**over), model=AttackConfig)


def test_parse_eps():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(0.5) == 0.5
    assert parse_eps(" 4 / 255 ") == pytest.approx(4 / 255)
    assert parse_eps("0.5/1") == 0.5 and parse_eps("1.5/3") == 0.5  # decimal numerators and denominators
    with pytest.raises(ValueError, match="step_size '4/zero'"):
        parse_eps("4/zero", "step_size")


def test_an_linf_eps_beyond_the_pixel_range_asks_for_over_255():
    """eps: 8 for L_inf (the /255 forgotten) used to run for minutes as threat linf-2040."""
    with pytest.raises(ConfigError, match=r"threats\.0: .*eps 8 for linf covers the whole \[0, 1\] pixel "
                                          r"range .*eps: 8/255"):
        load_config(data=_data(threats=[{"norm": "linf", "eps": 8}]), model=AttackConfig)
    assert load_config(data=_data(threats=[{"norm": "l2", "eps": 8}]), model=AttackConfig).threats[0].eps == 8
    assert load_config(data=_data(threats=[{"norm": "linf", "eps": "8/255"}]),
                       model=AttackConfig).threats[0].eps == pytest.approx(8 / 255)


def test_the_addt_fraction_fields_are_named_in_errors():
    from densepure_core.config.addt import AddtConfig

    with pytest.raises(ConfigError, match="linf_step '2/x'"):
        load_config("addt_default", ["variant=linf", "linf_step=2/x"], model=AddtConfig)


def test_the_any_iterate_protocol_is_off_by_default_and_changes_the_hash_when_on():
    base = AttackConfig.model_validate(_data())
    assert not base.any_iterate and base.iterate_purifications == 32  # DiffBreak's default M'
    on = AttackConfig.model_validate(_data(any_iterate=True))
    assert on.config_hash() != base.config_hash()
    assert AttackConfig.model_validate(_data(any_iterate=True, iterate_purifications=8)).config_hash() != \
        on.config_hash()
    assert "any_iterate" not in base.vote_fields() and "iterate_purifications" not in base.vote_fields()
