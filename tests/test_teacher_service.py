"""The teacher as a service: a served teacher trains exactly like the in-process one, refuses
what it cannot do, survives its own disappearance, and answers bad requests with a status and
one line naming the field or the limit. Servers run on 127.0.0.1 on free ports."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from opd import metrics as M
from opd.cli import main
from opd.config.settings import build
from opd.errors import OPDError
from opd.recipes.cold_start import run_cold_start
from opd.run.folder import RunFolder
from opd.run.loop import run_training
from opd.teachers.client import TeacherClient, TeacherUnavailable
from opd.teachers.protocol import API_KEY_ENV, GenerateRequest
from opd.teachers.server import ServeConfig
from tests.conftest import make_model
from tests.support import (
    COLD,
    KillAt,
    assert_close,
    assert_records_close,
    free_port,
    select_args,
    serving,
    tiny_config,
    without_times,
)


@pytest.fixture(scope="module")
def served(tiny_pair):
    with serving(tiny_pair["teacher"]) as (url, _):
        yield url


OBJECTIVES = [
    {"objective.name": "sampled"},
    *({"objective.name": "topk", "objective.strategy": s}
      for s in ("student", "teacher", "intersection", "union", "symmetric-difference")),
    {"objective.name": "topk", "objective.strategy": "union", "objective.weighting": "teacher_p"},
    {"objective.name": "topk", "objective.strategy": "student", "objective.weighting": "none"},
    {"objective.name": "subset_kl", "objective.strategy": "student"},
    {"objective.name": "subset_kl", "objective.strategy": "teacher",
     "objective.teacher_temperature": 0.7},
]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: "-".join(map(str, o.values())))
def test_a_served_teacher_trains_exactly_like_the_local_one(tiny_pair, served, tmp_path,
                                                            objective):
    """Loss, gradient norm and every measure (overall and by position) of fixed-seed steps,
    within 1e-5; the second step runs on the once-updated student."""
    settings = {"max_steps": 2, "save_every": 10, "objective.k": 5, "measure_k": 3, **objective}
    run_training(tiny_config(tiny_pair, tmp_path / "local", **settings))
    run_training(tiny_config(tiny_pair, tmp_path / "served", teacher=served, **settings))
    local, remote = M.read(tmp_path / "local"), M.read(tmp_path / "served")
    assert local[0][M.TEACHER_ENTROPY] is not None and local[0][M.GRAD_NORM] > 0
    assert_records_close(local, remote)


@pytest.mark.parametrize("objective", ["full_reverse_kl", "forward_kl", "jsd"])
def test_full_distribution_objectives_refuse_a_served_teacher_at_the_start(tiny_pair, tmp_path,
                                                                           objective, capsys):
    code = main(["train", "--student", str(tiny_pair["student"]), "--teacher",
                 "http://127.0.0.1:9", "--prompts", str(tiny_pair["prompts"]), "--out",
                 str(tmp_path / "run"), "--set", f"objective.name={objective}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"objective.name: {objective} needs the teacher's whole distribution" in err
    assert "sampled, topk, subset_kl" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verb", ["eval --model", "diagnose --student", "cold-start --student"])
def test_only_teachers_may_be_served(tiny_pair, tmp_path, verb, capsys):
    code = main([*verb.split(), "http://127.0.0.1:9", "--teacher", str(tiny_pair["teacher"]),
                 "--prompts", str(tiny_pair["prompts"]), "--out", str(tmp_path / "out")]
                if verb != "eval --model" else
                [*verb.split(), "http://127.0.0.1:9", "--prompts", str(tiny_pair["prompts"])])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1
    assert ("'http://127.0.0.1:9' is the URL of a served teacher; give a model folder here (only "
            "teachers may be served: --teacher URL)") in errors[0]
    assert not (tmp_path / "out").exists()


DIAGNOSE = ["--num-prompts", "8", "--samples-per-prompt", "2", "--max-new-tokens", "6", "--no-progress"]
CHAT_TEMPLATE = "{% for m in messages %}answer {{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def templated(tiny_pair, tmp_path_factory):
    """The tiny teacher with a chat template of its own (the student has none), and its URL."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("templated") / "teacher"
    shutil.copytree(tiny_pair["teacher"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    with serving(folder) as (url, _):
        yield folder, url


def test_a_served_teachers_tokenizer_comes_with_its_chat_template(templated):
    folder, url = templated
    client = TeacherClient(url)
    tokenizer = client.tokenizer("teacher")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(folder).get_vocab()
    assert "generation_config.json" in client.files


def test_a_tokenizer_file_name_that_is_a_path_is_refused(monkeypatch):
    """The client writes the served files into a folder of its own, by their bare names."""
    client = TeacherClient("http://127.0.0.1:9")
    monkeypatch.setattr(client, "call", lambda path: {"files": {"../tokenizer.json": "{}"}})
    with pytest.raises(OPDError, match=r"^teacher: http://127.0.0.1:9 sent a tokenizer file named "
                       r"'\.\./tokenizer\.json', not a plain file name"):
        client.tokenizer("teacher")


def test_diagnose_against_a_served_teacher_equals_the_local_diagnosis(tiny_pair, templated,
                                                                     tmp_path):
    """Every measure, the template check, the teacher's own attempts and continuations, and
    the verdict; the served teacher's tokenizer and chat template come from the server."""
    folder, url = templated
    common = ["diagnose", "--student", str(tiny_pair["student"]), "--prompts",
              str(tiny_pair["prompts"]), *DIAGNOSE]
    assert main([*common, "--teacher", str(folder), "--out", str(tmp_path / "l")]) == 0
    assert main([*common, "--teacher", url, "--out", str(tmp_path / "s")]) == 0
    local, remote = (json.loads((tmp_path / name / "diagnosis.json").read_text())
                     for name in ("l", "s"))
    assert remote["teacher"].pop("path") == url and remote["teacher"]["entropy"] == "exact"
    local["teacher"].pop("path")
    assert local["teacher"]["continuation"] and local["teacher"]["template"]["applies"]
    assert local["teacher"]["template"]["example_own"] == "<bos> answer 3 + 0 ="
    assert_close(local["teacher"], remote["teacher"])
    assert_close(local["student"], remote["student"])
    assert remote["verdict"] == local["verdict"]
    assert remote["cost"]["teacher_rollouts"] == local["cost"]["teacher_rollouts"] > 0


def test_select_prompts_against_a_served_teacher_equals_the_local_selection(tiny_pair, templated,
                                                                           tmp_path):
    """The ranking (step-0 measures and advantage per prompt), the prompts written in the
    teacher's chat template (from the server), and the trial runs against the served teacher."""
    folder, url = templated
    selections = {}
    for name, teacher in (("local", str(folder)), ("served", url)):
        args = select_args(tiny_pair, tmp_path / name, "--rank-by", "overlap_ratio,advantage",
                           "--keep-fraction", "0.5")
        args[args.index("--teacher") + 1] = teacher
        assert main(args) == 0
        selections[name] = json.loads((tmp_path / name / "selection.json").read_text())
        for trial in selections[name]["trial"].values():
            if isinstance(trial, dict):
                trial.pop("run")
    local, remote = selections["local"], selections["served"]
    written = (tmp_path / "served" / "prompts.jsonl").read_text().splitlines()
    assert all(json.loads(row)["prompt"].startswith("answer ") for row in written)
    for key in ("counts", "prompts", "step0", "trial"):
        assert_close(local[key], remote[key], key)
    assert (tmp_path / "local" / "prompts.jsonl").read_text() == (
        tmp_path / "served" / "prompts.jsonl").read_text()


def test_cold_start_with_a_served_teacher_equals_the_local_one(tiny_pair, served, tmp_path):
    """The teacher data (sampled on the server), the SFT, the gate (its pattern check and the
    teacher's held-out accuracy through the server) and the OPD stage."""
    reports = {}
    for name, teacher in (("local", str(tiny_pair["teacher"])), ("served", served)):
        config = tiny_config(tiny_pair, tmp_path / name, teacher=teacher, max_steps=1,
                             cold_start=COLD)
        reports[name] = run_cold_start(config, force=True)
    data = [(tmp_path / name / "teacher_data.jsonl").read_text() for name in ("local", "served")]
    assert data[0] and data[0] == data[1]
    for report in reports.values():
        for stage in ("teacher_data", "sft", "gate"):
            report[stage].pop("seconds", None)
    for stage in ("teacher_data", "sft", "gate"):
        assert_close(reports["local"][stage], reports["served"][stage], stage)
    assert reports["served"]["gate"]["accuracy"]["teacher"] is not None
    assert_records_close(M.read(tmp_path / "local" / "opd"), M.read(tmp_path / "served" / "opd"))


def test_diagnose_compares_a_served_teacher2_but_not_a_served_first_teacher(tiny_pair, served,
                                                                           tmp_path, capsys):
    common = ["diagnose", "--student", str(tiny_pair["student"]), "--prompts",
              str(tiny_pair["prompts"]), *DIAGNOSE]
    code = main([*common, "--teacher", served, "--teacher2", str(tiny_pair["teacher"]),
                 "--out", str(tmp_path / "refused")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1
    assert ("teacher: comparing it with teacher2 needs its whole distribution, which a served "
            "teacher does not send; give the first teacher as a model folder") in errors[0]
    assert not (tmp_path / "refused").exists()
    assert main([*common, "--teacher", str(tiny_pair["teacher"]), "--teacher2", served,
                 "--out", str(tmp_path / "s")]) == 0
    assert main([*common, "--teacher", str(tiny_pair["teacher"]), "--teacher2",
                 str(tiny_pair["teacher"]), "--out", str(tmp_path / "l")]) == 0
    local, remote = (json.loads((tmp_path / name / "diagnosis.json").read_text())
                     for name in ("l", "s"))
    for diagnosis in (local, remote):
        diagnosis["teacher2"].pop("path")
    assert_close(local["teacher2"], remote["teacher2"])
    assert remote["teacher2"]["versus_teacher"]["overlap_share"] == pytest.approx(1.0)


def test_a_served_teacher_with_a_sharded_student_on_several_processes_is_refused(tiny_pair,
                                                                                tmp_path):
    from types import SimpleNamespace

    from opd.teachers.build import build_teachers

    config = tiny_config(tiny_pair, tmp_path / "run", teacher="http://127.0.0.1:9",
                         parallel="fsdp")
    two = SimpleNamespace(world=2, device=torch.device("cpu"))
    with pytest.raises(OPDError, match="parallel: a served teacher works with parallel ddp"):
        build_teachers(config, models=None, records=[], procs=two)


def test_teacher_prompt_own_refuses_a_served_teacher(tiny_pair, tmp_path):
    with pytest.raises(OPDError, match="teacher_prompt: `own` needs the teacher's tokenizer"):
        tiny_config(tiny_pair, tmp_path / "run", teacher="http://127.0.0.1:9",
                    teacher_prompt="own")


def test_a_teacher_with_another_vocabulary_is_refused_before_the_first_step(tiny_pair, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(28)]]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    folder = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with serving(folder) as (url, _), pytest.raises(OPDError, match="has another vocabulary"):
        run_training(tiny_config(tiny_pair, tmp_path / "run", teacher=url))
    assert not (tmp_path / "run").exists()


def test_killed_teacher_stops_the_run_cleanly_and_resume_equals_the_whole_run(tiny_pair,
                                                                              tmp_path):
    """The server goes away after step 3 is logged (last checkpoint: step 2): the run stops
    after teacher_timeout with one line, keeps checkpoint 2; with the teacher back on the same
    port, --resume writes exactly the uninterrupted run's metrics."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"teacher": url, "teacher_timeout": 1.0}
    with serving(tiny_pair["teacher"], port):
        run_training(tiny_config(tiny_pair, tmp_path / "whole", **settings))

    class StopTeacherAfter(KillAt):
        def __init__(self, step, stop):
            super().__init__(step)
            self.stop = stop

        def on_step(self, record):
            if record[M.STEP] == self.step:
                self.stop()
            return False

    with serving(tiny_pair["teacher"], port) as (_, stop):
        started = time.monotonic()
        with pytest.raises(TeacherUnavailable) as stopped:
            run_training(tiny_config(tiny_pair, tmp_path / "killed", **settings),
                         hooks=[StopTeacherAfter(3, stop)])
    message = str(stopped.value)
    assert len(message.splitlines()) == 1
    assert "did not answer for teacher_timeout (1 s" in message and "--resume" in message
    assert time.monotonic() - started < 60
    assert [r[M.STEP] for r in M.read(tmp_path / "killed")] == [1, 2, 3]
    assert [c.name for c in RunFolder(tmp_path / "killed").complete_checkpoints()] == ["step-000002"]

    with serving(tiny_pair["teacher"], port):
        run_training(tiny_config(tiny_pair, tmp_path / "killed", **settings), resume=True)
    whole = without_times(M.read(tmp_path / "whole"))
    resumed = without_times(M.read(tmp_path / "killed"))
    assert json.dumps(resumed) == json.dumps(whole)


def test_generate_returns_the_teachers_own_seeded_samples(tiny_pair, served):
    from opd.models.loading import load_model, load_tokenizer
    from opd.step.rollout import generate_rollouts

    tok = load_tokenizer(str(tiny_pair["teacher"]), "teacher")
    teacher = load_model(str(tiny_pair["teacher"]), "teacher", trainable=False)
    prompts = [[1, 5, 24, 6, 25], [1, 7, 25]]
    want = generate_rollouts(teacher, tok, prompts, n=2, max_new_tokens=6, temperature=1.0,
                             seed=11, prompt_ids=[3, 4]).response_ids
    got = TeacherClient(served).generate(GenerateRequest(prompts, n=2, max_new_tokens=6,
                                                         seed=11, prompt_ids=[3, 4]))
    assert got == want


def test_json_and_base64_answers_carry_the_same_bits(served):
    from opd.teachers.protocol import ScoreRequest, decode_array

    sequences = [[1, 5, 24, 6, 25, 7, 8], [1, 9, 24, 3, 25]]
    candidates = [[[4, 5, 6], [7, 8, 9], [10, 11, 12]], [[4, 5], [6, 7]]]  # ragged across rows
    answers = {encoding: TeacherClient(served).score(ScoreRequest(
        sequences, [4, 3], 4, 0.8, candidates, encoding)) for encoding in ("json", "base64")}
    for plain, packed in zip(answers["json"], answers["base64"], strict=True):
        for name, dtype in (("token_logprobs", torch.float32), ("topk_ids", torch.long),
                            ("topk_logprobs", torch.float32), ("entropy", torch.float32),
                            ("candidate_logprobs", torch.float32)):
            assert torch.equal(decode_array(plain[name], dtype), decode_array(packed[name], dtype))
    assert len(answers["json"][0]["topk_ids"][0]) == 4
    assert len(answers["json"][0]["candidate_logprobs"]) == 3


# -- bad requests ------------------------------------------------------------------------------
def post(url: str, body: bytes, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


GOOD = {"sequences": [[1, 5, 24, 6, 25, 7]], "response_starts": [4], "k": 3}
BAD_REQUESTS = [
    ("malformed JSON", b'{"sequences": [[1, 2', 400, "body: not valid JSON"),
    ("not an object", b"[1, 2]", 400, "body: a JSON list, not an object"),
    ("missing field", json.dumps({"k": 3}).encode(), 422, "sequences: missing"),
    ("unknown field", json.dumps({**GOOD, "pickle": "x"}).encode(), 422,
     "pickle: not a field of this request"),
    ("k not an integer", json.dumps({**GOOD, "k": "three"}).encode(), 422,
     "k: expected an integer"),
    ("token outside the vocabulary", json.dumps({**GOOD, "sequences": [[1, 5, 999, 6, 25]]})
     .encode(), 422, "sequences[0][2]: 999 is not between 0 and 31 (the server's vocabulary)"),
    ("too long", json.dumps({**GOOD, "sequences": [[1] * 65], "response_starts": [4]}).encode(),
     422, "sequences[0]: 65 tokens, more than max_sequence_tokens (64)"),
    ("too many sequences", json.dumps({**GOOD, "sequences": [[1, 2]] * 9,
                                       "response_starts": [1] * 9}).encode(),
     413, "sequences: 9 entries, more than max_sequences (8)"),
    ("too large", json.dumps({**GOOD, "padding": "x" * 5000}).encode(), 413,
     "body: larger than max_request_bytes (4096)"),
    ("candidates of the wrong length", json.dumps({**GOOD, "candidates": [[[1]]]}).encode(), 422,
     "candidates[0]: 1 positions, but the response has 2"),
    ("unknown encoding", json.dumps({**GOOD, "encoding": "pickle"}).encode(), 422,
     'encoding: "pickle" is not one of ["json", "base64"]'),
    ("negative temperature", json.dumps({**GOOD, "temperature": -1}).encode(), 422,
     "temperature: -1 must be above 0"),
]


@pytest.fixture(scope="module")
def strict_server(tiny_pair):
    with serving(tiny_pair["teacher"], api_key="sesame", max_request_bytes=4096,
                 max_sequences=8, max_sequence_tokens=64) as (url, _):
        yield url


@pytest.mark.parametrize(("body", "status", "message"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_status_and_one_line_naming_the_field(strict_server, body, status,
                                                                 message):
    code, answer = post(strict_server + "/v1/score", body, key="sesame")
    assert code == status
    assert message in answer["error"] and "\n" not in answer["error"]


def test_the_api_key_is_required_when_set(strict_server):
    good = json.dumps(GOOD).encode()
    for key in (None, "wrong", "sesame-and-more"):
        code, answer = post(strict_server + "/v1/score", good, key=key)
        assert code == 401 and "missing or wrong API key" in answer["error"]
    code, answer = post(strict_server + "/v1/score", good, key="sesame")
    assert code == 200 and len(answer["results"][0]["topk_ids"]) == 2
    with pytest.raises(OPDError, match=r"refused the request \(401\)"):
        TeacherClient(strict_server, api_key="wrong").info()
    assert TeacherClient(strict_server, api_key="sesame").info()["limits"]["max_sequences"] == 8


def test_binding_beyond_this_machine_needs_an_api_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    config = build(ServeConfig, {"model": "some/teacher", "host": "0.0.0.0"})
    with pytest.raises(OPDError, match=r"api_key: binding 0\.0\.0\.0 .* pass --api-key KEY"):
        config.key()
    assert build(ServeConfig, {"model": "m", "host": "0.0.0.0", "api_key": "k"}).key() == "k"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert config.key() == "from-env"


def test_the_vllm_backend_without_vllm_names_its_extra(monkeypatch, capsys):
    """Before any model loads (the vllm backend's own tests are in tests_vllm)."""
    monkeypatch.setattr("opd.step.engines.is_installed", lambda name: name != "vllm")
    code = main(["serve-teacher", "--model", "some/teacher", "--backend", "vllm"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1
    assert 'backend: vllm is not installed; pip install "opd[vllm]"' in errors[0]
    assert errors[0].endswith("or set backend=hf")


def test_an_unreachable_teacher_is_named_after_its_timeout(tiny_pair, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=r"did not answer for teacher_timeout \(0.5 s"):
        run_training(tiny_config(tiny_pair, tmp_path / "run", teacher=url, teacher_timeout=0.5))
    assert 0.3 < time.monotonic() - started < 30
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_serve_teacher_in_one_terminal_train_in_another(tiny_pair, tmp_path):
    """The README's two commands: `opd serve-teacher` as its own process, `opd train --teacher
    http://…` against it; the run folder is the same as with the teacher folder."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    server = subprocess.Popen(
        [sys.executable, "-m", "opd", "serve-teacher", "--model", str(tiny_pair["teacher"]),
         "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = TeacherClient(f"http://127.0.0.1:{port}", timeout=120)
        assert client.info()["backend"] == "hf"
        common = ["--student", str(tiny_pair["student"]), "--prompts", str(tiny_pair["prompts"]),
                  "--max-steps", "1", "--prompts-per-step", "2", "--max-new-tokens", "6",
                  "--no-progress"]
        assert main(["train", *common, "--teacher", client.url, "--out",
                     str(tmp_path / "served")]) == 0
        assert main(["train", *common, "--teacher", str(tiny_pair["teacher"]), "--out",
                     str(tmp_path / "local")]) == 0
    finally:
        server.terminate()
        server.wait(30)
    listing = {p.relative_to(tmp_path / "local").as_posix()
               for p in (tmp_path / "local").rglob("*")}
    assert listing == {p.relative_to(tmp_path / "served").as_posix()
                       for p in (tmp_path / "served").rglob("*")}
    served = M.read(tmp_path / "served")[0]
    local = M.read(tmp_path / "local")[0]
    assert math.isclose(served[M.LOSS], local[M.LOSS], rel_tol=1e-5, abs_tol=1e-6)


# -- several teachers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sources(tiny_pair, tmp_path_factory):
    """A second teacher (another random init) and the tiny prompts tagged with two sources."""
    root = tmp_path_factory.mktemp("two")
    second = make_model(root / "teacher2", seed=3, hidden=40)
    rows = [json.loads(line) for line in tiny_pair["prompts"].read_text().splitlines()]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**row, "source": "ab"[i % 2]}) + "\n"
                               for i, row in enumerate(rows)))
    return {"second": second, "prompts": prompts}


def test_each_prompt_is_scored_by_its_own_teacher(tiny_pair, two_sources, tmp_path):
    """At step 1 (the same rollouts in every run), the by-teacher measures of a run with one
    local and one served teacher equal those of runs giving both sources the same teacher,
    and a run with one teacher for both sources equals the single-teacher run."""
    first, second = str(tiny_pair["teacher"]), str(two_sources["second"])
    common = {"prompts": str(two_sources["prompts"]), "max_steps": 1, "prompts_per_step": 8,
              "samples_per_prompt": 1}

    def run(name, **settings):
        run_training(tiny_config(tiny_pair, tmp_path / name, **common, **settings))
        return M.read(tmp_path / name)[0]

    single = run("single", teacher=first)
    with serving(two_sources["second"]) as (url, _):
        mixed = run("mixed", teacher="", teachers={"a": first, "b": url})
        all_second = run("all-second", teacher="", teachers={"a": second, "b": second})
    all_first = run("all-first", teacher="", teachers={"a": first, "b": first})
    assert M.BY_TEACHER not in single and set(mixed[M.BY_TEACHER]) == {"a", "b"}
    assert_records_close([{k: v for k, v in all_first.items() if k != M.BY_TEACHER}], [single])
    for name, alone in (("a", all_first), ("b", all_second)):
        for measure, value in alone[M.BY_TEACHER][name].items():
            assert mixed[M.BY_TEACHER][name][measure] == pytest.approx(value, abs=1e-5), measure
    assert (mixed[M.BY_TEACHER]["a"][M.TEACHER_ENTROPY]
            != pytest.approx(all_second[M.BY_TEACHER]["a"][M.TEACHER_ENTROPY], abs=1e-3))


def test_a_prompt_whose_value_has_no_teacher_stops_the_run_at_start(tiny_pair, two_sources,
                                                                    tmp_path):
    with pytest.raises(OPDError, match=r"teachers: .*prompts\.jsonl.* has source 'b', which no "
                                       r"teacher is given for \(teachers: \['a'\]\)"):
        run_training(tiny_config(tiny_pair, tmp_path / "run", teacher="",
                                 prompts=str(two_sources["prompts"]),
                                 teachers={"a": str(tiny_pair["teacher"])}))
    assert not (tmp_path / "run").exists()


def test_micro_batches_holding_one_teacher_only_give_the_single_teacher_run(tiny_pair,
                                                                            two_sources, tmp_path):
    """micro_batch 1: every micro-batch has a prompt of one source, the other teacher's share is
    empty and scored with nothing; with the same teacher for both, the single-teacher run."""
    common = {"prompts": str(two_sources["prompts"]), "max_steps": 2, "micro_batch": 1,
              "save_every": 10}
    teacher = str(tiny_pair["teacher"])
    run_training(tiny_config(tiny_pair, tmp_path / "single", teacher=teacher, **common))
    run_training(tiny_config(tiny_pair, tmp_path / "both", teacher="",
                             teachers={"a": teacher, "b": teacher}, **common))
    both = M.read(tmp_path / "both")
    assert all(set(r[M.BY_TEACHER]) == {"a", "b"} for r in both)
    assert_records_close(M.read(tmp_path / "single"),
                          [{k: v for k, v in r.items() if k != M.BY_TEACHER} for r in both])


def test_diagnose_gives_a_verdict_per_teacher_on_its_own_prompts(tiny_pair, two_sources, served,
                                                                 tmp_path, capsys):
    """`opd diagnose` with `teachers` (one served, one a folder): a diagnosis per teacher in
    OUT/<value>, equal to the one-teacher diagnosis on that teacher's prompts alone."""
    args = ["--student", str(tiny_pair["student"]), "--num-prompts", "20", "--samples-per-prompt", "2",
            "--max-new-tokens", "6", "--no-progress"]
    teachers = {"a": served, "b": str(tiny_pair["student"])}
    assert main(["diagnose", *args, "--prompts", str(two_sources["prompts"]), "--out",
                 str(tmp_path / "both"), "--set", f"teachers={json.dumps(teachers)}"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in two_sources["prompts"].read_text().splitlines()]
    only_a = tmp_path / "a.jsonl"
    only_a.write_text("".join(json.dumps(r) + "\n" for r in rows if r["source"] == "a"))
    assert main(["diagnose", *args, "--prompts", str(only_a), "--teacher",
                 str(tiny_pair["teacher"]), "--out", str(tmp_path / "alone")]) == 0
    by_teacher = {name: json.loads((tmp_path / "both" / name / "diagnosis.json").read_text())
                  for name in ("a", "b")}
    alone = json.loads((tmp_path / "alone" / "diagnosis.json").read_text())
    assert_close(alone["teacher"]["pattern"], by_teacher["a"]["teacher"]["pattern"])
    assert by_teacher["a"]["verdict"] == alone["verdict"]
    assert by_teacher["a"]["student"]["prompts"] == by_teacher["b"]["student"]["prompts"] == 10
    # b is the student itself: every top-k set shared
    assert by_teacher["b"]["teacher"]["pattern"]["by_k"]["4"]["overall"][
        "overlap_share_teacher"] == pytest.approx(1.0)
    assert f"teacher 'a' (source = a): {by_teacher['a']['verdict']}" in printed
    assert f"teacher 'b' (source = b): {by_teacher['b']['verdict']}" in printed
