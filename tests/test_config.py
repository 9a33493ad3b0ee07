"""QFXConfig, QuantSpec, SpecOverride, LayerOverride: defaults, round trips, overrides,
rejections (ConfigError naming the key path) and immutability."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qflow.config import LayerOverride, QFXConfig, QuantSpec, SpecOverride
from qflow.errors import ConfigError, QflowError
from qflow.numerics import Overflow, Rounding

# -- defaults ------------------------------------------------------------------------


def test_quantspec_defaults():
    spec = QuantSpec()
    assert spec.bits == 8
    assert spec.signed is None
    assert spec.integer_bits is None
    assert spec.rounding is Rounding.RND_CONV
    assert spec.overflow is Overflow.SAT
    assert spec.per_channel is False
    assert spec.trainable is True
    assert spec.khot == 0


def test_qfxconfig_defaults():
    cfg = QFXConfig()
    assert cfg.version == 1
    assert cfg.input == QuantSpec(bits=8, trainable=False)  # calibrated from the data
    assert cfg.weight == QuantSpec(bits=8, signed=True, per_channel=True)
    assert cfg.bias == QuantSpec(bits=16, signed=True)
    assert cfg.activation == QuantSpec(bits=8)
    assert cfg.intermediate == QuantSpec(bits=16, signed=True)
    assert cfg.norm_scale == QuantSpec(bits=12, signed=True, per_channel=True)
    assert cfg.fold_batchnorm is False
    assert cfg.overrides == ()
    # An empty YAML document and an empty mapping are the defaults too.
    assert QFXConfig.from_yaml("") == cfg
    assert QFXConfig.from_dict({}) == cfg
    assert QFXConfig.from_json("{}") == cfg


def test_with_bits_changes_weight_activation_and_input_only():
    cfg = QFXConfig.with_bits(4)
    assert (cfg.weight.bits, cfg.activation.bits, cfg.input.bits) == (4, 4, 4)
    assert (cfg.bias.bits, cfg.intermediate.bits, cfg.norm_scale.bits) == (16, 16, 12)
    # the other fields of the replaced specs are kept
    assert cfg.weight.per_channel is True and cfg.weight.signed is True
    mixed = QFXConfig.with_bits(weight_bits=3, act_bits=6)
    assert (mixed.weight.bits, mixed.activation.bits, mixed.input.bits) == (3, 6, 6)
    assert QFXConfig().replace_bits() == QFXConfig()


def test_mode_names_accept_ap_prefix_and_any_case():
    spec = QuantSpec(rounding="ap_rnd_zero", overflow="AP_WRAP")
    assert spec.rounding is Rounding.RND_ZERO and spec.overflow is Overflow.WRAP
    cfg = QFXConfig.from_dict({"weight": {"rounding": "trn", "overflow": "sat_sym"}})
    assert cfg.weight.rounding is Rounding.TRN and cfg.weight.overflow is Overflow.SAT_SYM


# -- round trips -----------------------------------------------------------------------


def _rich_config() -> QFXConfig:
    return QFXConfig(
        weight=QuantSpec(bits=6, signed=True, integer_bits=-1, rounding="TRN",
                         overflow="WRAP", per_channel=True, trainable=False, khot=2),
        activation=QuantSpec(bits=5, signed=False, rounding="RND_INF", overflow="SAT_ZERO"),
        fold_batchnorm=True,
        overrides=(
            LayerOverride(pattern="fc1", weight=SpecOverride(bits=4)),
            LayerOverride(pattern=r"block\d+\.conv[12]",
                          activation=SpecOverride(rounding="RND_MIN_INF", overflow="SAT_SYM"),
                          bias=SpecOverride(bits=24, signed=True)),
            LayerOverride(pattern="fc.*", input=SpecOverride(integer_bits=3),
                          norm_scale=SpecOverride(per_channel=False),
                          intermediate=SpecOverride(trainable=False, khot=1)),
        ),
    )


def test_json_round_trip_with_partial_overrides_and_regex():
    cfg = _rich_config()
    text = cfg.to_json()
    back = QFXConfig.from_json(text)
    assert back == cfg
    plain = json.loads(text)
    # a partial override stores only the fields it sets ("absent means inherit")
    assert plain["overrides"][0] == {"pattern": "fc1", "weight": {"bits": 4}}
    assert plain["overrides"][1]["pattern"] == r"block\d+\.conv[12]"
    assert plain["weight"]["rounding"] == "TRN" and plain["weight"]["overflow"] == "WRAP"


def test_yaml_round_trip_with_partial_overrides_and_regex():
    cfg = _rich_config()
    back = QFXConfig.from_yaml(cfg.to_yaml())
    assert back == cfg
    assert back.spec_for("block3.conv2", "activation").rounding is Rounding.RND_MIN_INF
    assert back.spec_for("block3.conv3", "activation").rounding is Rounding.RND_INF


def test_hand_written_yaml_recipe():
    text = """
