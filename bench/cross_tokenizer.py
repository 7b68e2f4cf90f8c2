"""Distilling across tokenizers on the model organisms (docs/method.md#across-tokenizers): the
quick zoo's student (word-level tokenizer) from `teacher-aligned` (the same tokenizer) and from
teachers trained like it on the same data and dialect but with another tokenizer
(`build_other_tokenizer` below: characters, or the two-digit numbers cut into digits), over
several seeds. `--bases teacher-foreign` adds the foreign-dialect teacher's recipe with those
tokenizers; `--diagnose` runs `opd diagnose --cross-tokenizer` on every other-tokenizer teacher.

gap recovery = (acc_after − acc_before) / (acc_teacher − acc_before) on the withheld
sub-skill's evaluation set (greedy exact match), as bench/repairs.py. Prints one JSON line per
run and writes results.json.

    python bench/cross_tokenizer.py --zoo .opd-cache/zoo/quick --out runs/cross-tokenizer
    python bench/cross_tokenizer.py --bases teacher-foreign --tokenizers digits \
        --same-tokenizer --diagnose --out runs/cross-tokenizer-foreign
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd import metrics as M
from opd.config.training import build_config
from opd.doctor.measure import DiagnoseConfig, run_diagnosis
from opd.errors import OPDError
from opd.lab.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK
from opd.lab.world import ADDITION, TEMPLATES, World, max_new_tokens, sft_examples
from opd.lab.zoo import PROFILES, build_model, build_zoo_stages, load_sets
from opd.run.folder import RunFolder
from opd.run.loop import run_training
from opd.run.sft import SFTConfig, train_sft
from repairs import accuracy, print_recovery  # bench/repairs.py, beside this script

SAME_TOKENIZER = ("topk", "sampled", "cross_tokenizer_kl")
"""Objectives of the runs from teacher-aligned itself, the references."""
OTHER_EVAL_TOKENS = {"chars": 200, "digits": 60}
"""New tokens of each other-tokenizer teacher's own evaluation: a character tokenizer writes
about four tokens per word (its position limit is 256), a digit one a few more than words."""


def build_other_tokenizer(kind: str, template: int = 1,
                          world: World = ADDITION) -> PreTrainedTokenizerFast:
    """Another tokenizer of the zoo's texts, with the special tokens and chat template of
    `opd.lab.tokenizer.build_tokenizer`: `chars`, one token per character (space included), or
    `digits`, the words with the two-digit numbers cut into digits (WordPiece, `12` → `1 ##2`).

    Against the student's word-level tokenizer, `chars` pairs only the special tokens (a word
    `5` adds ` 5` in running text, two characters here), so nearly every position is a span;
    `digits` pairs every token but the two-digit numbers."""
    if template not in TEMPLATES:
        raise OPDError(f"unknown prompt template {template}; choose one of {sorted(TEMPLATES)}")
    if kind == "chars":
        characters = {c for text in (*world.vocab, TEMPLATES[template]) for c in text} | {" "}
        tokens = sorted(characters)
        backend = Tokenizer(models.WordLevel(
            {t: i for i, t in enumerate((*SPECIAL_TOKENS, *tokens))}, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        backend.decoder = decoders.Fuse()
    else:
        words = [w for w in world.vocab if not (w.isdigit() and len(w) > 1)]
        tokens = [*words, *(f"##{d}" for d in range(10))]
        backend = Tokenizer(models.WordPiece(
            {t: i for i, t in enumerate((*SPECIAL_TOKENS, *tokens))}, unk_token=UNK,
            continuing_subword_prefix="##"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", model_max_length=256,
    )
    tokenizer.chat_template = TEMPLATES[template]
    return tokenizer


def other_teacher(zoo_root: Path, profile: str, steps: int | None, kind: str,
                  base: str = "teacher-aligned") -> Path:
    """The zoo teacher `base`'s recipe (data, dialect, size, seed, lr; its steps unless
    `steps`) with another tokenizer (`build_other_tokenizer`); built once under the zoo's
    folder."""
    spec = next(s for s in PROFILES[profile].models if s.name == base)
    steps = steps or spec.steps
    folder = zoo_root / f"{base}-{kind}-{steps}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = build_other_tokenizer(kind, spec.template)
    model = build_model(spec.size, tokenizer, spec.seed)
    sets = load_sets(zoo_root)
    examples = [ex for name in spec.data
                for ex in sft_examples(sets[name], spec.dialect, spec.seed, ADDITION)]
    losses = train_sft(model, tokenizer, examples,
                       SFTConfig(steps=steps, lr=spec.lr, seed=spec.seed, progress=False))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(json.dumps({"built": str(folder), "final_loss": losses[-1]}), flush=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=".opd-cache/zoo/quick")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", default="runs/cross-tokenizer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="SFT steps of the other-tokenizer teachers (default: the base's)")
    parser.add_argument("--tokenizers", nargs="+", default=["chars", "digits"],
                        choices=sorted(OTHER_EVAL_TOKENS))
    parser.add_argument("--bases", nargs="+", default=["teacher-aligned"],
                        choices=["teacher-aligned", "teacher-foreign"],
                        help="zoo teachers whose recipe the other-tokenizer teachers follow")
    parser.add_argument("--same-tokenizer", nargs="*", default=list(SAME_TOKENIZER),
                        choices=SAME_TOKENIZER, metavar="OBJECTIVE",
                        help="objectives of the runs from teacher-aligned itself (none: no such "
                        "run)")
    parser.add_argument("--objective", nargs="*", default=[], metavar="NAME=VALUE",
                        help="objective settings of every cross_tokenizer_kl run")
    parser.add_argument("--diagnose", action="store_true",
                        help="opd diagnose --cross-tokenizer on every other-tokenizer teacher")
    args = parser.parse_args()
    zoo_root, out = Path(args.zoo), Path(args.out)
    build_zoo_stages(zoo_root, args.profile, progress=False,
                     only=["student", *(["teacher-aligned"] if args.same_tokenizer else [])])
    aligned = zoo_root / "teacher-aligned"
    others = {(base, kind): other_teacher(zoo_root, args.profile, args.teacher_steps, kind, base)
              for base in args.bases for kind in args.tokenizers}
    options = dict(option.split("=", 1) for option in args.objective)
    digits = max(PROFILES[args.profile].digits)
    tokens = max_new_tokens(digits)
    eval_file = zoo_root / "data" / f"eval-chain-d{digits}.jsonl"
    student = str(zoo_root / "student")
    before = accuracy(student, eval_file, tokens)
    # (name, teacher, objective, new tokens for the teacher's own evaluation: a character
    # tokenizer writes about four tokens per word)
    runs = (*((f"aligned, {objective}", aligned, objective, tokens)
              for objective in args.same_tokenizer),
            *((f"{_label(base, kind)}, cross_tokenizer_kl", teacher, "cross_tokenizer_kl",
               OTHER_EVAL_TOKENS[kind]) for (base, kind), teacher in others.items()))
    diagnoses = ([diagnose(student, teacher, _label(base, kind), zoo_root, tokens)
                  for (base, kind), teacher in others.items()] if args.diagnose else [])
    rows = []
    for seed in args.seeds:
        for name, teacher, objective, teacher_tokens in runs:
            run = out / f"{name.replace(', ', '-')}-seed{seed}"
            config = build_config({
                "student": student, "teacher": str(teacher),
                "prompts": str(zoo_root / "data" / "teacher-train.jsonl"), "out": str(run),
                "max_steps": args.steps, "max_new_tokens": tokens, "seed": seed,
                "progress": False, "eval_every": 10_000,
                "objective": {"name": objective,
                              **(options if objective == "cross_tokenizer_kl" else {})},
            }, profile="cpu-small")
            run_training(config, resume=run.exists())
            trained = str(RunFolder(run).complete_checkpoints()[-1])
            records = M.read(run)
            teacher_acc = accuracy(str(teacher), eval_file, teacher_tokens)
            after = accuracy(trained, eval_file, tokens)
            rows.append({
                "run": name, "seed": seed, "before": before, "after": after,
                "teacher": teacher_acc, "gap_recovery": (after - before) / (teacher_acc - before),
                "aligned_share": records[-1].get(M.ALIGNED_SHARE),
                "reverse_kl_first": records[0][M.REVERSE_KL],
                "reverse_kl_last": records[-1][M.REVERSE_KL],
                "seconds_per_step": statistics.mean(
                    sum(r[k] for k in (M.TIME_ROLLOUT, M.TIME_SCORE, M.TIME_UPDATE)) for r in records),
            })
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps({"runs": rows, "diagnoses": diagnoses},
                                                 indent=2))
    print_recovery(rows, before, "reverse_kl", width=36)


def _label(base: str, kind: str) -> str:
    """A run's teacher: `digits`, `chars` (teacher-aligned's recipe), `foreign digits`, …"""
    return kind if base == "teacher-aligned" else f"{base.removeprefix('teacher-')} {kind}"


def diagnose(student: str, teacher: Path, label: str, zoo_root: Path, tokens: int) -> dict:
    """`opd diagnose --cross-tokenizer` of the student against `teacher` on the OPD prompts
    (64 prompts × 4 rollouts, as the zoo's diagnoses): its verdict and the numbers it rests on."""
    found = run_diagnosis(DiagnoseConfig(
        student=student, teacher=str(teacher), cross_tokenizer=True,
        prompts=str(zoo_root / "data" / "teacher-train.jsonl"), max_new_tokens=tokens,
        progress=False), writes=False)
    result = found["teacher"]
    row = {"teacher": label, "verdict": found["verdict"],
           "aligned_share": result["across_tokenizers"]["aligned_share"],
           **{name: check["value"] for name, check in result["decision"]["checks"].items()},
           "teacher_accuracy_own": result.get("accuracy_own_template"),
           "seconds": found["cost"]["wall_seconds"]}
    print(json.dumps({"diagnosis": row}), flush=True)
    return row


if __name__ == "__main__":
    main()
