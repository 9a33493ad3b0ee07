"""Strict YAML and JSON input (qflow.yamlfile) for recipes and target files: duplicate
keys, deep nesting, malformed text and wrong values are one-line errors, fast, and
never another exception."""

import copy
import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflow.config import QFXConfig
from qflow.errors import ConfigError, QflowError
from qflow.numerics.types import parse_overflow, parse_rounding
from qflow.targets import TARGETS_DIR, load_target_file
from qflow.yamlfile import MAX_DEPTH, load_json_text, load_yaml

DEEP = 100_000


def _message(call, error=QflowError) -> str:
    start = time.perf_counter()
    with pytest.raises(error) as info:
        call()
    assert time.perf_counter() - start < 2, "too slow"
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- load_yaml ---------------------------------------------------------------------------

#: (YAML text or bytes, the whole message after "f.yaml: ", or a regex for it)
YAML_CASES = [
    ("bits: 8\nbits: 4\n", "duplicate key 'bits' at line 2"),
    ("a:\n  b:\n    bits: 1\n    bits: 2\n", "duplicate key 'bits' at line 4"),
    ("a: [{x: 1, y: 2, x: 3}]\n", "duplicate key 'x' at line 1"),
    ("[" * DEEP, f"YAML nested too deeply (more than {MAX_DEPTH} levels) at line 1"),
    ("{" * DEEP, f"YAML nested too deeply (more than {MAX_DEPTH} levels) at line 1"),
    ("a: " + "{b: " * DEEP, f"YAML nested too deeply (more than {MAX_DEPTH} levels) at line 1"),
    ("- " * DEEP + "x", f"YAML nested too deeply (more than {MAX_DEPTH} levels) at line 1"),
    ("? " * DEEP + "x", f"YAML nested too deeply (more than {MAX_DEPTH} levels) at line 1"),
    ("".join(" " * i + "a:\n" for i in range(2_000)),
     f"YAML nested too deeply (more than {MAX_DEPTH} levels) at line 101"),
    ("k:\n" + "".join(" " * (2 * i) + "- k:\n" for i in range(DEEP // 100)),
     re.compile(r"YAML nested too deeply \(more than 100 levels\) at line \d+")),
    ("a: {b: 1\n", re.compile(r"malformed YAML at line 2: expected ',' or '}'.*")),
    ("a: b: c\n", "malformed YAML at line 1: mapping values are not allowed here"),
    ("a: 1\n---\nb: 2\n", "malformed YAML at line 2: but found another document (expected "
                          "a single document in the stream at line 1)"),
    ("a: \x07\n", "malformed YAML at line 1: special characters are not allowed ('\\x07')"),
    ("a: 1\nb: \x00\n", "malformed YAML at line 2: special characters are not allowed "
                        "('\\x00')"),
    (b"a: 1\nb: \xff\n", "not UTF-8 text (invalid start byte at byte 8)"),
    ("a: !!python/object/apply:os.system ['true']\n",
     re.compile(r"malformed YAML at line 1: could not determine a constructor .*")),
    ("a: 0x_\n", re.compile(r"malformed YAML at line 1: cannot read the value '0x_': .*")),
    ("a: 2001-13-45\n", "malformed YAML at line 1: cannot read the value '2001-13-45': "
                        "month must be in 1..12"),
    ("a: !!timestamp nope\n", re.compile(r"malformed YAML at line 1: cannot read the value.*")),
    ("a: " + "1" * 5000 + "\n", re.compile(r"malformed YAML at line 1: cannot read the .*")),
    ("a: 0x" + "f" * 17 + "\n", re.compile(r".*'0xfffff.* is too large \(more than 64 bits\)")),
    ("1: x\n", "malformed YAML at line 1: a key must be a string, not int '1' (quote it)"),
    ("on: x\n", "malformed YAML at line 1: a key must be a string, not bool 'on' (quote it)"),
    ("~: x\n", "malformed YAML at line 1: a key must be a string, not null '~' (quote it)"),
    ("? [a]\n: x\n", "malformed YAML at line 1: a key must be a string, not list"),
    ("a: &x [1, *x]\n", "malformed YAML at line 1: alias *x refers to a collection that "
                        "contains it (recursive data)"),
    ("a: *nowhere\n", "malformed YAML at line 1: found undefined alias 'nowhere'"),
]


@pytest.mark.parametrize(("text", "expected"), YAML_CASES, ids=range(len(YAML_CASES)))
def test_bad_yaml_is_one_line(text, expected):
    message = _message(lambda: load_yaml(text, "f.yaml"))
    assert message.startswith("f.yaml: ")
    rest = message.removeprefix("f.yaml: ")
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(rest), rest
    else:
        assert rest == expected


@pytest.mark.parametrize(("text", "data"), [
    ("", None),
    ("a: 1\nb: [x, {c: d}]\n", {"a": 1, "b": ["x", {"c": "d"}]}),
    ("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", {"base": {"x": 1, "y": 2},
                                                       "c": {"x": 3, "y": 2}}),
    ("a: &l [1]\nb: [*l, *l]\n", {"a": [1], "b": [[1], [1]]}),
    ("'1': one\n'on': on\n", {"1": "one", "on": True}),
    ("[" * MAX_DEPTH + "]" * MAX_DEPTH, None),
])
def test_good_yaml_loads(text, data):
    got = load_yaml(text)
    if text.startswith("["):  # the deepest document allowed
        depth = 0
        while isinstance(got, list) and got:
            got, depth = got[0], depth + 1
        assert depth == MAX_DEPTH - 1
    else:
        assert got == data


def test_integers_have_at_most_64_bits():
    assert load_yaml("a: 0xffffffffffffffff") == {"a": 2**64 - 1}
    assert load_yaml("a: -18446744073709551615") == {"a": -(2**64 - 1)}
    for text in ("a: 0x10000000000000000", "a: 18446744073709551616", "a: -0x1" + "0" * 16):
        assert _message(lambda text=text: load_yaml(text)).endswith(
            "is too large (more than 64 bits)")
    assert load_json_text("[18446744073709551615]") == [2**64 - 1]
    assert "too large" in _message(lambda: load_json_text("[18446744073709551616]"))


def test_error_class_and_no_prefix():
    with pytest.raises(ConfigError) as info:
        load_yaml("a: 1\na: 2\n", error=ConfigError)
    assert str(info.value) == "duplicate key 'a' at line 2"


def test_the_interpreter_stays_healthy_after_deep_input():
    limit = sys.getrecursionlimit()
    for text in ("[" * DEEP, "{" * DEEP, "- " * DEEP):
        _message(lambda text=text: load_yaml(text))
        _message(lambda text=text: load_json_text(text))
    assert sys.getrecursionlimit() == limit
    assert load_yaml("a: [1, 2]") == {"a": [1, 2]}
    assert json.loads("[[1]]") == [[1]]


def test_a_deep_caller_stack_still_gets_one_line():
    def nest(n):
        return nest(n - 1) if n else load_yaml("a: " + "[" * 99 + "]" * 99, "f.yaml")

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)
    try:
        with pytest.raises(QflowError, match=r"f\.yaml: YAML nested too deeply"):
            nest(150)
    finally:
        sys.setrecursionlimit(limit)


# -- load_json_text ----------------------------------------------------------------------

JSON_CASES = [
    ("[" * DEEP, "JSON nested too deeply"),
    ('{"a": ' * DEEP, "JSON nested too deeply"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
    ('{"a": 1,}', "malformed JSON at line 1: Expecting property name enclosed in double "
                  "quotes (column 9)"),
    ('{\n"a": }', "malformed JSON at line 2: Expecting value (column 6)"),
    ("", "malformed JSON at line 1: Expecting value (column 1)"),
    ('{"a": ' + "9" * 30 + "}", "malformed JSON: integer '" + "9" * 30 + "' is too large "
                                "(more than 64 bits)"),
    (b'{"a": "\xff"}', "not UTF-8 text (invalid start byte at byte 7)"),
]


@pytest.mark.parametrize(("text", "expected"), JSON_CASES, ids=range(len(JSON_CASES)))
def test_bad_json_is_one_line(text, expected):
    assert _message(lambda: load_json_text(text, "f.json")) == f"f.json: {expected}"


# -- recipes: QFXConfig.from_yaml / from_json ------------------------------------------------

RECIPE_CASES = [
    ("weight:\n  bits: 4\n  bits: 6\n", "duplicate key 'bits' at line 3"),
    ("weight: {bits: 4}\nweight: {bits: 6}\n", "duplicate key 'weight' at line 2"),
    ("overrides:\n- pattern: fc1\n  pattern: fc2\n", "duplicate key 'pattern' at line 3"),
    ("weight: " + "[" * DEEP, "YAML nested too deeply (more than 100 levels) at line 1"),
    ("weight:\n" + "".join(" " * i + "bits:\n" for i in range(1, 1_000)),
     "YAML nested too deeply (more than 100 levels) at line 101"),
    ("weight: {bits: 8\n", "malformed YAML at line 2: expected ',' or '}', but got "
                           "'<stream end>' (while parsing a flow mapping at line 1)"),
    ("weight: {bits: 0x_}\n", "malformed YAML at line 1: cannot read the value '0x_': "
                              "invalid literal for int() with base 16: ''"),
    ("weight: {yes: 8}\n", "malformed YAML at line 1: a key must be a string, not bool "
                           "'yes' (quote it)"),
    ("weight: {bits: 99999999999999999999999}\n", "malformed YAML at line 1: integer "
     "'99999999999999999999999' is too large (more than 64 bits)"),
    ("weight: {bits: 40}\n", "config.weight: bits: bit width 40 is impossible (must be 1..32)"),
    ("weight: {bits: true}\n", "config.weight.bits: expected an integer, got True"),
]


@pytest.mark.parametrize(("text", "expected"), RECIPE_CASES, ids=range(len(RECIPE_CASES)))
def test_bad_recipes_are_one_line(text, expected):
    assert _message(lambda: QFXConfig.from_yaml(text), ConfigError) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("[" * DEEP, "JSON nested too deeply"),
    ('{"weight": {"bits": 4, "bits": 6}}', "duplicate key 'bits'"),
    ('{"weight": {"bits": 4}', "malformed JSON at line 1: Expecting ',' delimiter "
                               "(column 23)"),
])
def test_bad_json_configs_are_one_line(text, expected):
    assert _message(lambda: QFXConfig.from_json(text), ConfigError) == expected


