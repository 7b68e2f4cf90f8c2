"""Settings that several verbs declare alike: the prompt source's helps and the check of a
prompt format string."""

from __future__ import annotations

from opd.errors import OPDError, one_line

SPLIT_HELP = ("Split of a dataset folder (save_to_disk) or hub dataset (default: train, or its "
              "only split).")
PROMPT_FIELD_HELP = "Column of the prompt text (or verl-style message list)."
MESSAGES_FIELD_HELP = "Column of the chat messages (read before prompt_field when a row has both)."
ANSWER_FIELD_HELP = ("Column of the reference answer (dotted for a nested one, e.g. "
                     "reward_model.ground_truth).")
TEACHER_FIELD_HELP = "Prompt field whose value picks the teacher of each prompt (with `teachers`)."
"""Help of the prompt-source settings every verb that reads prompts declares."""


def check_template(template: str | None, path: str) -> None:
    """A prompt format string must hold `{prompt}` and nothing else in braces."""
    if template is None:
        return
    try:
        filled = template.format(prompt="\x00")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise OPDError(f"config: {path} must be a format string whose only field is {{prompt}} "
                       f"(double other braces: {{{{ }}}}); {template!r} fails "
                       f"({one_line(err, 60)})") from None
    if "\x00" not in filled:
        raise OPDError(f"config: {path} must contain {{prompt}}, got {template!r}")
