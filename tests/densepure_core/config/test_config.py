"""The typed config: validation messages name the field; overrides; hashing; presets load."""

from pathlib import Path

import pytest

from densepure_core.config import (
    ASSETS_DIR,
    CertifyConfig,
    ClassifierConfig,
    ConfigError,
    DatasetConfig,
    DiffusionConfig,
    PACKAGED_CONFIGS,
    MethodConfig,
    apply_overrides,
    determines_votes,
    load_config,
    resolve_source,
    unclassified_fields,
    AdaptiveConfig,
)
from densepure_core.rng import STREAM_VERSION

CONFIGS = Path(str(PACKAGED_CONFIGS))  # package data (densepure_core/config/presets)


def base(**over):
    data = {
        "classifier": {"source": "local-dir:/models/clf"},
        "diffusion": {"source": "/models/ddpm"},
        "methods": [{"kind": "rs"}, {"kind": "dds"}, {"kind": "densepure", "k": 5, "steps": 2}],
        "sigmas": [0.25, 0.5],
    }
    data.update(over)
    return data


def test_valid_config_and_method_labels():
    cfg = load_config(data=base())
    assert [m.label for m in cfg.methods] == ["rs", "dds", "densepure-k5-s2"]
    assert cfg.n0 == 100 and cfg.alpha == 0.001


@pytest.mark.parametrize("override, field", [
    ("sigmas=[0.0]", "sigmas"),
    ("sigmas=[-0.5]", "sigmas"),
    ("alpha=0", "alpha"),
    ("alpha=1.0", "alpha"),
    ("n0=0", "n0"),
    ("n=0", "n"),
    ("methods.2.k=0", "methods.2.k"),
    ("methods.2.steps=0", "methods.2.steps"),
    ("batch_size=0", "batch_size"),
    ("device=tpu", "device"),
    ("precision=fp8", "precision"),
    ("methods.0.k=3", "methods.0"),
    ("nonsense=1", "nonsense"),
])
def test_invalid_values_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(data=base(), overrides=[override])
    msg = str(info.value)  # a field the override set is reported against --set, others by their place
    assert (f"  --set {field}:" in msg) == (override.split("=")[0] == field) and f" {field}:" in msg, msg


def test_diffusion_required_for_dds():
    data = base()
    data.pop("diffusion")
    with pytest.raises(ConfigError, match="diffusion.source is required"):
        load_config(data=data)
    load_config(data=data, overrides=["methods=[{kind: rs}]"])  # RS alone needs none


def test_duplicate_method_names_refused():
    with pytest.raises(ConfigError, match="distinct names"):
        load_config(data=base(methods=[{"kind": "dds"}, {"kind": "dds"}]))


def test_overrides_dotted_and_yaml_values():
    data = apply_overrides(base(), ["n=500", "methods.2.k=10", "sigmas=[1.0]", "dataset.max_images=7"])
    cfg = CertifyConfig.model_validate(data)
    assert cfg.n == 500 and cfg.methods[2].k == 10 and cfg.sigmas == [1.0]
    assert cfg.dataset.max_images == 7
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(base(), ["n500"])


def test_config_hash_covers_votes_only():
    a = load_config(data=base())
    assert a.config_hash() == load_config(data=base(), overrides=["alpha=0.01", "batch_size=7", "out=x"]).config_hash()
    assert a.config_hash() != load_config(data=base(), overrides=["n=999"]).config_hash()
    assert a.config_hash() != load_config(data=base(), overrides=["seed=1"]).config_hash()
    assert len(a.config_hash()) == 16
    assert a.config_hash() != load_config(data=base(), overrides=["noise_device=device"]).config_hash()
    assert a.vote_fields()["noise_device"] == "cpu"  # always part of the hash, no special case
    assert a.vote_fields()["stream_version"] == STREAM_VERSION


def test_every_config_field_declares_whether_it_determines_votes():
    """A new field must be declared votes(...) or operational(...), here and in nested models."""
    assert unclassified_fields(CertifyConfig) == []
    for model in (DatasetConfig, DiffusionConfig, ClassifierConfig, MethodConfig):
        assert unclassified_fields(model) == [], model
    # the check sees through Optional and list[...] to the nested models
    assert "methods.classifier.source" not in unclassified_fields(CertifyConfig)

    class Extra(CertifyConfig):
        forgotten: int = 0
        dataset: Undeclared = Undeclared()

    assert sorted(unclassified_fields(Extra)) == ["dataset", "dataset.x", "forgotten"]


class Undeclared(DatasetConfig):
    x: int = 0