# -- property: one defect in a valid file is always one QflowError line -------------------------

TARGET_BASES = {name: yaml.safe_load((TARGETS_DIR / f"{name}.yaml").read_text())
                for name in ("ultra96", "arm64")}
#: every key path of the target files and the kind of value it takes
TARGET_PATHS = {
    "ultra96": {("name",): "str", ("description",): "str", ("kind",): "str",
                ("backend",): "str", ("part",): "str", ("board_part",): "str",
                ("clock_mhz",): "number", ("resources",): "map", ("defaults",): "map",
                ("processing_system",): "map", ("defaults", "io_type"): "str",
                ("defaults", "strategy"): "str", ("defaults", "reuse_factor"): "reuse",
                ("processing_system", "family"): "str", ("processing_system", "cpu"): "str",
                ("processing_system", "tvm_target"): "str",
                **{("resources", k): "int" for k in ("dsp", "lut", "ff", "bram36", "uram")}},
    "arm64": {("name",): "str", ("description",): "str", ("kind",): "str",
              ("backend",): "str", ("tvm",): "map", ("tvm", "kind"): "str",
              ("tvm", "mtriple"): "str", ("tvm", "mcpu"): "str", ("tvm", "mattr"): "list",
              ("cross_compiler",): "str"},
}
#: values of the wrong kind for each kind of value
WRONG = {
    "str": [None, True, 12345, 1.5, [1], {"a": 1}],
    "number": [None, True, False, "100", [100], {"a": 1}, -1, 0, float("nan")],
    "int": [None, True, False, 1.5, "360", [1], {"a": 1}, -1, -(2**40)],
    "reuse": [None, True, 0, -3, 1.5, "fast", [1], {"a": 1}],
    "map": [None, True, 7, 1.5, "text", ["io_parallel"]],
    "list": [None, 7, "+neon", {"a": 1}, [1], [None], ["two words"]],
}
BROKEN_LINES = ["zz: [1, 2\n", "zz: {a: 1\n", "\tzz: 1\n", "zz: 'unclosed\n", "zz: a: b\n",
                "- zz\n", "zz: *nowhere\n", "zz: !!python/name:os.system\n", "]\n"]
