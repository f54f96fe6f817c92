"""eym.config: dict <-> frozen dataclass, unknown keys and wrong types refused by name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from eym.config import from_dict, load_config, replace, to_dict
from eym.errors import EymError


@dataclass(frozen=True)
class Inner:
    steps: int = 3  # an int
    scale: float = 1.0  # a float (ints accepted)


@dataclass(frozen=True)
class Outer:
    name: str = "x"  # a string
    flag: bool = False  # a bool (ints refused)
    window: float | tuple[float, float] = 1.0  # a number or a pair
    layers: tuple[str, ...] = ("down", "up")  # a variable-length tuple
    seed: int | None = None  # optional
    inner: Inner = field(default_factory=Inner)  # nested config

    def __post_init__(self):
        if self.name == "bad":
            raise EymError("name 'bad' is not allowed")


def test_round_trip_through_json():
    config = Outer(name="a", flag=True, window=(0.2, 0.8), layers=("mid",), seed=4, inner=Inner(steps=7, scale=0.5))
    data = json.loads(json.dumps(to_dict(config)))  # tuples became lists, nested became a dict
    assert data["window"] == [0.2, 0.8] and data["inner"] == {"steps": 7, "scale": 0.5}
    back = from_dict(Outer, data)
    assert back == config
    assert isinstance(back.window, tuple) and isinstance(back.layers, tuple) and isinstance(back.inner, Inner)
    hash(back)  # frozen configs of tuples stay hashable (usable as cache keys)


def test_missing_keys_keep_defaults_and_none_is_empty():
    assert from_dict(Outer, {}) == Outer()
    assert from_dict(Outer, None) == Outer()
    assert from_dict(Outer, {"inner": {"steps": 9}}).inner == Inner(steps=9, scale=1.0)


def test_unknown_keys_are_named():
    with pytest.raises(EymError, match=r"unknown setting\(s\) 'guidance_scal'.*known settings are"):
        from_dict(Outer, {"guidance_scal": 2.0})
    with pytest.raises(EymError, match=r"Outer.inner: unknown setting\(s\) 'stepz'"):
        from_dict(Outer, {"inner": {"stepz": 2}})


@pytest.mark.parametrize(
    "data, where",
    [
        ({"flag": 1}, "Outer.flag"),  # ints are not booleans
        ({"inner": {"steps": 2.5}}, "Outer.inner.steps"),  # floats are not ints
        ({"inner": {"steps": True}}, "Outer.inner.steps"),  # booleans are not ints
        ({"name": 3}, "Outer.name"),
        ({"window": "half"}, "Outer.window"),
        ({"window": [0.1, 0.2, 0.3]}, "Outer.window"),  # a pair has two values
        ({"layers": "down"}, "Outer.layers"),  # a string is not a list of strings
        ({"inner": 3}, "Outer.inner"),
    ],
)
def test_wrong_types_name_the_field(data, where):
    with pytest.raises(EymError, match=where.replace(".", r"\.")):
        from_dict(Outer, data)


def test_number_coercion_keeps_ints_where_allowed():
    config = from_dict(Outer, {"window": 1, "inner": {"scale": 2}})
    assert config.window == 1 and config.inner.scale == 2.0 and isinstance(config.inner.scale, float)


def test_post_init_errors_pass_through():
    with pytest.raises(EymError, match="name 'bad'"):
        from_dict(Outer, {"name": "bad"})


def test_replace_checks_like_from_dict():
    config = replace(Outer(), seed=3, inner={"steps": 1})
    assert config.seed == 3 and config.inner == Inner(steps=1)
    with pytest.raises(EymError, match="unknown setting"):
        replace(Outer(), sead=3)


def test_load_config_json_and_yaml(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"name": "j", "inner": {"steps": 5}}))
    (tmp_path / "b.yaml").write_text("name: y\nwindow: [0.0, 0.5]\n")
    assert load_config(Outer, tmp_path / "a.json") == Outer(name="j", inner=Inner(steps=5))
    assert load_config(Outer, tmp_path / "b.yaml") == Outer(name="y", window=(0.0, 0.5))
    (tmp_path / "broken.json").write_text("{name: ")
    with pytest.raises(EymError, match="broken.json is not valid"):
        load_config(Outer, tmp_path / "broken.json")
    with pytest.raises(EymError, match="cannot read settings file"):
        load_config(Outer, tmp_path / "absent.json")
    (tmp_path / "typo.json").write_text(json.dumps({"nmae": "x"}))
    with pytest.raises(EymError, match=r"typo.json: unknown setting\(s\) 'nmae'"):
        load_config(Outer, tmp_path / "typo.json")


def test_tune_config_round_trip_and_checks():
    from eym.tuning import TuneConfig, config_fingerprint

    config = TuneConfig(steps1=2, steps2=3, lr=1e-3)
    assert from_dict(TuneConfig, to_dict(config)) == config
    with pytest.raises(EymError, match="rec_weight"):
        TuneConfig(rec_weight=1.5)
    with pytest.raises(EymError, match="mixed_precision 'fp8'"):
        from_dict(TuneConfig, {"mixed_precision": "fp8"})
    # bookkeeping settings do not change the cache key; settings that change the result do
    assert config_fingerprint(config) == config_fingerprint(replace(config, checkpoint_every=7))
    assert config_fingerprint(config) != config_fingerprint(replace(config, lr=2e-3))