version: 1
weight: {bits: 4, signed: true, per_channel: true, rounding: RND_CONV, overflow: SAT}
activation: {bits: 4}
fold_batchnorm: false
overrides:
  - pattern: fc1            # a module name ...
    weight: {bits: 8}
  - pattern: "fc[23]"       # ... or a regular expression over the whole name
    activation: {rounding: TRN, overflow: WRAP}
"""
    cfg = QFXConfig.from_yaml(text)
    assert cfg.overrides == (
        LayerOverride(pattern="fc1", weight=SpecOverride(bits=8)),
        LayerOverride(pattern="fc[23]", activation=SpecOverride(rounding=Rounding.TRN,
                                                                overflow=Overflow.WRAP)),
    )
    assert cfg.spec_for("fc1", "weight").bits == 8
    assert cfg.spec_for("fc2", "weight").bits == 4
    assert cfg.spec_for("fc3", "activation") == QuantSpec(bits=4, rounding="TRN",
                                                          overflow="WRAP")
    assert cfg.spec_for("fc1", "activation") == QuantSpec(bits=4)


_PATTERNS = ["fc1", "fc[12]", r"block\d+\.conv", ".*", "yes", "null", "1", "a: b", "#c",
             " padded ", "'quoted'", "ünï", "[x]"]
_maybe = st.none


@st.composite
def _quant_specs(draw):
    bits = draw(st.integers(1, 32))
    return QuantSpec(
        bits=bits,
        signed=draw(_maybe() | st.booleans()),
        integer_bits=draw(_maybe() | st.integers(-64, 64)),
        rounding=draw(st.sampled_from(list(Rounding))),
        overflow=draw(st.sampled_from(list(Overflow))),
        per_channel=draw(st.booleans()),
        trainable=draw(st.booleans()),
        khot=draw(st.integers(0, bits)),
    )


@st.composite
def _spec_overrides(draw):
    bits = draw(_maybe() | st.integers(1, 32))
    return SpecOverride(
        bits=bits,
        signed=draw(_maybe() | st.booleans()),
        integer_bits=draw(_maybe() | st.integers(-64, 64)),
        rounding=draw(_maybe() | st.sampled_from(list(Rounding))),
        overflow=draw(_maybe() | st.sampled_from(list(Overflow))),
        per_channel=draw(_maybe() | st.booleans()),
        trainable=draw(_maybe() | st.booleans()),
        khot=draw(_maybe() | st.integers(0, bits if bits is not None else 1)),
    )


_ROLES = ("input", "weight", "bias", "activation", "intermediate", "norm_scale")


@st.composite
def _configs(draw):
    overrides = tuple(
        LayerOverride(pattern=draw(st.sampled_from(_PATTERNS)),
                      **{r: draw(_maybe() | _spec_overrides()) for r in _ROLES})
        for _ in range(draw(st.integers(0, 3)))
    )
    specs = {r: draw(_quant_specs()) for r in _ROLES}
    try:
        return QFXConfig(fold_batchnorm=draw(st.booleans()), overrides=overrides, **specs)
    except ConfigError:
        # an override can be invalid against the drawn base spec (khot > its bits)
        assume(False)


@settings(max_examples=60, deadline=None, database=None)
@given(_configs())
def test_round_trips_property(cfg):
    assert QFXConfig.from_json(cfg.to_json()) == cfg
    assert QFXConfig.from_yaml(cfg.to_yaml()) == cfg
    assert QFXConfig.from_dict(cfg.to_dict()) == cfg


# -- per-layer override resolution -----------------------------------------------------------


def test_override_by_exact_name_and_regex_later_wins():
    cfg = QFXConfig(overrides=(
        LayerOverride(pattern="fc.*", weight=SpecOverride(bits=4, rounding="TRN")),
        LayerOverride(pattern="fc1", weight=SpecOverride(bits=6)),
        LayerOverride(pattern="fc[13]", weight=SpecOverride(overflow="WRAP")),
    ))
    fc1, fc2, fc3 = (cfg.spec_for(n, "weight") for n in ("fc1", "fc2", "fc3"))
    # fc1: 4 (fc.*) then 6 (fc1, later wins); TRN kept from the first; WRAP from the third
    assert (fc1.bits, fc1.rounding, fc1.overflow) == (6, Rounding.TRN, Overflow.WRAP)
    assert (fc2.bits, fc2.rounding, fc2.overflow) == (4, Rounding.TRN, Overflow.SAT)
    assert (fc3.bits, fc3.rounding, fc3.overflow) == (4, Rounding.TRN, Overflow.WRAP)
    # fields the overrides do not set come from the base spec
    assert fc1.per_channel is True and fc1.signed is True
    # other roles and non-matching layers are untouched
    assert cfg.spec_for("fc1", "bias") == cfg.bias
    assert cfg.spec_for("conv1", "weight") == cfg.weight


def test_reverse_order_gives_the_other_winner():
    first = LayerOverride(pattern="fc1", weight=SpecOverride(bits=6))
    second = LayerOverride(pattern="fc.*", weight=SpecOverride(bits=4))
    assert QFXConfig(overrides=(first, second)).spec_for("fc1", "weight").bits == 4
    assert QFXConfig(overrides=(second, first)).spec_for("fc1", "weight").bits == 6


def test_regex_matches_the_whole_name_only():
    cfg = QFXConfig(overrides=(LayerOverride(pattern="fc[12]", weight=SpecOverride(bits=3)),))
    assert cfg.spec_for("fc1", "weight").bits == 3
    assert cfg.spec_for("fc2", "weight").bits == 3
    assert cfg.spec_for("fc12", "weight").bits == 8  # not a search
    assert cfg.spec_for("block.fc1", "weight").bits == 8
    assert cfg.spec_for("fc3", "weight").bits == 8


def test_exact_name_with_regex_characters():
    # "block.conv2" matches itself exactly, and the dot is a regex wildcard otherwise
    cfg = QFXConfig(overrides=(LayerOverride(pattern="block.conv2", bias=SpecOverride(bits=9)),))
    assert cfg.spec_for("block.conv2", "bias").bits == 9
    assert cfg.spec_for("block.conv1", "bias").bits == 16


def test_spec_for_unknown_role():
    with pytest.raises(ConfigError, match="role"):
        QFXConfig().spec_for("fc1", "gradient")


def test_spec_override_apply_changes_only_set_fields():
    base = QFXConfig.with_bits(5)
    over = SpecOverride(khot=1)
    assert over.apply(base.weight) == dataclasses.replace(base.weight, khot=1)


# -- rejections ------------------------------------------------------------------------------

_OVR = {"pattern": "fc1"}

REJECTIONS = [
    # (id, data, parent key path, offending key)
    ("unknown-top", {"wieght": {"bits": 4}}, "config", "wieght"),
    ("unknown-spec", {"weight": {"bitz": 4}}, "config.weight", "bitz"),
    ("unknown-override", {"overrides": [{**_OVR, "colour": 1}]}, "config.overrides[0]",
     "colour"),
    ("unknown-override-spec", {"overrides": [{**_OVR, "weight": {"bitz": 4}}]},
     "config.overrides[0].weight", "bitz"),
    ("unknown-second-override", {"overrides": [_OVR, {"pattern": "b", "bias": {"foo": 1}}]},
     "config.overrides[1].bias", "foo"),
    ("str-for-int", {"weight": {"bits": "8"}}, "config.weight", "bits"),
    ("float-for-int", {"activation": {"bits": 8.0}}, "config.activation", "bits"),
    ("bool-for-int", {"weight": {"bits": True}}, "config.weight", "bits"),
    ("str-for-int-override", {"overrides": [{**_OVR, "weight": {"bits": "4"}}]},
     "config.overrides[0].weight", "bits"),
    ("str-integer-bits", {"input": {"integer_bits": "2"}}, "config.input", "integer_bits"),
    ("int-for-bool-top", {"fold_batchnorm": 1}, "config", "fold_batchnorm"),
    ("int-for-bool-spec", {"weight": {"signed": 1}}, "config.weight", "signed"),
    ("int-for-bool-override", {"overrides": [{**_OVR, "weight": {"per_channel": 0}}]},
     "config.overrides[0].weight", "per_channel"),
    ("str-for-bool", {"weight": {"trainable": "yes"}}, "config.weight", "trainable"),
    ("bits-0", {"weight": {"bits": 0}}, "config.weight", "bits"),
    ("bits-33", {"activation": {"bits": 33}}, "config.activation", "bits"),
    ("bits-0-override", {"overrides": [{**_OVR, "weight": {"bits": 0}}]},
     "config.overrides[0].weight", "bits"),
    ("bits-33-override", {"overrides": [{**_OVR, "bias": {"bits": 33}}]},
     "config.overrides[0].bias", "bits"),
    ("bad-rounding", {"weight": {"rounding": "ROUND_HALF_UP"}}, "config.weight", "rounding"),
    ("bad-overflow", {"bias": {"overflow": "CLAMP"}}, "config.bias", "overflow"),
    ("bad-rounding-override", {"overrides": [{**_OVR, "weight": {"rounding": "NEAREST"}}]},
     "config.overrides[0].weight", "rounding"),
    ("bad-overflow-override", {"overrides": [{**_OVR, "activation": {"overflow": "clip"}}]},
     "config.overrides[0].activation", "overflow"),
    ("invalid-regex", {"overrides": [{"pattern": "fc["}]}, "config.overrides[0]", "pattern"),
    ("invalid-regex-2", {"overrides": [_OVR, {"pattern": "(a"}]}, "config.overrides[1]",
     "pattern"),
    ("pattern-not-str", {"overrides": [{"pattern": 3}]}, "config.overrides[0]", "pattern"),
    ("pattern-missing", {"overrides": [{"weight": {"bits": 4}}]}, "config.overrides[0]",
     "pattern"),
    ("wrong-version", {"version": 2}, "config", "version"),
    ("version-str", {"version": "1"}, "config", "version"),
    ("khot-gt-bits", {"weight": {"bits": 4, "khot": 5}}, "config.weight", "khot"),
    ("khot-gt-default-bits", {"weight": {"khot": 9}}, "config.weight", "khot"),
    ("khot-negative", {"weight": {"khot": -1}}, "config.weight", "khot"),
    ("spec-not-mapping", {"weight": 8}, "config", "weight"),
    ("overrides-not-list", {"overrides": {"pattern": "fc1"}}, "config", "overrides"),
    ("override-not-mapping", {"overrides": ["fc1"]}, "config.overrides[0]", "mapping"),
]


@pytest.mark.parametrize(("data", "parent", "key"), [r[1:] for r in REJECTIONS],
                         ids=[r[0] for r in REJECTIONS])
def test_rejections_name_the_key_path(data, parent, key):
    with pytest.raises(ConfigError) as info:
        QFXConfig.from_dict(data)
    message = str(info.value)
    assert parent in message, message
    assert key in message, message
    assert "\n" not in message
    # the same document is refused the same way as JSON and as YAML
    with pytest.raises(ConfigError) as from_json:
        QFXConfig.from_json(json.dumps(data))
    assert str(from_json.value) == message
    with pytest.raises(ConfigError) as from_yaml:
        QFXConfig.from_yaml(yaml.safe_dump(data))
    assert str(from_yaml.value) == message


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, QflowError) and issubclass(ConfigError, ValueError)


def test_override_khot_greater_than_its_own_bits_is_rejected():
    # An override that sets bits: 4 and khot: 5 can never be valid (khot <= bits), just
    # like QuantSpec(bits=4, khot=5); it must be refused when the config is read, with
    # the key path, not accepted and left to fail (or not) at quantize time.
    with pytest.raises(ConfigError) as info:
        QFXConfig.from_dict({"overrides": [{"pattern": "fc1", "weight": {"bits": 4, "khot": 5}}]})
    assert "config.overrides[0].weight" in str(info.value)
    assert "khot" in str(info.value)


def test_override_negative_khot_is_rejected():
    with pytest.raises(ConfigError, match="khot"):
        SpecOverride(khot=-1)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="bit width 0"):
        QuantSpec(bits=0)
    with pytest.raises(ConfigError, match="bit width 33"):
        SpecOverride(bits=33)
    with pytest.raises(ConfigError, match="rounding"):
        QuantSpec(rounding="BANKERS")
    with pytest.raises(ConfigError, match="overflow"):
        SpecOverride(overflow="BOUNCE")
    with pytest.raises(ConfigError, match="regex"):
        LayerOverride(pattern="fc[")
    with pytest.raises(ConfigError, match="version"):
        QFXConfig(version=0)
    with pytest.raises(ConfigError, match="khot"):
        QuantSpec(bits=2, khot=3)
    with pytest.raises(ConfigError, match="integer_bits"):
        QuantSpec(integer_bits=65)
    # the limits themselves are allowed
    assert QuantSpec(bits=1).bits == 1 and QuantSpec(bits=32, khot=32).khot == 32


@pytest.mark.parametrize("text", [
    "weight: {bits: 8\n",  # unclosed flow mapping
    "weight:\n  bits: 8\n bias: 3\n",  # bad indentation
    "weight: [1, 2\n",
    "a: b: c\n",
    "\tweight: 1\n",  # tab indentation
])
def test_malformed_yaml(text):
    with pytest.raises(ConfigError, match="malformed YAML"):
        QFXConfig.from_yaml(text)


def test_malformed_yaml_reports_the_line():
    # the "]" on line 3 closes a flow mapping opened with "{" on the same line
    with pytest.raises(ConfigError, match="line 3"):
        QFXConfig.from_yaml("version: 1\nweight: {bits: 8}\nbias: {bits: 8]\n")


def test_yaml_python_tags_are_refused():
    text = "weight: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(ConfigError, match="malformed YAML"):
        QFXConfig.from_yaml(text)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(text):
    with pytest.raises(ConfigError, match="mapping"):
        QFXConfig.from_yaml(text)


@pytest.mark.parametrize("text", ['{"weight": }', '{"weight": {"bits": 8},}', "{'a': 1}",
                                  "", "[1, 2"])
def test_malformed_json(text):
    with pytest.raises(ConfigError, match="malformed JSON"):
        QFXConfig.from_json(text)


@pytest.mark.parametrize("text", ["[]", "null", "3"])
def test_json_that_is_not_a_mapping(text):
    with pytest.raises(ConfigError, match="mapping"):
        QFXConfig.from_json(text)


# -- immutability ------------------------------------------------------------------------------


def test_configs_are_frozen():
    cfg = _rich_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fold_batchnorm = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight.bits = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.overrides[0].pattern = "fc2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.overrides[0].weight.bits = 2
    with pytest.raises(AttributeError):
        cfg.overrides.append(LayerOverride(pattern="x"))  # a tuple, not a list


def test_overrides_given_as_list_become_a_tuple():
    cfg = QFXConfig(overrides=[LayerOverride(pattern="fc1", weight=SpecOverride(bits=4))])
    assert isinstance(cfg.overrides, tuple)
    assert hash(cfg) == hash(QFXConfig(overrides=(LayerOverride(
        pattern="fc1", weight=SpecOverride(bits=4)),)))
    assert isinstance(QFXConfig.from_yaml("overrides: [{pattern: a}]").overrides, tuple)
