"""Every verb, every class of bad input (issue 14): one line on stderr naming the field or file
and the fix, exit status 2, no traceback, and nothing written.

One table drives it. `VERBS` says, per verb, a valid invocation and which of its flags name a
model folder, a prompt file or an output folder, plus its own rows (config values, inputs only
it has). Each class of breakage (`MODEL_BREAKS`, `PROMPT_BREAKS`, `OUT_BREAKS`) is applied to
every such flag, so a new verb adds an entry to `VERBS` (rows), not test code.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

import opd.io
import opd.run.trackers
from opd.cli import main


# -- the workspace a row breaks -----------------------------------------------------------------
class Workspace:
    """A test's folder: the valid inputs every verb starts from, and broken copies of them."""

    def __init__(self, root: Path, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.tiny, self.monkeypatch = root, tiny, monkeypatch
        self.student, self.teacher = tiny["student"], tiny["teacher"]
        self.prompts = tiny["prompts"]
        self.out = root / "out"
        self.run = self._run_folder()
        self.locked: list[Path] = []

    def _run_folder(self) -> Path:
        run = self.root / "a-run"
        run.mkdir()
        records = [{"step": s, "loss": 1.0 / s, "student_entropy": 0.5} for s in (1, 2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return run

    def path(self, name: str) -> Path:
        return self.root / "inputs" / name

    def model(self, name: str, source: str = "student") -> Path:
        """A copy of the tiny student (or teacher) to break."""
        folder = self.path(name)
        shutil.copytree(self.tiny[source], folder)
        return folder

    def file(self, name: str, content: str | bytes) -> Path:
        file = self.path(name)
        file.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            file.write_bytes(content)
        else:
            file.write_text(content, encoding="utf-8")
        return file

    def jsonl(self, name: str, *rows: object) -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def folder(self, name: str) -> Path:
        folder = self.path(name)
        folder.mkdir(parents=True)
        return folder

    def unwritable(self, name: str) -> Path:
        """A folder this process cannot write in (as root, whom permissions do not bind, the
        check's view of it is made to say so)."""
        folder = self.folder(name)
        folder.chmod(0o555)
        self.locked.append(folder)
        if os.geteuid() == 0:
            real = opd.io._writable
            self.monkeypatch.setattr(opd.io, "_writable",
                                     lambda f: Path(f) != folder and real(f))
        return folder

    def unlock(self) -> None:
        for folder in self.locked:
            folder.chmod(0o755)


def edit_json(file: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def cut(file: Path, share: float) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * share)])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# -- how a model folder breaks ------------------------------------------------------------------
def _model(change: Callable[[Path], object], source: str = "student"):
    def make(ws: Workspace) -> Path:
        folder = ws.model("model", source)
        change(folder)
        return folder
    return make


def _drop_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors[next(k for k in sorted(tensors) if "layers.1" in k)]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _shard(folder: Path) -> None:
    names = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))


def _remote(config: dict) -> None:
    config.update(model_type="opd-custom", auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})


def _remote_tokenizer(settings: dict) -> None:
    settings.update(tokenizer_class="CustomTokenizer",
                    auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})


