"""_start_local_ray writes a private Ray constant only on the Ray version it was verified on."""

import pytest

ray = pytest.importorskip("ray")
from ray._private import ray_constants  # noqa: E402

from tasks.common.raypool import _start_local_ray  # noqa: E402


class Reached(Exception):
    pass


@pytest.fixture
def no_init(monkeypatch, tmp_path):
    """ray.init replaced: the test sees whether the start got past the version check."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)

    def init(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(ray, "init", init)


@pytest.mark.parametrize("version", ["2.61.0", "2.59.1", "3.0.0.dev0", "2.6.0"])
def test_other_ray_versions_are_refused_with_what_to_do(version, monkeypatch, no_init):
    monkeypatch.setattr(ray, "__version__", version)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with pytest.raises(RuntimeError) as info:
        _start_local_ray(num_cpus=1)
    message = str(info.value)
    assert f"Ray {version} is installed" in message and "2.60.x" in message
    assert "--ray-address" in message and "requirements/lock.txt" in message
    assert ray_constants.ENABLE_RAY_CLUSTER == before  # nothing written


@pytest.mark.parametrize("version", ["2.60.0", "2.60.3"])
def test_the_verified_version_sets_the_constant_and_starts(version, monkeypatch, no_init):
    monkeypatch.setattr(ray, "__version__", version)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    with pytest.raises(Reached):
        _start_local_ray(num_cpus=1)
    assert ray_constants.ENABLE_RAY_CLUSTER is False


def test_a_missing_constant_is_refused(monkeypatch, no_init):
    monkeypatch.setattr(ray, "__version__", "2.60.0")
    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    with pytest.raises(RuntimeError, match="ENABLE_RAY_CLUSTER"):
        _start_local_ray(num_cpus=1)
