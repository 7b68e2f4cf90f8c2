"""The config system every verb shares: layers, dotted keys, groups, flags and their errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import pytest

from opd.config import settings
from opd.config.settings import Config, group, setting
from opd.config.training import PROFILES, TrainConfig, build_config
from opd.errors import OPDError


@dataclass(frozen=True)
class Inner(Config):
    k: int = setting(4, "A size.", minimum=1)
    names: tuple[str, ...] = setting(("a",), "Some names.", choices=("a", "b"))


@dataclass(frozen=True)
class Outer(Config):
    path: str = setting(help="Required: no default.")
    rate: float = setting(0.5, "A share.", above=0, below=1)
    flag: bool = setting(False, "A switch.")
    extra: dict = setting(factory=dict, help="Free-form.")
    inner: Inner = group(Inner, "Nested settings.")

    def check(self) -> None:
        if self.flag and self.inner.k > 8:
            raise OPDError("config: flag needs inner.k ≤ 8")


def parse(cls, argv, **options):
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, cls, options.get("profiles"))
    return settings.from_args(cls, parser.parse_args(argv), **options)


def test_layers_merge_in_order_with_nested_and_dotted_keys(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("path: from-file\ninner:\n  k: 6\nrate: 0.25\n")
    config = parse(Outer, ["--config", str(config_file), "--inner.k", "7", "--set", "inner.k=9",
                           "--set", "extra.steps=3"], forced={"rate": 0.75})
    assert (config.path, config.inner.k, config.rate) == ("from-file", 9, 0.75)
    assert config.extra == {"steps": 3}
    assert parse(Outer, ["--config", str(config_file), "--inner.k", "7"]).inner.k == 7
    assert parse(Outer, ["--path", "p", "--inner.names", "a,b", "--flag"]).inner.names == ("a", "b")


def test_values_are_converted_on_construction_in_python_too():
    config = Outer(path="p", rate="0.5", flag="yes", inner={"k": "3"})
    assert (config.rate, config.flag, config.inner) == (0.5, True, Inner(k=3))
    assert settings.to_dict(config) == {"path": "p", "rate": 0.5, "flag": True, "extra": {},
                                        "inner": {"k": 3, "names": ["a"]}}


@pytest.mark.parametrize(("values", "message"), [
    ({}, "config: path is required; pass --path VALUE"),
    ({"path": "p", "rate": 1}, r"config: rate must lie in \(0, 1\), got 1"),
    ({"path": "p", "rate": "high"}, "config: rate must be a float, got 'high'"),
    ({"path": "p", "inner": {"k": 0}}, "config: inner.k must be at least 1, got 0"),
    ({"path": "p", "inner": {"names": "a,c"}}, "config: inner.names must be each one of"),
    ({"path": "p", "inner": 3}, "config: inner is a group of settings; set one of them"),
    ({"path": "p", "inner": {"size": 3}}, "config: unknown key 'inner.size'"),
    ({"path": "p", "flag": "maybe"}, "config: flag must be a bool"),
    ({"path": "p", "flag": True, "inner": {"k": 9}}, "config: flag needs inner.k ≤ 8"),
    ({"path": "p", "extra": [1]}, "config: extra must be a mapping"),
])
def test_each_bad_value_is_one_line_naming_the_field(values, message):
    with pytest.raises(OPDError, match=message):
        settings.build(Outer, values)


def test_yaml_and_set_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(OPDError, match="is not valid YAML"):
        parse(Outer, ["--config", str(bad)])
    with pytest.raises(OPDError, match="is not key=value"):
        parse(Outer, ["--set", "path"])


def test_profiles_sit_under_the_users_values():
    config = parse(TrainConfig, ["--profile", "cpu-small", "--objective.k", "3"], profiles=PROFILES)
    assert config.objective.k == 3 and config.measure_k == 8 and config.lr == 1e-4
    assert build_config({}, profile="cpu-small").objective.k == 8
    with pytest.raises(OPDError, match="profile: unknown value 'huge'"):
        parse(TrainConfig, ["--profile", "huge"], profiles=PROFILES)


def test_every_setting_has_help_a_flag_and_a_line_in_help_config():
    described = settings.describe(TrainConfig)
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, TrainConfig, PROFILES)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for path, field, _ in settings.leaves(TrainConfig):
        assert field.metadata["help"], path
        assert f"  {path} = " in described
        assert "--" + path.replace("_", "-") in flags


def test_a_shared_group_gives_each_verb_its_own_default_and_the_groups_bounds():
    from opd.config.fields import Decoding, PromptSource
    from opd.config.training import ColdStartConfig
    from opd.evaluation.accuracy import EvalConfig
    from opd.recipes.select_prompts import SelectConfig

    # redeclared defaults win, and the field keeps the group's place and its other fields
    assert (TrainConfig().temperature, EvalConfig().temperature, ColdStartConfig().temperature) \
        == (1.0, 0.0, 0.7)
    assert TrainConfig().max_new_tokens == 7168 and EvalConfig().max_new_tokens == 256
    assert [path for path, _, _ in settings.leaves(EvalConfig)][3:8] == [
        f.name for f in fields(PromptSource)]
    for verb in (TrainConfig, EvalConfig, ColdStartConfig):
        assert issubclass(verb, Decoding)
        with pytest.raises(OPDError, match="top_p must lie in"):
            settings.build(verb, {"top_p": 0})
    # a verb may make a shared field required
    with pytest.raises(OPDError, match="config: student is required; pass --student"):
        settings.build(SelectConfig, {"teacher": "t", "prompts": "p.jsonl", "out": "o"})


@pytest.mark.parametrize(("old", "new"), [("rollouts_per_prompt", "samples_per_prompt"),
                                          ("eval_n", "eval_samples_per_prompt")])
def test_an_old_setting_name_says_what_it_was_renamed(tmp_path, old, new):
    message = rf"^config: {old} was renamed {new}$"
    with pytest.raises(OPDError, match=message):
        build_config({old: 2})
    with pytest.raises(OPDError, match=message):
        parse(TrainConfig, ["--" + old.replace("_", "-"), "2"])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"{old}: 2\n")
    with pytest.raises(OPDError, match=message):
        parse(TrainConfig, ["--config", str(yaml_file)])


def test_every_verb_calls_samples_per_prompt_by_one_name():
    from opd.doctor.measure import DiagnoseConfig
    from opd.evaluation.accuracy import EvalConfig
    from opd.recipes.select_prompts import SelectConfig

    required = ["--student", "s", "--teacher", "t", "--prompts", "p.jsonl", "--out", "o"]
    for verb, given in ((DiagnoseConfig, []), (EvalConfig, []), (SelectConfig, required)):
        with pytest.raises(OPDError, match=r"^config: n was renamed samples_per_prompt$"):
            parse(verb, [*given, "--n", "2"])
    assert parse(EvalConfig, ["--samples-per-prompt", "3"]).samples_per_prompt == 3
    assert settings.build(TrainConfig, {"cold_start": {"samples_per_prompt": 2}}) \
        .cold_start.samples_per_prompt == 2