def test_vote_classification_is_the_documented_one():
    declared = {name for name in CertifyConfig.model_fields if determines_votes(CertifyConfig, name)}
    adaptive = {"sampling", "n_max", "adaptive"}
    assert declared == {"dataset", "diffusion", "classifier", "methods", "sigmas", "n0", "n", "seed",
                        "precision", "t_star_rule", "shard_size", "noise_device"} | adaptive
    for model in (DatasetConfig, DiffusionConfig, ClassifierConfig, MethodConfig, AdaptiveConfig):
        assert all(determines_votes(model, name) for name in model.model_fields), model
    cfg = load_config(data=base())
    # sampling: fixed leaves the adaptive fields out of the payload (they change no vote)
    assert set(cfg.vote_fields()) == (declared - adaptive) | {"stream_version"}
    ada = load_config(data=base(), overrides=["sampling=adaptive"])
    assert set(ada.vote_fields()) == declared | {"stream_version"}
    # nested models contribute their votes fields, as JSON values
    assert cfg.vote_fields()["methods"][2] == {"kind": "densepure", "name": None, "k": 5, "steps": 2,
                                              "classifier": None}


@pytest.mark.parametrize("override", [
    "alpha=0.01", "radii=[0.0,1.0]", "batch_size=3", "workers=2", "device=cpu", "out=elsewhere",
    "run_name=other", "prefetch=0", "early_exit=false", "pad_batches=true", "channels_last=true",
    "compile=true", "cuda_graphs=true", "allow_pickle=true", "on_bad_input=quarantine",
])
def test_operational_fields_keep_the_hash(override):
    assert load_config(data=base(), overrides=[override]).config_hash() == load_config(data=base()).config_hash()


@pytest.mark.parametrize("override", [
    "n0=50", "n=500", "seed=3", "sigmas=[0.25]", "precision=bf16", "t_star_rule=first_at_or_above",
    "shard_size=4", "noise_device=device", "dataset.every=2", "diffusion.source=/other",
    "classifier.input_size=32", "methods.2.k=3", "methods.0.name=plain",
])
def test_vote_fields_change_the_hash(override):
    assert load_config(data=base(), overrides=[override]).config_hash() != load_config(data=base()).config_hash()


def test_stream_version_is_in_the_hash_and_version_1_is_the_old_payload():
    cfg = load_config(data=base())
    assert cfg.config_hash() == cfg.config_hash(stream_version=STREAM_VERSION)
    assert cfg.config_hash(stream_version=1) != cfg.config_hash()
    # hashes written by the code before the stream version existed (pinned from that code)
    assert cfg.config_hash(stream_version=1) == "3be7b3315c5652d6"
    device = load_config(data=base(), overrides=["noise_device=device"])
    assert device.config_hash(stream_version=1) == "8558b7c1f167a306"


def test_fixed_hashes_are_pinned_and_ignore_the_adaptive_fields():
    """Hashes of sampling: fixed runs are those of the code before adaptive sampling existed."""
    pinned = {(): "9c71dc4d510902af", ("noise_device=device",): "0c0f7957d034a4ce",
              ("n=999",): "4959e14541ac8c33"}
    for overrides, digest in pinned.items():
        assert load_config(data=base(), overrides=list(overrides)).config_hash() == digest
    same = ["n_max=5", "adaptive.bound=betabin", "adaptive.alpha=0.01", "sampling=fixed"]
    assert load_config(data=base(), overrides=same).config_hash() == "9c71dc4d510902af"


