"""`opd reproduce`: build the zoo it needs, run the findings' experiments for every seed (the
finished ones are kept), judge each finding and write the report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from opd.config.settings import Config, setting
from opd.errors import OPDError
from opd.io import check_output_folder, write_text_atomic
from opd.study.experiments import PROFILES, JobContext, read_result, run_jobs, zoo_models
from opd.study.findings import ALL_FINDINGS, BY_SLUG, FINDINGS, Finding, judge

MANIFEST = "reproduce.json"
RESULTS = "results.json"
SLOW_FIRST = ("cold-start-foreign", "select-prompts-template2", "opd-same-pipeline")
"""Jobs started first, so that the longest do not run alone at the end."""


@dataclass(frozen=True)
class ReproduceConfig(Config):
    """Settings of `opd reproduce`."""

    profile: str = setting("quick", "quick (the quick zoo, 40-step runs), choice (the same in the "
                           "world with genuine choice) or full (the full zoo, 100-step runs).",
                           choices=tuple(PROFILES))
    only: tuple[str, ...] = setting((), "Findings to reproduce, by number or name ("
                                    + ", ".join(f"{f.number} {f.slug}" for f in ALL_FINDINGS)
                                    + "); default the study's eight (1–8).")
    seeds: int = setting(3, "Seeds of every experiment (the intervals need at least 2; the "
                         "verdicts are meant for 3 or more).", minimum=1)
    out: str = setting("runs/reproduce", "Output folder: report.md, results.json, figures, and "
                       "each experiment's runs under experiments/.")
    zoo: str = setting(".opd-cache/zoo", "Zoo cache folder (one sub-folder per zoo profile).")
    workers: int = setting(0, "Experiments run at once, one torch thread each (0 = one per "
                           "CPU core).", minimum=0)
    progress: bool = setting(True, "Show a progress bar over the experiments.")


def chosen_findings(only: tuple[str, ...]) -> list[Finding]:
    """The findings named in `only` (the study's eight when empty), in number order."""
    if not only:
        return list(FINDINGS)
    by_name = {**BY_SLUG, **{str(f.number): f for f in ALL_FINDINGS}}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise OPDError(f"only: unknown finding {unknown[0]!r}; choose numbers "
                       f"1–{len(ALL_FINDINGS)} or names {', '.join(BY_SLUG)}")
    wanted = {by_name[name].number for name in only}
    return [f for f in ALL_FINDINGS if f.number in wanted]


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """A reproduction folder holds runs of one profile and one zoo; refuse to mix."""
    path = out / MANIFEST
    if not path.exists():
        return
    held = json.loads(path.read_text(encoding="utf-8"))
    for key in ("profile", "zoo_code_version"):
        if held.get(key) != manifest[key]:
            raise OPDError(f"out: {str(out)!r} holds a reproduction made with another {key} "
                           f"({held.get(key)!r}); choose a new --out or remove that folder "
                           "(nothing was changed)")


def run_reproduce(config: ReproduceConfig) -> dict[str, Any]:
    """Every chosen finding, reproduced into `config.out`; returns results.json's contents."""
    from opd.lab.zoo import build_zoo_stages
    from opd.study.report import write_report

    started = time.perf_counter()
    findings = chosen_findings(config.only)
    profile = PROFILES[config.profile]
    out = Path(config.out)
    check_output_folder(out, "out")
    check_output_folder(config.zoo, "zoo")
    names = list(dict.fromkeys(name for f in findings for name in f.experiments))
    if config.seeds < 3:
        print(f"opd reproduce: {config.seeds} seed(s): intervals are wide (one seed: unbounded) "
              "and most verdicts will be inconclusive; use --seeds 3 or more", flush=True)
    zoo_start = time.perf_counter()
    zoo = build_zoo_stages(Path(config.zoo) / profile.zoo, profile.zoo, progress=config.progress,
                    only=zoo_models(names))
    zoo_seconds = time.perf_counter() - zoo_start
    zoo["root"] = str(Path(config.zoo) / profile.zoo)
    manifest = {"profile": profile.name, "zoo_code_version": zoo["code_version"]}
    _check_manifest(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2))

    seeds = range(config.seeds)
    order = sorted(names, key=lambda n: n not in SLOW_FIRST)
    jobs = [(name, seed) for name in order for seed in seeds if read_result(out, name, seed) is None]
    done = len(names) * config.seeds - len(jobs)
    workers = min(config.workers or os.cpu_count() or 1, max(len(jobs), 1))
    bar = tqdm(total=len(names) * config.seeds, initial=done, desc="opd reproduce",
               unit="experiment", disable=not config.progress)
    ctx = JobContext(zoo, profile, str(out))
    for result in run_jobs(ctx, jobs, workers):
        bar.update()
        bar.write(f"{result['experiment']} seed {result['seed']}: {result['seconds']:.0f} s")
    bar.close()

    results = {name: [read_result(out, name, seed) for seed in seeds] for name in names}
    judged = [judge(f, results, profile) for f in findings]
    summary = {
        "profile": asdict(profile), "seeds": config.seeds, "workers": workers,
        "zoo": {"profile": zoo["profile"], "root": zoo["root"], "seconds": round(zoo_seconds, 1),
                "accuracy": {n: m["accuracy"] for n, m in zoo["models"].items()}},
        "seconds": {"total_this_call": round(time.perf_counter() - started, 1),
                    "experiments": {n: [r["seconds"] for r in rs] for n, rs in results.items()},
                    "cached_jobs": done},
        "findings": judged,
        "experiments": {n: [{k: v for k, v in r.items() if k != "series"} for r in rs]
                        for n, rs in results.items()},
    }
    write_report(out, summary, results)
    return summary

