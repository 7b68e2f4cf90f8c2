"""Real tokenizers and chat templates (tests/tiny_tokenizers.py): byte-level BPE and Unigram
tokenizers trained on the spot, in five styles — ChatML with a system prompt and a thinking
switch, a Llama-3 template that writes the BOS its post-processor would add again, GPT-2 with
no template and no pad token, Gemma turns ended by a token that is not the tokenizer's EOS,
Mistral [INST] with no pad token and left padding.

For each: the prompt opd renders is the tokenizer's own chat encoding (one BOS, never two);
the rollout rows are left-padded prompt, response, right padding, with the response mask on
exactly the response up to and including the token that ended it; a twin teacher gives the
ideal measures; a teacher rendered with its own template scores the same response tokens.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from opd import metrics as M
from opd.config.settings import parse_set
from opd.config.training import build_config
from opd.data.prompts import render_prompt
from opd.errors import OPDError
from opd.models.loading import load_model, load_tokenizer
from opd.run.loop import Trainer
from opd.step.rollout import encode_prompts, generate_rollouts, stop_token_ids
from tests.support import assert_ideal
from tests.tiny_tokenizers import LLAMA3_WITH_DEFAULT_SYSTEM, STYLES, build_tokenizer, save_style

SYSTEM = [{"role": "system", "content": "You are a careful calculator."},
          {"role": "user", "content": "What is 3 plus 4?"}]
PROMPTS = [{"messages": SYSTEM}, {"prompt": "What is 11 plus 2?"},
           {"prompt": "What is 7 plus 10? Think step by step, then give the answer."},
           {"prompt": "What is 0 plus 5?"}]
BOOST = 4.0
"""Added to the turn-end logit during the one-step runs, so most responses end before the cap."""


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


def boost(model, token_id: int) -> None:
    """Make `token_id` likelier at every position, through a hook on the output head (so the
    sampler and the scoring pass both see it)."""
    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_id] += BOOST
        return output

    model.get_output_embeddings().register_forward_hook(hook)


def config_for(student, teacher, prompts, out, **overrides):
    return build_config({
        "student": str(student), "teacher": str(teacher), "prompts": str(prompts),
        "out": str(out), "max_steps": 1, "prompts_per_step": 4, "samples_per_prompt": 2,
        "max_new_tokens": 12, "lr": 1e-3, "objective.k": 4, "measure_k": 4,
        "progress": False, **overrides})


@pytest.mark.parametrize("style", list(STYLES))
def test_the_prompt_is_the_tokenizers_own_chat_encoding_with_one_bos(style, tmp_path):
    folder = save_style(tmp_path / style, style, seed=1)
    tokenizer = load_tokenizer(str(folder), "student")
    bos = tokenizer.bos_token_id
    if tokenizer.chat_template:
        text = render_prompt(SYSTEM, tokenizer)
        (ids,) = encode_prompts(tokenizer, [text])
        own = tokenizer.apply_chat_template(SYSTEM, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        assert ids == own
        assert "You are a careful calculator." in tokenizer.decode(ids)
    else:  # GPT-2: a conversation needs a template; one user message is its plain text
        with pytest.raises(OPDError, match="needs a chat template"):
            render_prompt(SYSTEM, tokenizer)
        text = render_prompt(SYSTEM[1:], tokenizer)
        (ids,) = encode_prompts(tokenizer, [text])
        assert text == "What is 3 plus 4?"
        assert ids == [bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    if bos is None:
        assert STYLES[style].tokens.get("bos_token") is None
    else:
        assert ids[0] == bos and ids.count(bos) == 1
    if STYLES[style].adds_bos:  # what `tokenizer(text)` would do: BOS twice
        assert tokenizer(text)["input_ids"][:2] == [bos, bos]
    # A tokenizer without a pad token pads with its EOS; the others keep their own.
    assert tokenizer.pad_token == STYLES[style].tokens.get("pad_token", tokenizer.eos_token)


def test_the_thinking_switch_reaches_the_template_from_the_config(prompts, tmp_path):
    folder = save_style(tmp_path / "chatml", "chatml", seed=1)
    tokenizer = load_tokenizer(str(folder), "student")
    think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render_prompt(SYSTEM, tokenizer, chat_template_kwargs={"enable_thinking": False}
                         ).endswith(think)
    assert render_prompt(SYSTEM, tokenizer).endswith("<|im_start|>assistant\n")
    from_set = config_for(folder, folder, prompts, tmp_path / "a",
                          **parse_set(["chat_template_kwargs={enable_thinking: false}"]))
    from_yaml = config_for(folder, folder, prompts, tmp_path / "b",
                           chat_template_kwargs={"enable_thinking": False})
    assert from_set.chat_template_kwargs == from_yaml.chat_template_kwargs == {
        "enable_thinking": False}
    for config, thinks in ((from_set, False), (config_for(folder, folder, prompts, tmp_path / "c"),
                                               True)):
        rollouts = Trainer(config).sample(1, [0, 1])
        for ids, attention, response in zip(rollouts.input_ids, rollouts.attention_mask,
                                            rollouts.response_mask, strict=True):
            prompt = tokenizer.decode(ids[attention.bool() & ~response])
            assert prompt.endswith(think) != thinks


def check_rows(rollouts, tokenizer, stops, max_new_tokens):
    """Left padding, prompt, response (its stop token included), right padding."""
    pad = tokenizer.pad_token_id
    for i, (ids, attention, response) in enumerate(zip(
            rollouts.input_ids.tolist(), rollouts.attention_mask.tolist(),
            rollouts.response_mask.tolist(), strict=True)):
        kinds = "".join("r" if r else "p" if a else "_" for a, r in zip(attention, response,
                                                                        strict=True))
        left, body = len(kinds) - len(kinds.lstrip("_")), kinds.strip("_")
        assert body == "p" * body.count("p") + "r" * body.count("r"), kinds
        assert all(t == pad for t, k in zip(ids, kinds, strict=True) if k == "_")
        answer = [t for t, k in zip(ids, kinds, strict=True) if k == "r"]
        assert answer == rollouts.response_ids[i]
        assert not any(t in stops for t in answer[:-1])
        if rollouts.truncated[i]:
            assert len(answer) == max_new_tokens and answer[-1] not in stops
        else:
            assert answer[-1] in stops
        bos = tokenizer.bos_token_id
        if bos is not None:
            assert ids[left] == bos and ids[left + 1:left + body.count("p")].count(bos) == 0


@pytest.mark.parametrize("style", list(STYLES))
def test_one_step_against_a_twin_masks_each_response_and_is_ideal(style, prompts, tmp_path):
    student = save_style(tmp_path / "student", style, seed=1)
    teacher = shutil.copytree(student, tmp_path / "teacher")
    # A tokenizer without a chat template (GPT-2) renders a conversation only through a template.
    plain = {} if STYLES[style].template else {"template": "{prompt}"}
    config = config_for(student, teacher, prompts, tmp_path / "run", **plain)
    trainer = Trainer(config)
    tokenizer = trainer.models.tokenizer
    turn_end = tokenizer.convert_tokens_to_ids(STYLES[style].turn_end)
    for model in (trainer.models.student, trainer.models.teacher):
        boost(model, turn_end)
    stops = stop_token_ids(trainer.models.student, tokenizer)
    assert stops == {tokenizer.eos_token_id, turn_end}

    rollouts = trainer.sample(1, list(range(len(PROMPTS))))
    check_rows(rollouts, tokenizer, stops, config.max_new_tokens)
    assert (~rollouts.truncated).sum() >= len(rollouts.truncated) // 2  # most ended
    assert any(r[-1] == turn_end for r in rollouts.response_ids)
    record = trainer.train_step(1)
    assert_ideal(record)
    assert record[M.TRUNCATION_RATE] < 1


def test_a_turn_end_only_the_generation_config_lists_ends_the_response(tmp_path):
    """Gemma ends a turn with <end_of_turn>, not the tokenizer's EOS: the generation config
    lists both, and a rollout stops at either."""
    folder = save_style(tmp_path / "gemma", "gemma", seed=1)
    tokenizer = load_tokenizer(str(folder), "student")
    model = load_model(str(folder), "student", trainable=True, device=torch.device("cpu"))
    turn_end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert turn_end != tokenizer.eos_token_id
    boost(model, turn_end)
    texts = [render_prompt([{"role": "user", "content": p["prompt"]}], tokenizer)
             for p in PROMPTS[1:]]
    ended = generate_rollouts(model, tokenizer, texts, n=4, max_new_tokens=24, seed=3)
    check_rows(ended, tokenizer, {tokenizer.eos_token_id, turn_end}, 24)
    assert not ended.truncated.any()
    assert sum(r[-1] == turn_end for r in ended.response_ids) >= len(ended.response_ids) // 2

    model.generation_config.eos_token_id = tokenizer.eos_token_id  # the turn end forgotten
    ran_on = generate_rollouts(model, tokenizer, texts, n=4, max_new_tokens=24, seed=3)
    assert any(turn_end in r[:-1] for r in ran_on.response_ids)


def test_a_teacher_with_its_own_template_scores_the_same_response_tokens(prompts, tmp_path):
    student = save_style(tmp_path / "student", "llama3", seed=1)
    teacher = save_style(tmp_path / "teacher", "llama3", seed=1,
                         template=LLAMA3_WITH_DEFAULT_SYSTEM)
    config = config_for(student, teacher, prompts, tmp_path / "run", teacher_prompt="own")
    trainer = Trainer(config)
    indices = list(range(len(PROMPTS)))
    rollouts = trainer.sample(1, indices)
    ids, attention, response = trainer._teacher_inputs(rollouts, indices, slice(None),
                                                       trainer.teachers.by_name[None])
    teacher_tok = trainer.models.teacher_tokenizer
    for i in range(len(rollouts.response_ids)):
        assert ids[i][response[i]].tolist() == rollouts.input_ids[i][rollouts.response_mask[i]
                                                                      ].tolist()
        prompt = ids[i][attention[i].bool() & ~response[i]].tolist()
        record = PROMPTS[int(rollouts.prompt_index[i])]
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        assert prompt == encode_prompts(teacher_tok, [render_prompt(messages, teacher_tok)])[0]
        if "messages" not in record:  # the teacher's template added its own system prompt
            assert "You are a careful calculator." in teacher_tok.decode(prompt)
            student_prompt = rollouts.input_ids[i][rollouts.attention_mask[i].bool()
                                                   & ~rollouts.response_mask[i]].tolist()
            assert len(prompt) > len(student_prompt)
    record = trainer.train_step(1)
    assert record[M.REVERSE_KL] != 0  # the same weights, but another context


def test_own_rendering_gets_the_chat_template_kwargs_too(prompts, tmp_path):
    """A twin teacher rendering the prompt itself, with the same template and the same
    `enable_thinking: false`, sees the student's very tokens: ideal measures."""
    student = save_style(tmp_path / "student", "chatml", seed=1)
    teacher = shutil.copytree(student, tmp_path / "teacher")
    config = config_for(student, teacher, prompts, tmp_path / "run", teacher_prompt="own",
                        chat_template_kwargs={"enable_thinking": False})
    assert_ideal(Trainer(config).train_step(1))