BAD_BYTES = [bytes([b]) for b in (*range(0x80, 0xC0, 7), 0xC0, 0xF8, 0xFE, 0xFF)]


def _set(data: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _delete(data: dict, path: tuple) -> None:
    for key in path[:-1]:
        data = data[key]
    del data[path[-1]]


def _insert_line(text: str, line: str, where: int) -> str:
    lines = text.splitlines(keepends=True)
    lines.insert(where % (len(lines) + 1), line)
    return "".join(lines)


def _duplicate_a_line(text: str, where: int) -> str:
    """The text with one ``key: ...`` line given twice in its mapping."""
    lines = text.splitlines(keepends=True)
    keys = [i for i, line in enumerate(lines) if re.match(r"\s*[A-Za-z_][\w-]*:", line)]
    if not keys:  # one flow mapping on one line
        return text.replace("{", "{zz: 1, zz: 2, ", 1)
    i = keys[where % len(keys)]
    return "".join([*lines[:i + 1], lines[i], *lines[i + 1:]])


def _deep(depth: int, style: int) -> str:
    return ("[" * depth, "{a: " * depth, "\n" + "- " * depth + "x")[style]


@st.composite
def _defect(draw, paths: dict, required: list[tuple], names: list[str], wrong: dict):
    """(what, mutate(data), mutate(text) -> text or bytes): one defect to inject.

    ``paths`` maps each key path to the kind of value it takes, ``wrong`` each kind to
    values it refuses; an unknown key goes into the top level or a ``"map"`` section."""
    what = draw(st.sampled_from(["unknown key", "wrong type", "bool resource", "negative",
                                 "missing key", "duplicate key", "deep", "syntax",
                                 "non-UTF-8"]))
    # (tvm is left out: it takes any TVM target option, each value checked)
    sections = [()] + [p for p, kind in paths.items() if kind == "map" and p != ("tvm",)]
    if what == "unknown key":
        path = draw(st.sampled_from(sections))
        key = draw(st.text("abcxyz_", min_size=1, max_size=8).filter(lambda k: k not in names))
        value = draw(st.sampled_from([1, "x", None, [1], {"a": 1}]))
        return what, lambda d: _set(d, (*path, key), value), None
    if what in ("wrong type", "bool resource", "negative"):
        if what == "wrong type" or "resources" not in [p[0] for p in paths]:
            what = "wrong type"
            path = draw(st.sampled_from(sorted(paths)))
            value = draw(st.sampled_from(wrong[paths[path]]))
        elif what == "bool resource":
            path = ("resources", draw(st.sampled_from(["dsp", "lut", "ff", "bram36", "uram"])))
            value = draw(st.booleans())
        else:
            path = draw(st.sampled_from([("clock_mhz",), ("defaults", "reuse_factor"),
                                         *[("resources", k) for k in ("dsp", "lut", "uram")]]))
            value = draw(st.one_of(st.integers(-(2**63), -1), st.floats(max_value=-1e-9)))
        return what, lambda d: _set(d, path, value), None
    if what == "missing key":
        path = draw(st.sampled_from(required))
        return what, lambda d: _delete(d, path), None
    where = draw(st.integers(0, 100))
    if what == "duplicate key":
        return what, None, lambda text: _duplicate_a_line(text, where)
    if what == "deep":
        depth = draw(st.sampled_from([MAX_DEPTH + 1, 1_000, DEEP]))
        style = draw(st.integers(0, 2))
        return what, None, lambda text: _insert_line(text, "zz: " + _deep(depth, style) + "\n",
                                                     where)
    if what == "syntax":
        line = draw(st.sampled_from(BROKEN_LINES))
        return what, None, lambda text: _insert_line(text, line, where)
    byte = draw(st.sampled_from(BAD_BYTES))
    return what, None, lambda text: (text.encode()[:where % len(text)] + byte
                                     + text.encode()[where % len(text):])


_TARGET_REQUIRED = {
    "ultra96": [("name",), ("description",), ("kind",), ("backend",), ("part",),
                ("clock_mhz",), ("resources",), ("defaults",), ("processing_system", "family"),
                ("defaults", "io_type"), ("defaults", "strategy"), ("defaults", "reuse_factor"),
                ("resources", "dsp"), ("resources", "uram")],
    "arm64": [("name",), ("description",), ("kind",), ("backend",), ("tvm",), ("tvm", "kind")],
}
_TARGET_NAMES = ["name", "description", "kind", "backend", "part", "board_part", "clock_mhz",
                 "resources", "defaults", "processing_system", "tvm", "cross_compiler",
                 "io_type", "strategy", "reuse_factor", "family", "cpu", "tvm_target", "dsp",
                 "lut", "ff", "bram36", "uram", "mtriple", "mcpu", "mattr", "zz"]


@st.composite
def _broken_target(draw):
    base = draw(st.sampled_from(sorted(TARGET_BASES)))
    what, change_data, change_text = draw(_defect(TARGET_PATHS[base], _TARGET_REQUIRED[base],
                                                  _TARGET_NAMES, WRONG))
    data = copy.deepcopy(TARGET_BASES[base])
    if change_data:
        change_data(data)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=draw(st.booleans()))
    return base, what, change_text(text) if change_text else text


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("broken-inputs")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_broken_target())
def test_any_single_defect_in_a_target_file_is_one_qflow_error_line(scratch, case):
    base, what, text = case
    path = scratch / f"{base}.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    with pytest.raises(QflowError) as info:  # any other exception fails the test
        load_target_file(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"target file {path}"), (what, message)


