"""The method seam: quantize_ dispatches on the config's type through one registry, recipes
name their method, and a new method plugs in without touching quantize_ or the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import qflow
from qflow.cli.main import main
from qflow.config import method_key_checked
from qflow.errors import ConfigError
from qflow.methods import (
    METHODS,
    Method,
    Phase,
    config_from_dict,
    config_from_json,
    config_from_yaml,
    method_of,
)


def test_qfx_is_registered_and_round_trips_with_its_method_key():
    config = qflow.QFXConfig.with_bits(4)
    assert method_of(config).name == "qfx"
    data = config.to_dict()
    assert data["method"] == "qfx"
    assert config_from_dict(data) == config
    assert config_from_json(config.to_json()) == config
    assert config_from_yaml(config.to_yaml()) == config
    assert config_from_yaml("weight: {bits: 4}\n") == qflow.QFXConfig.from_yaml(
        "weight: {bits: 4}\n")  # no method key: qfx


@pytest.mark.parametrize(("value", "words"), [
    ({"bits": 4}, ["expects a method config, got dict", "qfx (QFXConfig)"]),
    ("qfx", ["expects a method config, got str"]),
    (qflow.QuantSpec(), ["got QuantSpec"]),
])
def test_quantize_with_an_unknown_config_type_lists_the_methods(value, words):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ConfigError) as info:
        qflow.quantize_(model, value)
    for word in words:
        assert word in str(info.value)
    assert "\n" not in str(info.value)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize(("text", "words"), [
    ("method: nosuch\n", ["unknown method 'nosuch'", "qfx (QFXConfig)"]),
    ("method: 7\n", ["config.method"]),
])
def test_recipes_naming_an_unknown_method_are_refused(text, words):
    with pytest.raises(ConfigError) as info:
        config_from_yaml(text)
    for word in words:
        assert word in str(info.value)


def test_a_recipe_of_one_method_is_not_read_as_another():
    with pytest.raises(ConfigError, match="this is a qfx config, not 'other'"):
        method_key_checked({"method": "other"}, "qfx")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ToyConfig:
    """A method of its own: every Linear's weights rounded to a multiple of ``step``."""

    version: int = 1
    step: float = 0.5

    def replace_bits(self, bits=None, *, weight_bits=None, act_bits=None):
        return self

    def to_dict(self) -> dict:
        return {"method": "toy", "version": self.version, "step": self.step}

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**method_key_checked(data, "toy"))


def _toy_quantize(model, config):
    for module in model.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.round(module.weight / config.step) * config.step)
    model.qflow_config = config
    return model


def test_a_new_method_plugs_into_quantize_and_recipes(monkeypatch, tmp_path):
    toy = Method(name="toy", config_type=_ToyConfig, quantize=_toy_quantize,
                 phases=lambda config, epochs: [Phase("toy QAT", epochs)],
                 tag=lambda config: f"s{config.step}", describe=lambda config: "toy")
    monkeypatch.setitem(METHODS, "toy", toy)
    model = nn.Sequential(nn.Linear(4, 3))
    assert qflow.quantize_(model, _ToyConfig(step=0.25)) is model
    assert torch.equal(model[0].weight, torch.round(model[0].weight * 4) / 4)
    assert config_from_yaml("method: toy\nstep: 0.125\n") == _ToyConfig(step=0.125)


def test_cli_method_option_and_recipe_method_agree(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("method: qfx\nweight: {bits: 4}\n")
    code = main(["quantize", "--method", "qfx", "--recipe", str(tmp_path / "r.yaml"),
                 "--epochs", "1", "--qat-epochs", "1", "--quiet", "--out",
                 str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert config["method"] == "qfx" and info["method"] == "qfx"
    assert config["weight"]["bits"] == 4
    with pytest.raises(SystemExit) as exit_info:  # argparse: one line, exit 2
        main(["quantize", "--method", "nosuch"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