@pytest.mark.parametrize("style", ["gpt2", "mistral"])
def test_rollouts_do_not_depend_on_batching_or_the_padding_side(style, tmp_path):
    """No pad token (padded with EOS), either padding side: a prompt batched with longer ones
    gets the response it gets alone."""
    folder = save_style(tmp_path / style, style, seed=2)
    tokenizer = load_tokenizer(str(folder), "student")
    model = load_model(str(folder), "student", trainable=False, device=torch.device("cpu"))
    texts = [render_prompt([{"role": "user", "content": p["prompt"]}], tokenizer)
             for p in PROMPTS[1:]]
    batched = generate_rollouts(model, tokenizer, texts, n=2, max_new_tokens=10, seed=5)
    tokenizer.padding_side = "left" if tokenizer.padding_side == "right" else "right"
    for index, text in enumerate(texts):
        alone = generate_rollouts(model, tokenizer, [text], n=2, max_new_tokens=10, seed=5,
                                  prompt_ids=[index])
        assert alone.response_ids == batched.response_ids[2 * index: 2 * index + 2]


def test_build_tokenizer_kinds():
    """The two kinds really are byte-level BPE and Unigram."""
    assert json.loads(build_tokenizer("chatml").backend_tokenizer.to_str())["model"]["type"] == "BPE"
    assert json.loads(build_tokenizer("gemma").backend_tokenizer.to_str())["model"]["type"] == \
        "Unigram"
