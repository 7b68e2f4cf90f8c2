"""Distilling across tokenizers: the objective against brute force, the re-tokenizing teacher
against the teacher's own forward pass, and training the tiny student from a teacher whose
tokenizer cuts numbers into digits."""

from __future__ import annotations

import math

import pytest
import torch

from opd import metrics as M
from opd.cli import main
from opd.config.training import ObjectiveConfig
from opd.errors import OPDError
from opd.models.loading import load_model, load_tokenizer
from opd.run.loop import run_training
from opd.step.distributions import UNKNOWN_LOGPROB
from opd.step.measures import token_measures
from opd.step.objectives import distillation_loss
from opd.step.rollout import pack
from opd.step.scoring import LocalTeacher, output_head, response_states
from opd.teachers.build import RetokenizingTeacher, TextInputs
from tests.support import random_log_probs, tiny_config

CROSS = ObjectiveConfig(name="cross_tokenizer_kl")


def test_with_one_vocabulary_it_is_the_full_reverse_kl():
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    teacher = random_log_probs(1, 7, 11).double()
    targets = torch.randint(0, 11, (7,))
    grads = []
    for config, aligned in ((CROSS, None), (CROSS, torch.ones(7, dtype=torch.bool)),
                            (ObjectiveConfig(name="full_reverse_kl"), None)):
        loss = distillation_loss(logits.log_softmax(-1), teacher, targets, config, aligned)
        grads.append((loss.detach(), *torch.autograd.grad(loss.sum(), logits)))
    for value, grad in grads[:2]:
        torch.testing.assert_close(value, grads[2][0])
        torch.testing.assert_close(grad, grads[2][1])


def brute_cross_loss(logits, teacher, targets, aligned):
    """One position at a time with plain sums: where aligned, the KL over the known entries
    plus one class for the rest of each side's mass; else −sg(log q_share − log p(ŷ))·log p(ŷ)
    (nothing without a teacher)."""
    values, grads = [], []
    for x, q, y, exact in zip(logits, teacher.tolist(), targets.tolist(), aligned.tolist(),
                              strict=True):
        x = x.detach().clone().requires_grad_(True)
        lp = x.log_softmax(-1)
        if exact:
            support = [v for v in range(len(q)) if q[v] > UNKNOWN_LOGPROB / 2]
            rest = [v for v in range(len(q)) if v not in support]
            p_rest = sum((torch.exp(lp[v]) for v in rest), torch.zeros((), dtype=lp.dtype))
            q_rest = 1 - sum(math.exp(q[v]) for v in support)
            loss = sum(torch.exp(lp[v]) * (lp[v] - q[v]) for v in support)
            loss = loss + p_rest * (p_rest.clamp(min=1e-8).log() - math.log(max(q_rest, 1e-8)))
        elif math.isinf(q[y]):
            loss = lp[y] * 0
        else:
            loss = -(q[y] - lp[y].item()) * lp[y]
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(x.grad)
    return torch.tensor(values, dtype=torch.float64), torch.stack(grads)


@pytest.mark.parametrize("seed", range(4))
def test_exact_and_span_positions_match_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    n, v = 9, 8
    logits = torch.randn(n, v, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=generator)
    aligned = torch.rand(n, generator=generator) < 0.5
    teacher = random_log_probs(seed, n, v).double()
    unmapped = (torch.rand(n, v, generator=generator) < 0.3) & aligned[:, None]
    unmapped[aligned, targets[aligned]] = False  # an exact position's token is always mapped
    teacher = teacher.masked_fill(unmapped, UNKNOWN_LOGPROB)
    # A span position knows only its sampled token's share; one has no teacher text at all.
    shares = torch.where(torch.arange(n) == 0, -torch.inf, -torch.rand(n, generator=generator))
    span_rows = torch.full_like(teacher, UNKNOWN_LOGPROB)
    span_rows[torch.arange(n), targets] = shares.double()
    aligned[0] = False
    teacher = torch.where(aligned[:, None], teacher, span_rows)
    loss = distillation_loss(logits.log_softmax(-1), teacher, targets, CROSS, aligned)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    expected, expected_grad = brute_cross_loss(logits, teacher, targets, aligned)
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.isfinite(grad).all()


def teacher_inputs(tokenizer, responses: list[str]) -> TextInputs:
    rows = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for r in responses]
    return TextInputs(["3 + 4 =", "1 + 12 ="][:len(rows)], rows, [True] * len(rows))


