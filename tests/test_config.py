"""The deployment schema: every YAML under configs/ validates; mistakes name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardserve.config import ConfigError, DeploymentConfig, SchedulerPolicy

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = DeploymentConfig.from_yaml(path)
    assert cfg.scheduler.policy in SchedulerPolicy


@pytest.mark.parametrize(
    "data, field",
    [
        ({"cache": {"block_size": 0}}, "cache.block_size"),
        ({"scheduler": {"policy": "fastest"}}, "scheduler.policy"),
        ({"scheduler": {"max_num_tokens": -1}}, "scheduler.max_num_tokens"),
        ({"model": {"dtype": "float64"}}, "model.dtype"),
        ({"cache": {"kv_cache_free_gpu_mem_fraction": 1.5}}, "cache.kv_cache_free_gpu_mem_fraction"),
        ({"cache": {"blocksize": 16}}, "cache.blocksize"),
    ],
)
def test_mistakes_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DeploymentConfig.from_dict(data)


def test_frozen_and_yaml_errors(tmp_path: Path) -> None:
    cfg = DeploymentConfig()
    with pytest.raises(Exception, match="frozen"):
        cfg.cache.block_size = 8  # type: ignore[misc]
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        DeploymentConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        DeploymentConfig.from_yaml(tmp_path / "missing.yaml")
