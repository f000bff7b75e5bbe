"""Configs as typed sections: defaults as a ConfigDict with every key, one parse that reports every problem
(unknown keys with suggestions, wrong types, a section's own checks), variant strings."""

import dataclasses

import pytest

from eqvae_jax.typed_config import ConfigError, default_config, parse, parse_arg, parse_collect, to_json_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    sizes: tuple[int, ...] = (1, 2)

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "run"
    steps: int = 10
    enabled: bool = True
    shift: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    inner: Inner = Inner()


def test_defaults_round_trip_through_a_config_dict():
    c = default_config(Outer)
    assert c.inner.sizes == [1, 2] and c.shift is None and dict(c.extra) == {}
    c.inner.sizes = [3]
    c.shift = 0.25  # a typed placeholder accepts a value
    parsed = parse(Outer, c)
    assert parsed == Outer(shift=0.25, inner=Inner(sizes=(3,)))
    assert parse(Outer, {"steps": 12.0}).steps == 12  # JSON may hold an integral float
    assert to_json_dict(parsed)["inner"] == {"rate": 0.5, "sizes": [3]}


def test_every_problem_is_reported_at_once():
    c = default_config(Outer).to_dict()  # a plain dict (e.g. a saved config.json): no ConfigDict type checks
    c["stpes"] = 3
    c["inner"]["rtae"] = 1.0
    c["enabled"] = "yes"
    c["steps"] = 2.5
    c["inner"]["rate"] = 2.0
    with pytest.raises(ConfigError) as e:
        parse(Outer, c)
    problems = e.value.problems
    assert "unknown key 'stpes' (did you mean 'steps'?)" in problems
    assert "unknown key 'inner.rtae' (did you mean 'inner.rate'?)" in problems
    assert "enabled must be true or false, got 'yes'" in problems
    assert "steps must be an integer, got 2.5" in problems
    assert "inner: rate must be in [0, 1], got 2.0" in problems
    parsed, _ = parse_collect(Outer, c)
    assert parsed.steps == 10 and parsed.enabled is True  # ill-typed values fall back to the defaults
    parsed, found = parse_collect(Outer, {"inner": {"rate": 2.0}})  # a bad section falls back to its defaults
    assert parsed.inner == Inner() and found == ["inner: rate must be in [0, 1], got 2.0"]


def test_variant_strings():
    a = parse_arg("model=XL/2,tiny,steps=3", model="B/2", tiny=False, steps=1, repa=False)
    assert (a.model, a.tiny, a.steps, a.repa) == ("XL/2", True, 3, False)
    with pytest.raises(ConfigError, match="unknown config variant 'tnyi' .did you mean 'tiny'. known: model, repa"):
        parse_arg("tnyi", model="B/2", tiny=False, steps=1, repa=False)
    with pytest.raises(ConfigError, match=r"unknown value of config variant model: 'XL/3' \(did you mean model=XL/2"):
        parse_arg("model=XL/3", {"model": ("B/2", "XL/2")}, model="B/2")
    assert parse_arg("model=XL/2", {"model": ("B/2", "XL/2")}, model="B/2").model == "XL/2"
    assert ConfigError("one problem").problems == ["one problem"]  # ml_collections re-raises with a string
    with pytest.raises(ConfigError, match="steps='x' is not a int"):
        parse_arg("steps=x", steps=1)