def test_a_teacher_of_the_same_tokenizer_gives_its_own_log_probs(tiny_pair):
    tokenizer = load_tokenizer(str(tiny_pair["student"]), "student")
    model = load_model(str(tiny_pair["teacher"]), "teacher", trainable=False,
                       device=torch.device("cpu"), dtype="float32")
    teacher = RetokenizingTeacher(model, tokenizer, tokenizer, 1.5, len(tokenizer))
    inputs = teacher_inputs(tokenizer, ["7 answer 7", "13 = 13 c"])
    aligned = teacher.logprobs(inputs, None, output_head(model))
    prompts = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
               for p in inputs.prompts]
    states = response_states(model, *pack(prompts, inputs.responses, tokenizer.pad_token_id))
    direct = LocalTeacher(states, output_head(model), 1.5).chunk(slice(0, 9), torch.device("cpu"))
    got = aligned.chunk(slice(0, 9), torch.device("cpu"))
    assert got.aligned.all()
    torch.testing.assert_close(got.log_probs, direct.log_probs)
    torch.testing.assert_close(got.entropy, -(direct.log_probs.exp() * direct.log_probs).sum(-1))


def test_a_teacher_of_another_tokenizer_scores_spans_of_the_same_text(tiny_pair, digit_teacher):
    student_tok = load_tokenizer(str(tiny_pair["student"]), "student")
    teacher_tok = load_tokenizer(str(digit_teacher), "teacher")
    model = load_model(str(digit_teacher), "teacher", trainable=False,
                       device=torch.device("cpu"), dtype="float32")
    teacher = RetokenizingTeacher(model, teacher_tok, student_tok, 2.0, len(student_tok))
    inputs = teacher_inputs(student_tok, ["12 + 5"])
    got = teacher.logprobs(inputs, None, output_head(model)).chunk(slice(0, 4),
                                                                   torch.device("cpu"))
    # Brute force: the teacher's own forward pass over its rendering of prompt and response.
    prompt = teacher_tok("3 + 4 =", add_special_tokens=False)["input_ids"]
    response = teacher_tok("12 + 5", add_special_tokens=False)["input_ids"]
    ids = [teacher_tok.bos_token_id, *prompt, *response, teacher_tok.eos_token_id]
    assert teacher_tok.convert_ids_to_tokens(response) == ["1", "##2", "+", "5"]
    with torch.no_grad():
        lp = (model(torch.tensor([ids])).logits[0] / 2.0).log_softmax(-1)  # temperature 2
    start = 1 + len(prompt)  # the first response token's index in `ids`
    token_lp = [float(lp[start - 1 + j, ids[start + j]]) for j in range(5)]
    assert got.aligned.tolist() == [False, True, True, True]
    targets = inputs.responses[0]
    assert float(got.log_probs[0, targets[0]]) == pytest.approx(token_lp[0] + token_lp[1],
                                                                abs=1e-5)
    assert (got.log_probs[0] == UNKNOWN_LOGPROB).sum() == len(student_tok) - 1
    for row, j in ((1, 2), (2, 3), (3, 4)):  # "+", "5" and EOS: the whole distribution
        for student_id, teacher_id in enumerate(teacher.vocab_map.tolist()):
            expected = (float(lp[start - 1 + j, teacher_id]) if teacher_id >= 0
                        else UNKNOWN_LOGPROB)
            assert float(got.log_probs[row, student_id]) == pytest.approx(expected, rel=1e-6,
                                                                           abs=1e-5)
        assert float(got.log_probs[row, targets[row]]) == pytest.approx(token_lp[j], abs=1e-5)


def test_training_from_a_teacher_of_another_tokenizer(tiny_pair, digit_teacher, tmp_path):
    config = tiny_config(tiny_pair, tmp_path / "run", teacher=str(digit_teacher),
                         max_steps=3, save_every=3, **{"objective.name": "cross_tokenizer_kl"})
    summary = run_training(config)
    records = M.read(tmp_path / "run")
    assert [r[M.STEP] for r in records] == [1, 2, 3] and summary["skipped_steps"] == 0
    for record in records:
        assert math.isfinite(record[M.LOSS]) and record[M.GRAD_NORM] > 0
        assert 0 < record[M.ALIGNED_SHARE] < 1  # digits shared, two-digit numbers not
        for name in M.TEACHER_MEASURES:
            assert math.isfinite(record[name]), name
        assert set(record[M.BY_POSITION]) == {*M.TOKEN_MEASURES, M.ALIGNED_SHARE}


