"""The quick zoo shows the planted properties, shares one vocabulary and caches its stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from opd.data.prompts import load_prompts, render_prompt
from opd.errors import OPDError
from opd.lab import zoo as zoo_module
from opd.lab.zoo import PROFILES, build_zoo_stages, load_sets, model_folder
from opd.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.slow
Zoo = tuple[Path, dict[str, Any]]

EXPECTED = {
    "student", "teacher-aligned", "teacher-foreign", "teacher-same-pipeline",
    "teacher-aligned-template2", "student-prerl", "student-rl",
}


def load_zoo_model(root: Path, name: str, trainable: bool = False) -> tuple[Any, Any]:
    folder = str(model_folder(root, name))
    return load_model(folder, name, trainable=trainable), load_tokenizer(folder, name)


def acc(zoo: dict[str, Any], model: str, group: str) -> float:
    return zoo["models"][model]["accuracy"][group]


def test_zoo_json_describes_every_model(quick_zoo: Zoo) -> None:
    root, zoo = quick_zoo
    assert json.loads((root / "zoo.json").read_text()) == zoo
    assert set(zoo["models"]) == EXPECTED
    for name, entry in zoo["models"].items():
        assert (root / entry["folder"] / "config.json").exists(), name
        assert {"role", "dialect", "template", "trained_on", "parameters", "accuracy"} <= set(entry)
        assert set(zoo["sets"]) | {"student", "subskill"} >= set(entry["accuracy"])
    assert zoo["models"]["teacher-foreign"]["dialect"] == "B"
    assert zoo["models"]["teacher-aligned-template2"]["template"] == 2
    assert zoo["models"]["teacher-same-pipeline"]["trained_on"]["sets"] == ["student-train"]
    same, student = zoo["models"]["teacher-same-pipeline"], zoo["models"]["student"]
    assert (same["parameters"], same["trained_on"]["steps"]) > (
        student["parameters"], student["trained_on"]["steps"])  # larger, or as large and longer
    for name, info in zoo["sets"].items():
        assert len(load_prompts(root / info["path"])) == info["size"], name


def test_planted_properties(quick_zoo: Zoo) -> None:
    _, zoo = quick_zoo
    assert acc(zoo, "student", "student") >= 0.6
    assert acc(zoo, "student", "subskill") <= 0.4
    assert acc(zoo, "teacher-aligned", "subskill") >= acc(zoo, "student", "subskill") + 0.3
    assert acc(zoo, "teacher-foreign", "subskill") >= acc(zoo, "teacher-aligned", "subskill") - 0.05
    assert acc(zoo, "teacher-same-pipeline", "student") > acc(zoo, "student", "student")
    assert acc(zoo, "teacher-same-pipeline", "subskill") <= 0.4
    # Nothing new: the same-pipeline teacher is no better than the student at the sub-skill.
    assert acc(zoo, "teacher-same-pipeline", "subskill") <= acc(zoo, "student", "subskill") + 0.05
    # The RL stage plants a clear gain for reverse distillation to erase.
    assert acc(zoo, "student-rl", "subskill") >= acc(zoo, "student-prerl", "subskill") + 0.3
    assert acc(zoo, "teacher-aligned-template2", "subskill") >= 0.5
    assert acc(zoo, "student-prerl", "student") == acc(zoo, "student", "student")


def test_sets_are_disjoint_and_skill_pure(quick_zoo: Zoo) -> None:
    root, _ = quick_zoo
    sets = load_sets(root)
    pairs = {name: {(r.meta["a"], r.meta["b"]) for r in records} for name, records in sets.items()}
    held_out = set().union(*(p for name, p in pairs.items() if name.startswith("eval-")))
    for name, found in pairs.items():
        if not name.startswith("eval-"):
            assert not found & held_out, name
    assert {r.meta["skill"] for r in sets["student-train"]} == {"nocarry", "carry"}
    assert {r.meta["skill"] for r in sets["eval-chain-d2"]} == {"chain"}


def test_one_vocabulary_and_each_models_own_template(quick_zoo: Zoo) -> None:
    root, zoo = quick_zoo
    loaded = {name: load_zoo_model(root, name) for name in zoo["models"]}
    vocab = loaded["student"][1].get_vocab()
    messages = [{"role": "user", "content": "123 + 459"}]
    for name, (model, tokenizer) in loaded.items():
        assert tokenizer.get_vocab() == vocab, name
        assert model.config.vocab_size == len(vocab)
        starts = render_prompt(messages, tokenizer).split()[1]
        assert starts == ("question" if name == "teacher-aligned-template2" else "user"), name


def test_rebuild_loads_from_cache(quick_zoo: Zoo, monkeypatch: pytest.MonkeyPatch) -> None:
    root, zoo = quick_zoo

    def refuse(*args: Any, **kwargs: Any) -> list[float]:
        raise AssertionError("a cached stage was retrained")

    monkeypatch.setattr(zoo_module, "train_sft", refuse)
    assert build_zoo_stages(root, profile="quick", progress=False) == zoo


def test_interrupted_stage_leaves_no_complete_folder(tmp_path: Path) -> None:
    def crash(folder: Path) -> dict[str, Any]:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        zoo_module._run_stage(tmp_path, "student", "abc", crash)
    assert list(tmp_path.iterdir()) == []
    assert zoo_module._run_stage(tmp_path, "student", "abc", lambda folder: {"x": 1})["x"] == 1
    assert zoo_module._run_stage(tmp_path, "student", "abc", crash)["x"] == 1  # cached
    with pytest.raises(OPDError, match="no complete model"):
        model_folder(tmp_path, "teacher-aligned")


def test_unknown_profile_is_an_error(tmp_path: Path) -> None:
    assert set(PROFILES) == {"full", "quick", "choice"}
    with pytest.raises(OPDError, match="unknown profile"):
        build_zoo_stages(tmp_path, profile="huge")


def test_student_can_learn_the_subskill(quick_zoo: Zoo) -> None:
    """The gap is learnable: a short SFT on teacher-aligned's data lifts the chain accuracy."""
    from opd.lab.world import sft_examples
    from opd.lab.zoo import eval_set_accuracy
    from opd.run.sft import SFTConfig, train_sft

    root, zoo = quick_zoo
    model, tokenizer = load_zoo_model(root, "student", trainable=True)
    sets = load_sets(root)
    examples = sft_examples(sets["teacher-train"], "A", seed=0)
    train_sft(model, tokenizer, examples, SFTConfig(steps=40, lr=3e-4, warmup_steps=5,
                                                    progress=False))
    after = eval_set_accuracy(model, tokenizer, {"eval-chain-d2": sets["eval-chain-d2"]})
    assert after["eval-chain-d2"] >= acc(zoo, "student", "subskill") + 0.3