MODEL_BREAKS: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "missing folder": (lambda ws: ws.path("no-such-model"), "there is no folder"),
    "a file": (lambda ws: ws.file("model.bin", "x"), "is a file, not a model folder"),
    "empty folder": (lambda ws: ws.folder("empty-model"), "is an empty folder"),
    "no config.json": (_model(lambda f: (f / "config.json").unlink()), "config.json is missing"),
    "config.json cut short": (_model(lambda f: cut(f / "config.json", 0.5)),
                              "config.json is corrupt or cut short"),
    "config.json not an object": (_model(lambda f: (f / "config.json").write_text("[1]")),
                                  "config.json is corrupt"),
    "config.json without model_type": (
        _model(lambda f: edit_json(f / "config.json", lambda c: c.pop("model_type"))),
        "has no model_type"),
    "unknown model_type": (
        _model(lambda f: edit_json(f / "config.json", lambda c: c.update(model_type="zebra"))),
        "which transformers"),
    "no weights": (_model(lambda f: (f / "model.safetensors").unlink()), "no weights in"),
    "weights cut short": (_model(lambda f: cut(f / "model.safetensors", 0.6)),
                          "model.safetensors is corrupt or cut short"),
    "weights not safetensors": (_model(lambda f: (f / "model.safetensors").write_bytes(b"x" * 64)),
                                "model.safetensors is corrupt or cut short"),
    "index names a missing shard": (_model(_shard), "is missing (listed in model.safetensors"),
    "weights lack a tensor": (_model(_drop_tensor), "lack 1 of the model's tensors"),
    "weights do not fit config.json": (
        _model(lambda f: edit_json(f / "config.json", lambda c: c.update(intermediate_size=80))),
        "do not fit its config.json"),
    "no tokenizer": (_model(lambda f: [(f / n).unlink() for n in ("tokenizer.json",
                                                                   "tokenizer_config.json")]),
                     "no tokenizer in"),
    "tokenizer.json cut short": (_model(lambda f: cut(f / "tokenizer.json", 0.5)),
                                 "tokenizer.json is corrupt or cut short"),
    "tokenizer_config.json cut short": (_model(lambda f: cut(f / "tokenizer_config.json", 0.5)),
                                        "tokenizer_config.json is corrupt or cut short"),
    "remote model code without the flag": (
        _model(lambda f: edit_json(f / "config.json", _remote)),
        "asks to run its own Python code"),
    "remote tokenizer code without the flag": (
        _model(lambda f: edit_json(f / "tokenizer_config.json", _remote_tokenizer)),
        "pass --trust-remote-code"),
}
"""How a model folder breaks → the fragment its one line must hold (after `ROLE: `)."""


# -- how a prompt file breaks -------------------------------------------------------------------
def _parquet(ws: Workspace, name: str, share: float = 1.0) -> Path:
    file = ws.path(name)
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": ["1 + 2 =", "2 + 2 ="], "answer": ["3", "4"]}), file)
    cut(file, share)
    return file


LONG = " ".join(["1"] * 1100)
"""A prompt longer than every limit in the table (max_prompt_tokens 1024, context 128)."""
CONVERSATION = [{"role": "system", "content": "add"}, {"role": "user", "content": "1 + 2 ="}]