def test_token_level_objectives_still_refuse_another_vocabulary(tiny_pair, digit_teacher,
                                                                tmp_path):
    config = tiny_config(tiny_pair, tmp_path / "run", teacher=str(digit_teacher))
    with pytest.raises(OPDError, match=r"tokenizer mismatch.*cross_tokenizer_kl"):
        run_training(config)


def test_a_served_teacher_is_refused_at_the_start(tiny_pair, tmp_path, capsys):
    code = main(["train", "--student", str(tiny_pair["student"]), "--teacher",
                 "http://127.0.0.1:9", "--prompts", str(tiny_pair["prompts"]), "--out",
                 str(tmp_path / "run"), "--set", "objective.name=cross_tokenizer_kl"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "served teacher with another tokenizer is not supported" in err
    assert not (tmp_path / "run").exists()


def test_a_sharded_teacher_is_refused(tiny_pair, digit_teacher, tmp_path):
    config = tiny_config(tiny_pair, tmp_path / "run", teacher=str(digit_teacher),
                         teacher_parallel="fsdp", **{"objective.name": "cross_tokenizer_kl"})
    with pytest.raises(OPDError, match="teacher_parallel=replicate"):
        run_training(config)
    assert not (tmp_path / "run").exists()


def test_measures_are_taken_at_the_exact_positions_only():
    student, teacher = random_log_probs(5, 6, 10), random_log_probs(6, 6, 10)
    targets = torch.arange(6)
    aligned = torch.tensor([True, False, True, True, False, True])
    teacher[~aligned] = UNKNOWN_LOGPROB
    teacher[~aligned, targets[~aligned]] = -0.7
    got = token_measures(student, teacher, targets, 4, teacher_entropy=torch.ones(6),
                         aligned=aligned)
    alone = token_measures(student[aligned], teacher[aligned], targets[aligned], 4,
                           teacher_entropy=torch.ones(4))
    for name, value in alone.items():
        if name == M.REVERSE_KL:  # every position: each token's share of its span's log-ratio
            torch.testing.assert_close(got[name], student[torch.arange(6), targets]
                                       - teacher[torch.arange(6), targets])
        elif name in M.TEACHER_MEASURES:
            torch.testing.assert_close(got[name][aligned], value, equal_nan=True)
            assert got[name][~aligned].isnan().all()
        else:
            torch.testing.assert_close(got[name][aligned], value, equal_nan=True)
    assert got[M.ALIGNED_SHARE].tolist() == aligned.float().tolist()


def test_the_overlap_counts_only_tokens_of_the_shared_vocabulary():
    # Three mapped tokens (1, 4, 6) at an exact position, k = 4: the teacher's top-4 holds one
    # unmapped entry, which the student's top-4 (its most likely tokens 0, 2, 3) must not share.
    student = torch.tensor([[0.0, -9.0, 0.0, 0.0, -1.0, -9.0, -2.0, -9.0]]).log_softmax(-1)
    teacher = torch.full((1, 8), UNKNOWN_LOGPROB)
    teacher[0, [1, 4, 6]] = torch.tensor([-0.3, -2.0, -1.6])
    got = token_measures(student, teacher, torch.tensor([4]), 4,
                         teacher_entropy=torch.ones(1), aligned=torch.tensor([True]))
    # Brute force: top-4 among the mapped tokens is all three on both sides; 3 of 3 slots.
    assert got[M.OVERLAP_RATIO].item() == pytest.approx(1.0)
    mass = student[0, [1, 4, 6]].exp().sum()
    assert got[M.OVERLAP_MASS_STUDENT].item() == pytest.approx(float(mass), rel=1e-6)
    assert got[M.OVERLAP_MASS_TEACHER].item() == pytest.approx(
        float(teacher[0, [1, 4, 6]].exp().sum()), rel=1e-6)


def brute_sorted_distance(logits, sorted_teacher):
    """ULD's distance per row with plain Python ranks: the student's probabilities ordered by
    value, each compared with the teacher's of the same rank (0 for a NaN row)."""
    values, grads = [], []
    for x, q in zip(logits, sorted_teacher.tolist(), strict=True):
        x = x.detach().clone().requires_grad_(True)
        p = x.softmax(-1)
        order = sorted(range(len(q)), key=lambda v: -float(p[v].detach()))
        distance = (sum(abs(p[v] - q[r]) for r, v in enumerate(order)) if not math.isnan(q[0])
                    else x.sum() * 0)
        distance.backward()
        values.append(float(distance.detach()))
        grads.append(x.grad)
    return torch.tensor(values, dtype=torch.float64), torch.stack(grads)


@pytest.mark.parametrize("seed", range(3))
def test_the_sorted_term_is_ulds_distance_at_span_starts(seed):
    generator = torch.Generator().manual_seed(seed)
    n, v = 7, 9
    logits = torch.randn(n, v, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=generator)
    aligned = torch.tensor([True, False, False, True, False, False, True])
    teacher = random_log_probs(seed, n, v).double()
    teacher[~aligned] = UNKNOWN_LOGPROB
    teacher[~aligned, targets[~aligned]] = -0.4
    sorted_teacher = random_log_probs(seed + 10, n, v).double().exp().sort(-1, descending=True)
    sorted_teacher = sorted_teacher.values
    sorted_teacher[[0, 2, 3, 5, 6]] = torch.nan  # span starts: positions 1 and 4
    weighted = ObjectiveConfig(name="cross_tokenizer_kl", sorted_weight=0.7)
    got = distillation_loss(logits.log_softmax(-1), teacher, targets, weighted, aligned,
                            sorted_teacher)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    plain = distillation_loss(logits.log_softmax(-1), teacher, targets, CROSS, aligned,
                              sorted_teacher)
    (plain_grad,) = torch.autograd.grad(plain.sum(), logits)
    distance, distance_grad = brute_sorted_distance(logits, sorted_teacher)
    assert distance[[1, 4]].min() > 0 and (distance[[0, 2, 3, 5, 6]] == 0).all()
    torch.testing.assert_close(got.detach(), plain.detach() + 0.7 * distance)
    torch.testing.assert_close(grad, plain_grad + 0.7 * distance_grad)


def test_the_teacher_gives_its_sorted_probabilities_at_span_starts(tiny_pair, digit_teacher):
    student_tok = load_tokenizer(str(tiny_pair["student"]), "student")
    teacher_tok = load_tokenizer(str(digit_teacher), "teacher")
    model = load_model(str(digit_teacher), "teacher", trainable=False,
                       device=torch.device("cpu"), dtype="float32")
    teacher = RetokenizingTeacher(model, teacher_tok, student_tok, 2.0, len(student_tok),
                                  sorted_ranks=True)
    inputs = teacher_inputs(student_tok, ["12 + 5"])
    got = teacher.logprobs(inputs, None, output_head(model)).chunk(slice(0, 4),
                                                                   torch.device("cpu"))
    prompt = teacher_tok("3 + 4 =", add_special_tokens=False)["input_ids"]
    ids = [teacher_tok.bos_token_id, *prompt]
    with torch.no_grad():  # before `1 ##2`, at temperature 2: the one span start
        probs = (model(torch.tensor([ids])).logits[0, -1] / 2.0).softmax(-1)
    ranked = probs.sort(descending=True).values
    assert len(teacher_tok) == len(student_tok)  # same size: no rank cut or padded
    torch.testing.assert_close(got.sorted_probs[0], ranked)
    assert got.sorted_probs[1:].isnan().all()  # `+`, `5` and EOS align


def test_the_sorted_term_belongs_to_cross_tokenizer_kl():
    with pytest.raises(OPDError, match=r"objective\.sorted_weight: a term of cross_tokenizer_kl"):
        ObjectiveConfig(name="topk", sorted_weight=0.5)


def test_training_adds_the_sorted_term_where_spans_start(tiny_pair, digit_teacher, tmp_path):
    losses = []
    for weight in (0.0, 0.5):
        config = tiny_config(tiny_pair, tmp_path / f"run-{weight}", teacher=str(digit_teacher),
                             max_steps=1, save_every=1,
                             **{"objective.name": "cross_tokenizer_kl",
                                "objective.sorted_weight": weight})
        run_training(config)
        losses.append(M.read(tmp_path / f"run-{weight}")[0][M.LOSS])
    # The same rollouts (same seed, first step); the distance is ≥ 0 and > 0 at any span start
    # (the tiny student writes two-digit numbers, which the teacher cuts into digits).
    assert losses[1] > losses[0]
