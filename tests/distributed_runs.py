"""Several training runs in one `accelerate launch` (tests/test_distributed.py): starting the
processes costs more than a tiny run, so one launch trains every configuration in turn.

`python -m accelerate.commands.launch … tests/distributed_runs.py SPEC.json`: SPEC is a list of
{"settings": {...}, "resume": bool, "probe": path or null}. After a run with a probe, every
process scores `PROBE_IDS` with the in-memory (wrapped) student and the main process writes the
log-probs to the probe file as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from opd.config.training import build_config
from opd.run.cards import FinalModelHook
from opd.run.loop import Trainer

PROBE_IDS = [[1, 4, 24, 5, 25, 9, 2], [1, 7, 24, 8, 25, 15, 26]]
"""Token ids of the tiny tokenizer (tests/conftest.py): BOS, sums, answers."""


def probe_logprobs(model: torch.nn.Module) -> list:
    """The model's next-token log-probs at every position of `PROBE_IDS`."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE_IDS)).logits
    return logits.float().log_softmax(-1).tolist()


def main(spec_file: str) -> None:
    for run in json.loads(Path(spec_file).read_text()):
        config = build_config(run["settings"])
        trainer = Trainer(config, resume=run.get("resume", False), hooks=[FinalModelHook(config)])
        trainer.run()
        if run.get("probe"):
            values = probe_logprobs(trainer.models.student)
            if trainer.procs.is_main:
                Path(run["probe"]).write_text(json.dumps(values))
        trainer.procs.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