RECIPE_BASE = {
    "version": 1,
    "input": {"bits": 8, "trainable": False},
    "weight": {"bits": 8, "signed": True, "rounding": "RND_CONV", "overflow": "SAT",
               "per_channel": True, "khot": 0},
    "activation": {"bits": 8, "integer_bits": 2},
    "fold_batchnorm": False,
    "overrides": [{"pattern": "fc1", "weight": {"bits": 4, "rounding": "RND"}}],
}
RECIPE_PATHS = {
    ("version",): "version", ("input",): "map", ("weight",): "map", ("activation",): "map",
    ("fold_batchnorm",): "bool", ("overrides",): "overrides",
    ("input", "bits"): "bits", ("input", "trainable"): "bool", ("weight", "bits"): "bits",
    ("weight", "signed"): "bool", ("weight", "rounding"): "rounding",
    ("weight", "overflow"): "overflow", ("weight", "per_channel"): "bool",
    ("weight", "khot"): "int", ("activation", "bits"): "bits",
    ("activation", "integer_bits"): "int",
    ("overrides", 0): "map", ("overrides", 0, "pattern"): "str",
    ("overrides", 0, "weight"): "map", ("overrides", 0, "weight", "bits"): "bits",
    ("overrides", 0, "weight", "rounding"): "rounding",
}
_RECIPE_WRONG = {
    "version": [0, 2, "1", 1.0, True, None, [1]],
    "map": [7, "x", True, 1.5, [1]],
    "bool": [1, 0, "yes", "true", 1.5, [True], {"a": 1}],
    "overrides": [7, "fc1", {"pattern": "fc1"}, [7], ["fc1"], [None]],
    "bits": ["8", 8.0, True, [8], {"a": 1}],
    "int": ["2", 2.5, True, [2], {"a": 1}],
    "str": [7, None, 1.5, True, ["fc1"], {"a": 1}, "fc[1"],
    # (no None: an override's rounding may be null, "keep the base's")
    "rounding": [7, True, [1], "round", "RND_CONVV", ""],
    "overflow": [7, True, [1], "saturate", "WRAPP", ""],
}