PROMPT_BREAKS: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "missing file": (lambda ws: ws.path("none.jsonl"), "does not exist"),
    "a folder": (lambda ws: ws.folder("prompts.jsonl"), "is a folder, not a prompt file"),
    "empty file": (lambda ws: ws.file("p.jsonl", "\n"), "holds no prompts"),
    "another suffix": (lambda ws: ws.file("p.csv", "prompt\n1 + 2 =\n"), "use .jsonl or .parquet"),
    ".parquet holding JSON lines": (lambda ws: ws.file("p.parquet", '{"prompt": "1 + 2 ="}\n'),
                                    "is not a readable parquet file"),
    ".jsonl holding parquet": (lambda ws: ws.file("p.jsonl", _parquet(ws, "real.parquet").read_bytes()),
                               "is a parquet file named .jsonl"),
    "parquet cut short": (lambda ws: _parquet(ws, "p.parquet", 0.7), "is not a readable parquet file"),
    "jsonl cut short": (lambda ws: ws.file("p.jsonl", '{"prompt": "1 + 2 =", "answer": "3"}\n{"pro'),
                        ":2 is not valid JSON"),
    ".json array cut short": (lambda ws: ws.file("p.json", '[{"prompt": "1 + 2 ="}, {"pro'),
                              "is not valid JSON"),
    "latin-1 text": (lambda ws: ws.file("p.jsonl", '{"prompt": "caf\xe9 1 ="}\n'.encode("latin-1")),
                     ":1 is not UTF-8 text"),
    "utf-16 text": (lambda ws: ws.file("p.jsonl", '{"prompt": "1 ="}\n'.encode("utf-16")),
                    "is not UTF-8 text"),
    "row not an object": (lambda ws: ws.jsonl("p.jsonl", ["1 + 2 ="]), "is a JSON list, not an object"),
    "no prompt field": (lambda ws: ws.jsonl("p.jsonl", {"question": "1 + 2 ="}),
                        "no 'prompt' or 'messages' field (it has 'question')"),
    "prompt of another type": (lambda ws: ws.jsonl("p.jsonl", {"prompt": 5}),
                               "must be a string or a list"),
    "message without text": (lambda ws: ws.jsonl("p.jsonl", {"messages": [{"role": "user"}]}),
                             "message 1 needs a 'role' and a text 'content'"),
    "empty prompt": (lambda ws: ws.jsonl("p.jsonl", {"prompt": "1 =", "answer": "1"},
                                         {"prompt": "  ", "answer": "1"}),
                     "row 2: the prompt is empty"),
    "no messages": (lambda ws: ws.jsonl("p.jsonl", {"messages": []}), "the prompt has no messages"),
    "duplicated ids": (lambda ws: ws.jsonl("p.jsonl", {"id": 7, "prompt": "1 =", "answer": "1"},
                                           {"id": 7, "prompt": "2 =", "answer": "2"}),
                       "rows 1 and 2 share the id 7"),
    "over-long prompt": (lambda ws: ws.jsonl("p.jsonl", {"prompt": LONG, "answer": "1"}),
                         "row 1: the prompt is 11"),
    "conversation without a chat template": (
        lambda ws: ws.jsonl("p.jsonl", {"messages": CONVERSATION, "answer": "3"}),
        "needs a chat template"),
}
"""How a prompt file breaks → the fragment its one line must hold (after `FIELD: `)."""


OUT_BREAKS: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "a file": (lambda ws: ws.file("out-file", "x"), "is a file, not a folder"),
    "under a file": (lambda ws: ws.file("out-file", "x") / "run", "cannot be made under it"),
    "not writable": (lambda ws: ws.unwritable("locked") / "run", "cannot write in"),
}
"""How an output folder breaks → the fragment its one line must hold (after `FIELD: `)."""


# -- the verbs ----------------------------------------------------------------------------------
Change = Callable[[Workspace, list[str]], list[str]]


@dataclass(frozen=True)
class Verb:
    """A verb as the sweep sees it: a valid invocation and the flags whose inputs break."""

    argv: Callable[[Workspace], list[str]]
    models: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    out: str | None = None
    rows: tuple[tuple[str, Change, str], ...] = ()
    """The verb's own rows: (what is bad, how to change the argv, the message fragment)."""
    skip: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    """(flag, breakage) pairs that are not bad input for this verb."""


def with_flag(flag: str, value: object) -> Change:
    """Set `flag` (replacing it, or adding it) to `value`, or to `value(ws)` when callable."""
    def change(ws: Workspace, argv: list[str]) -> list[str]:
        given = str(value(ws) if callable(value) else value)
        if flag in argv:
            argv[argv.index(flag) + 1] = given
            return argv
        return [*argv, flag, given]
    return change


def adding(*extra: str) -> Change:
    return lambda ws, argv: [*argv, *extra]


TRAIN_RUN = ["--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2",
             "--max-new-tokens", "4", "--set", "progress=false"]