def test_adaptive_hash_covers_the_stopping_rule():
    ada = ["sampling=adaptive"]
    h = load_config(data=base(), overrides=ada).config_hash()
    assert h != load_config(data=base()).config_hash()
    # the rule's alpha and grid default to the run's and decide where images stop
    assert h != load_config(data=base(), overrides=ada + ["alpha=0.01"]).config_hash()
    assert h != load_config(data=base(), overrides=ada + ["radii=[0.0,1.0]"]).config_hash()
    assert h == load_config(data=base(), overrides=ada + ["alpha=0.01", "adaptive.alpha=0.001"]).config_hash()
    # n_max defaults to n: spelling it out is the same run
    assert h == load_config(data=base(), overrides=ada + ["n_max=10000"]).config_hash()
    for other in ["n_max=500", "adaptive.bound=betabin", "adaptive.bound=staged", "adaptive.bound=onesided",
                  "adaptive.batch=50", "adaptive.stop=false", "adaptive.split=late", "adaptive.ratio=2",
                  "adaptive.final=0.5", "adaptive.futility=0", "adaptive.futility=0.05", "adaptive.a=1"]:
        assert h != load_config(data=base(), overrides=ada + [other]).config_hash(), other
    assert h == load_config(data=base(), overrides=ada + ["batch_size=3"]).config_hash()
    # the default rule: the hybrid bound (a look every batch) with futility
    cfg = load_config(data=base(), overrides=ada + ["n_max=1000", "adaptive.batch=100"])
    assert cfg.budget == 1000 and cfg.adaptive.schedule(1000) == (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)
    assert cfg.adaptive.bound_params(1000) == {"a": 0.5, "b": 0.5, "final": 0.75, "n_max": 1000}
    assert cfg.adaptive.futility == 0.1
    staged = load_config(data=base(), overrides=ada + ["n_max=1000", "adaptive.bound=staged"])
    assert staged.adaptive.schedule(1000) == (100, 200, 300, 500, 800, 1000)
    assert staged.adaptive.bound_params(1000) == {"looks": [100, 200, 300, 500, 800, 1000], "split": "equal"}
    with pytest.raises(ConfigError, match="adaptive.radii"):
        load_config(data=base(), overrides=ada + ["adaptive.radii=[1.0,0.5]"])


@pytest.mark.parametrize("override,field,fix", [
    ("adaptive.a=2", "adaptive", "<= 1"),  # the one-sided mixtures need a, b <= 1: says so and the fix
    ("adaptive.final=1", "adaptive.final", "less than 1"),
    ("adaptive.futility=1.5", "adaptive.futility", "less than 1"),
    ("adaptive.futility=-0.1", "adaptive.futility", "greater than or equal to 0"),
    ("adaptive.bound=robbins", "adaptive.bound", "hybrid"),
])
def test_bad_adaptive_settings_name_the_field(override, field, fix):
    with pytest.raises(ConfigError) as err:
        load_config(data=base(), overrides=["sampling=adaptive", override])
    assert field in str(err.value) and fix in str(err.value)
    if override == "adaptive.a=2":
        assert "use the default 0.5" in str(err.value)
        # a larger prior is fine for the two-sided mixture
        assert load_config(data=base(), overrides=["sampling=adaptive", "adaptive.bound=betabin", override])


def test_sigma_template_and_bundled_sources():
    cfg = load_config(data=base(methods=[{"kind": "rs", "classifier": {"source": "bundled:digits/clf_{sigma}"}}]))
    clf = cfg.classifier_for(cfg.methods[0], 1.0)
    assert clf.source == "bundled:digits/clf_1.0"
    assert resolve_source("local-dir:bundled:digits/x") == f"local-dir:{ASSETS_DIR / 'digits/x'}"
    assert resolve_source("org/model") == "org/model"


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(data=base())
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("n: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("attack_", "addt_"))),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)  # attack_* and addt_* presets: test_attack_config.py, test_addt_config.py
    assert cfg.methods and cfg.sigmas


def test_a_config_of_the_other_job_names_the_command_that_runs_it():
    from densepure_core.config.attack import AttackConfig

    with pytest.raises(ConfigError, match="densepure attack --config"):
        load_config("attack_default")
    with pytest.raises(ConfigError, match="densepure certify --config"):
        load_config("default", model=AttackConfig)


@pytest.mark.parametrize("override", ["out=s3://AKIA:SECRET@bucket/x", "diffusion.source=https://u:p@host/m",
                                      "classifier.source=s3://k:s@b/clf"])
def test_credentials_in_uris_are_refused(override):
    with pytest.raises(ConfigError, match="credentials must not be embedded") as info:
        load_config(data=base(), overrides=[override])
    assert "SECRET" not in str(info.value) and ":p@" not in str(info.value) and "k:s@" not in str(info.value)


def test_bad_input_policy():
    assert load_config(data=base()).on_bad_input == "fail"
    assert load_config(data=base(), overrides=["on_bad_input=quarantine"]).on_bad_input == "quarantine"
    with pytest.raises(ConfigError, match="on_bad_input"):
        load_config(data=base(), overrides=["on_bad_input=ignore"])


@pytest.mark.parametrize("override,message", [
    ("methods.2.steps=1", "steps: 1 is one deterministic denoiser call"),
    ("sigmas=[.inf]", "finite number > 0"),
    ("sigmas=[.nan]", "finite number > 0"),
])
def test_settings_that_used_to_fail_after_ray_started_are_refused_in_the_config(override, message):
    """Issue 17, item 5: DensePure with steps 1 and k > 1, and an infinite sigma."""
    with pytest.raises(ConfigError, match=message):
        load_config(data=base(), overrides=[override])