def _bad_mode(parse):
    def invalid(name: str) -> bool:
        try:
            parse(name)
        except ValueError:
            return True
        return False

    return st.text(st.characters(codec="utf-8"), max_size=12).filter(invalid)


@st.composite
def _broken_recipe(draw):
    what = draw(st.sampled_from(["defect", "bits out of range", "bad mode name"]))
    data = copy.deepcopy(RECIPE_BASE)
    change_text = None
    if what == "bits out of range":
        path = draw(st.sampled_from([p for p, kind in RECIPE_PATHS.items() if kind == "bits"]))
        _set(data, path, draw(st.one_of(st.integers(-(2**63), 0), st.integers(33, 2**63 - 1))))
    elif what == "bad mode name":
        path = draw(st.sampled_from([p for p, k in RECIPE_PATHS.items()
                                     if k in ("rounding", "overflow")]))
        parse = parse_rounding if RECIPE_PATHS[path] == "rounding" else parse_overflow
        _set(data, path, draw(_bad_mode(parse)))
    else:
        names = ["version", "input", "weight", "bias", "activation", "intermediate",
                 "norm_scale", "fold_batchnorm", "overrides", "pattern", "bits", "signed",
                 "integer_bits", "rounding", "overflow", "per_channel", "trainable", "khot",
                 "zz"]
        what, change_data, change_text = draw(_defect(
            RECIPE_PATHS, [("overrides", 0, "pattern")], names, _RECIPE_WRONG))
        if change_data:
            change_data(data)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=draw(st.booleans()))
    return what, change_text(text) if change_text else text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_broken_recipe())
def test_any_single_defect_in_a_recipe_is_one_config_error_line(case):
    what, text = case
    with pytest.raises(ConfigError) as info:  # any other exception fails the test
        QFXConfig.from_yaml(text)
    assert "\n" not in str(info.value), (what, str(info.value))


def test_the_property_bases_are_valid(tmp_path):
    for base, data in TARGET_BASES.items():
        path = tmp_path / f"{base}.yaml"
        for flow in (True, False):
            path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=flow))
            assert load_target_file(path).name == base
    assert QFXConfig.from_yaml(yaml.safe_dump(RECIPE_BASE)).overrides[0].pattern == "fc1"