NO_ANSWERS = lambda ws: ws.jsonl("no-answer.jsonl", {"prompt": "1 + 2 ="})  # noqa: E731
def config_rows(float_key: str | None, int_key: str | None = "max_new_tokens") -> tuple:
    """Config rows every verb with a config dataclass has (on one of its int and float keys)."""
    rows = [
        ("unknown key", adding("--set", "temprature=1"), "config: unknown key 'temprature'"),
        ("config file missing", adding("--config", "nope.yaml"),
         "--config: file 'nope.yaml' does not exist"),
        ("config file not YAML", lambda ws, a: [*a, "--config", str(ws.file("c.yaml", "a: [1\n"))],
         "c.yaml:2 is not valid YAML"),
        ("config file not a mapping", lambda ws, a: [*a, "--config", str(ws.file("c.yaml", "- 1\n"))],
         "must hold a mapping"),
    ]
    if int_key:
        rows += [(f"{int_key} out of range", adding("--set", f"{int_key}=0"),
                  f"config: {int_key} must be at least 1, got 0"),
                 (f"{int_key} of the wrong type", adding("--set", f"{int_key}=many"),
                  f"config: {int_key} must be a int, got 'many'")]
    if float_key:
        rows += [(f"{float_key} nan", adding("--set", f"{float_key}=nan"),
                  f"config: {float_key} must be a finite number"),
                 (f"{float_key} value not YAML", adding("--set", f"{float_key}=[1"),
                  f"--set: the value of '{float_key}' is not valid YAML")]
    return tuple(rows)




def column_rows() -> tuple:
    """Rows every verb that reads prompts has: a mapped column its prompt file lacks (issue 13's
    prompt_field / answer_field / split settings)."""
    return (
        ("prompt column missing", adding("--prompt-field", "question"),
         "no column 'question' (prompt_field) or 'messages' (messages_field); its columns are"),
        ("answer column missing", adding("--answer-field", "solution.final"),
         "no column 'solution.final' (answer_field); its columns are"),
        ("split missing from a saved dataset", _saved_dataset, "has no split 'dev'; its splits are"),
    )


def _saved_dataset(ws: Workspace, argv: list[str]) -> list[str]:
    """--prompts a DatasetDict written by save_to_disk, and a --split it does not hold."""
    import datasets
    folder = ws.path("saved")
    rows = [{"prompt": f"{a} + 1 =", "answer": str(a + 1)} for a in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    return [*with_flag("--prompts", folder)(ws, argv), "--split", "dev"]


def _tracker_missing(ws: Workspace, argv: list[str]) -> list[str]:
    ws.monkeypatch.setattr(opd.run.trackers, "is_installed", lambda module: False)
    return [*argv, "--report-to", "tensorboard"]


def _resumable(ws: Workspace, argv: list[str], *extra: str) -> list[str]:
    """A run in --out already (made by the verb itself), then `argv` again (with `extra`)."""
    assert main(argv) == 0
    return [*argv, *(["--resume", *extra] if extra else [])]


def _run_without_checkpoint(ws: Workspace, argv: list[str]) -> list[str]:
    """A run in --out killed before its first checkpoint, then `--resume auto`."""
    ws.out.mkdir()
    (ws.out / "metrics.jsonl").write_text('{"step": 1}\n')
    return [*argv, "--resume", "auto"]


def _clashing_ids(ws: Workspace, argv: list[str]) -> list[str]:
    argv = with_flag("--prompts", ws.jsonl("ids.jsonl", {"id": 1, "prompt": "1 ="}))(ws, argv)
    return [*argv, "--other-prompts", str(ws.jsonl("others.jsonl", {"id": 1, "prompt": "2 ="}))]


def _damage(ws: Workspace, metrics: str | bytes | None, summary: str | None = None) -> list[str]:
    run = ws.folder("damaged-run")
    if metrics is None:
        metrics = (ws.run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_bytes(metrics if isinstance(metrics, bytes) else metrics.encode())
    if summary is not None:
        (run / "summary.json").write_text(summary)
    return ["report", str(run)]


def _locked_run(ws: Workspace) -> Path:
    run = ws.path("locked-run")
    shutil.copytree(ws.run, run)
    run.chmod(0o555)
    ws.locked.append(run)
    if os.geteuid() == 0:
        real = opd.io._writable
        ws.monkeypatch.setattr(opd.io, "_writable", lambda f: Path(f) != run and real(f))
    return run


def _teachers_url(url: str) -> Change:
    """`teachers: {math: url}` in place of --teacher."""
    def change(ws: Workspace, argv: list[str]) -> list[str]:
        at = argv.index("--teacher")
        return [*argv[:at], *argv[at + 2:], "--set", f"teachers={{math: '{url}'}}"]
    return change


def _public_host(ws: Workspace, argv: list[str]) -> list[str]:
    ws.monkeypatch.delenv("OPD_TEACHER_API_KEY", raising=False)
    return [*argv, "--host", "0.0.0.0"]


def _damaged_stage(ws: Workspace, argv: list[str]) -> list[str]:
    stage = ws.out / "quick" / "data"
    stage.mkdir(parents=True)
    (stage / "stage.json").write_text('{"fingerprint": ')
    return argv


VERBS: dict[str, Verb] = {
    "train": Verb(
        lambda ws: ["train", "--student", str(ws.student), "--teacher", str(ws.teacher),
                    "--prompts", str(ws.prompts), "--out", str(ws.out), *TRAIN_RUN],
        models=("--student", "--teacher"), prompts=("--prompts", "--eval-prompts"), out="--out",
        rows=(*config_rows("temperature"),
              ("top_p out of range", adding("--set", "top_p=2"), "config: top_p must lie in (0, 1]"),
              ("steps below 1", adding("--max-steps", "0"), "config: max_steps must be at least 1"),
              ("staleness below 0", adding("--set", "max_staleness=-1"),
               "config: max_staleness must be at least 0"),
              ("rollouts ahead on the vllm engine",
               adding("--set", "max_staleness=2", "--set", "rollout_engine=vllm"),
               "max_staleness: rollouts ahead of the update need rollout_engine=hf"),
              ("forward KL ahead without a tis_cap",
               adding("--set", "max_staleness=1", "--set", "objective.name=forward_kl"),
               "stale_loss: tis (the default for forward_kl) weights each stale token"),
              ("unknown stale_loss", adding("--set", "stale_loss=reuse"),
               "config: stale_loss must be one of"),
              ("template without {prompt}", adding("--template", "Q: {question}"),
               "config: template must be a format string whose only field is {prompt}"),
              ("lr of the wrong type", adding("--set", "lr=abc"), "config: lr must be a float"),
              ("eval prompts without answers", with_flag("--eval-prompts", NO_ANSWERS),
               "eval_prompts: row 1 has no 'answer'"),
              ("unknown profile", adding("--profile", "gpu-huge"), "profile: unknown value"),
              ("resume with other settings", lambda ws, a: _resumable(ws, a, "--seed", "5"),
               "--resume: the run in"),
              ("existing run without --resume", lambda ws, a: _resumable(ws, a),
               "already holds a run; pass --resume"),
              ("resume auto over a run without a checkpoint", _run_without_checkpoint,
               "--resume auto: "),
              ("unknown tracker", adding("--report-to", "comet"),
               "config: report_to must be each one of"),
              ("tracker not installed", _tracker_missing,
               'report_to: tensorboard is not installed; pip install "opd[tensorboard]"'),
              ("teachers entry a URL without a host", _teachers_url("http://"),
               "teachers.math: 'http://' is not a teacher URL (it names no host)"),
              *column_rows()),
    ),
    "grpo": Verb(
        lambda ws: ["grpo", "--student", str(ws.student), "--prompts", str(ws.prompts),
                    "--out", str(ws.out), *TRAIN_RUN],
        models=("--student",), prompts=("--prompts",), out="--out",
        rows=(*config_rows("lr"),
              ("one rollout per group", adding("--samples-per-prompt", "1"),
               "needs samples_per_prompt"),
              ("prompts without answers", with_flag("--prompts", NO_ANSWERS),
               "prompts: row 1 has no 'answer'; outcome_weight > 0 needs"),
              *column_rows()),
    ),
    "eval": Verb(
        lambda ws: ["eval", "--model", str(ws.student), "--prompts", str(ws.prompts),
                    "--max-new-tokens", "4"],
        models=("--model",), prompts=("--prompts",),
        rows=(*config_rows("temperature"),
              ("samples below 1", adding("--samples-per-prompt", "0"),
               "config: samples_per_prompt must be at least 1"),
              ("unknown verifier", adding("--verifier", "fuzzy"), "config: verifier must be one of"),
              ("template with a stray brace", adding("--template", "{prompt} {"),
               "config: template must be a format string"),
              ("prompts without answers", with_flag("--prompts", NO_ANSWERS),
               "prompts: row 1 has no 'answer'; evaluation needs"),
              *column_rows()),
    ),
    "diagnose": Verb(
        lambda ws: ["diagnose", "--student", str(ws.student), "--teacher", str(ws.teacher),
                    "--prompts", str(ws.prompts), "--out", str(ws.out), "--num-prompts", "4",
                    "--samples-per-prompt", "2", "--max-new-tokens", "4", "--no-progress"],
        models=("--student", "--teacher", "--teacher2"), prompts=("--prompts",), out="--out",
        rows=(*config_rows("top_p"),
              ("depths not increasing", adding("--depths", "0.5,0.25"), "depths must be increasing"),
              ("k below 1", adding("--k", "4,0"), "config: k must be at least 1, got (4, 0)"),
              ("teacher template without {prompt}", adding("--teacher-template", "plain"),
               "config: teacher_template must contain {prompt}"),
              ("no teacher", lambda ws, a: a[: a.index("--teacher")] + a[a.index("--teacher") + 2:],
               "teacher: no model given; pass --teacher"),
              ("teacher2 a URL without a host", adding("--teacher2", "http:///x"),
               "teacher2: 'http:///x' is not a teacher URL"),
              *column_rows()),
    ),
    "cold-start": Verb(
        lambda ws: ["cold-start", "--student", str(ws.student), "--teacher", str(ws.teacher),
                    "--prompts", str(ws.prompts), "--out", str(ws.out), *TRAIN_RUN,
                    "--set", "cold_start.sft_steps=1"],
        models=("--student", "--teacher"), prompts=("--prompts", "--cold-start.prompts"),
        out="--out",
        rows=(*config_rows("cold_start.temperature"),
              ("sft lr of 0", adding("--cold-start.sft-lr", "0"),
               "config: cold_start.sft_lr must be positive"),
              ("unknown keep", adding("--set", "cold_start.keep=some"),
               "config: cold_start.keep must be one of"),
              ("validation share above one half",
               adding("--cold-start.sft-validation-share", "0.9"),
               "config: cold_start.sft_validation_share must lie in (0, 0.5], got 0.9"),
              ("patience of 0", adding("--cold-start.sft-patience", "0"),
               "config: cold_start.sft_patience must be at least 1, got 0"),
              ("teacher URL with a port that is no number", with_flag("--teacher", "http://h:port"),
               "teacher: 'http://h:port' is not a teacher URL (its port is not a number"),
              ("keep correct without answers",
               lambda ws, a: with_flag("--cold-start.prompts", NO_ANSWERS)(
                   ws, [*a, "--set", "cold_start.keep=correct"]),
               "cold_start.prompts: row 1 has no 'answer'"),
              *column_rows()),
    ),
    "select-prompts": Verb(
        lambda ws: ["select-prompts", "--student", str(ws.student), "--teacher", str(ws.teacher),
                    "--prompts", str(ws.prompts), "--out", str(ws.out), "--teacher-template",
                    "a b {prompt}", "--num-prompts", "4", "--samples-per-prompt", "2",
                    "--max-new-tokens", "4", "--k", "4", "--trial-steps", "1", "--no-progress"],
        models=("--student", "--teacher"), prompts=("--prompts", "--other-prompts"), out="--out",
        rows=(*config_rows("keep_fraction"),
              ("keep fraction of 0", adding("--keep-fraction", "0"), "keep_fraction must lie in (0, 1]"),
              ("mix share of 1", adding("--mix-share", "1"), "config: mix_share must lie in [0, 1)"),
              ("teacher URL without a host", with_flag("--teacher", "https://"),
               "teacher: 'https://' is not a teacher URL"),
              ("unknown rank measure", adding("--rank-by", "loudness"),
               "config: rank_by must be each one of"),
              ("trial setting of the wrong type", adding("--set", "trial_settings.lr=abc"),
               "config: trial_settings.lr must be a float"),
              ("teacher without a chat template",
               lambda ws, a: a[: a.index("--teacher-template")] + a[a.index("--teacher-template") + 2:],
               "template: the prompts are to be rendered with the teacher's template"),
              ("other prompts repeating a candidate's id", _clashing_ids,
               "has the id 1 of a candidate in --prompts"),
              *column_rows()),
        # Mixed-in prompts are rendered with the teacher's format string only, which takes the
        # last user message: a conversation is no bad input there.
        skip=frozenset({("--other-prompts", "conversation without a chat template")}),
    ),
    "report": Verb(
        lambda ws: ["report", str(ws.run)],
        rows=(
            ("run folder missing", lambda ws, a: ["report", str(ws.path("no-run"))], "does not exist"),
            ("run folder is a file", lambda ws, a: ["report", str(ws.file("run.txt", "x"))], "is a file"),
            ("not a run folder", lambda ws, a: ["report", str(ws.folder("not-a-run"))],
             "is not a run folder (no metrics.jsonl in it)"),
            ("metrics damaged before the last line",
             lambda ws, a: _damage(ws, '{"step": 1\n{"step": 2}\n'),
             ":1 is not valid JSON; the file is damaged"),
            ("metrics with no steps", lambda ws, a: _damage(ws, ""), "holds no steps yet"),
            ("metrics not UTF-8", lambda ws, a: _damage(ws, b'{"step": 1, "x": "\xff"}\n'),
             "is not UTF-8 text"),
            ("metrics line not a step record", lambda ws, a: _damage(ws, '{"step": 1}\n[2]\n{"step": 3}\n'),
             ":2 is not a step record"),
            ("summary.json damaged", lambda ws, a: _damage(ws, None, summary='{"steps": '),
             "summary.json is damaged"),
            ("run folder not writable", lambda ws, a: ["report", str(_locked_run(ws))], "cannot write in"),
            ("--compare not a figure name", adding("--compare", "curves.txt"),
             "--compare: 'curves.txt' must name a"),
            ("--compare a folder", lambda ws, a: [*a, "--compare", str(ws.folder("figs"))], "is a folder"),
            ("--compare under a file", lambda ws, a: [*a, "--compare", str(ws.file("f", "x") / "c.png")],
             "compare: "),
        ),
    ),
    "serve-teacher": Verb(
        lambda ws: ["serve-teacher", "--model", str(ws.teacher), "--port", "0"],
        models=("--model",),
        rows=(*config_rows(None, "batch_tokens"),
              ("port out of range", adding("--port", "70000"),
               "config: port must lie in [0, 65535], got 70000"),
              ("another host without a key", _public_host, "api_key: binding 0.0.0.0"),
              ("unknown backend", adding("--backend", "tgi"), "config: backend must be one of")),
    ),
    "reproduce": Verb(
        lambda ws: ["reproduce", "--out", str(ws.out), "--zoo", str(ws.path("zoo")),
                    "--no-progress"],
        out="--out",
        rows=(*config_rows(None, "seeds"),
              ("unknown finding", adding("--only", "telepathy"), "only: unknown finding 'telepathy'"),
              ("unknown profile", adding("--profile", "huge"), "config: profile must be one of"),
              ("zoo cache under a file", with_flag("--zoo", lambda ws: ws.file("zoo-file", "x") / "z"),
               "zoo: ")),
    ),
    "demo": Verb(
        lambda ws: ["demo", "--quick", "--out", str(ws.out), "--cache", str(ws.path("cache"))],
        out="--out",
        rows=(*config_rows(None, None),
              ("seed of the wrong type", adding("--set", "seed=first"), "config: seed must be a int"),
              ("zoo cache under a file", with_flag("--cache", lambda ws: ws.file("cache-file", "x") / "c"),
               "cache: ")),
    ),
    "lab build": Verb(
        lambda ws: ["lab", "build", "--profile", "quick", "--root", str(ws.out)],
        out="--root",
        rows=(*config_rows(None, None),
              ("unknown profile", adding("--profile", "huge"), "config: profile must be one of"),
              ("damaged cached stage", lambda ws, a: _damaged_stage(ws, a), "is damaged (stage.json")),
    ),
}
"""Every verb `opd --help` lists (`lab` through its one verb, `lab build`)."""


def _role(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _rows() -> list:
    rows = []
    for name, verb in VERBS.items():
        breaks = [(flag, MODEL_BREAKS) for flag in verb.models]
        breaks += [(flag, PROMPT_BREAKS) for flag in verb.prompts]
        breaks += [(verb.out, OUT_BREAKS)] if verb.out else []
        for flag, table in breaks:
            for what, (make, fragment) in table.items():
                if (flag, what) not in verb.skip:
                    rows.append(pytest.param(name, with_flag(flag, make), f"{_role(flag)}: ",
                                             fragment, id=f"{name} {flag} {what}"))
        for what, change, fragment in verb.rows:
            rows.append(pytest.param(name, change, "", fragment, id=f"{name} {what}"))
    return rows


ROWS = _rows()


@pytest.fixture
def ws(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workspace = Workspace(tmp_path, tiny_pair, monkeypatch)
    yield workspace
    workspace.unlock()


@pytest.fixture
def library_logs(capfd):
    """transformers' log handler writes to the captured stderr at its default verbosity, as in a
    user's shell, wherever an earlier test left it (its handler keeps the stream it first saw)."""
    handler = hf_logging._default_handler
    stream, verbosity = handler.stream, hf_logging.get_verbosity()
    handler.setStream(sys.stderr)
    hf_logging.set_verbosity_warning()
    yield capfd
    handler.setStream(stream)
    hf_logging.set_verbosity(verbosity)


def progress_line(line: str) -> bool:
    return "%|" in line or "it/s]" in line


@pytest.mark.parametrize(("verb", "change", "role", "fragment"), ROWS)
def test_bad_input_is_one_line_exit_2_and_nothing_written(ws, library_logs, verb, change, role,
                                                           fragment):
    capfd = library_logs
    argv = change(ws, VERBS[verb].argv(ws))
    capfd.readouterr()
    before = snapshot(ws.root)
    code = main(argv)
    err = capfd.readouterr().err  # the file descriptor: library logging and warnings count too
    lines = [line for line in err.splitlines() if line.strip() and not progress_line(line)]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"opd {verb}: error: {role}"), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(ws.root) == before, "something was written"


def test_the_table_covers_every_verb_and_class():
    """The closing note's counts: classes of bad input tried per verb."""
    per_verb = {name: sum(1 for r in ROWS if r.values[0] == name) for name in VERBS}
    assert set(per_verb) == {"train", "grpo", "eval", "diagnose", "cold-start", "select-prompts",
                             "report", "lab build", "serve-teacher", "reproduce", "demo"}
    assert all(count >= 2 for count in per_verb.values()), per_verb


@pytest.mark.parametrize("url", ["http://", "http://host:notaport", "http:///x"])
@pytest.mark.parametrize("verb", ["train", "diagnose", "cold-start", "select-prompts"])
def test_a_malformed_teacher_url_is_refused_at_once(ws, capfd, verb, url):
    """Not retried for teacher_timeout (60 s) as if the server were down."""
    started = time.monotonic()
    code = main(with_flag("--teacher", url)(ws, VERBS[verb].argv(ws)))
    assert time.monotonic() - started < 5
    assert code == 2 and f"teacher: {url!r} is not a teacher URL" in capfd.readouterr().err


@pytest.mark.parametrize("verb", ["train", "grpo", "eval", "report"])
def test_the_valid_invocation_each_row_breaks_runs(ws, verb):
    assert main(VERBS[verb].argv(ws)) == 0
