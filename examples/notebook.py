"""opd from a notebook, as a script: only the public API (`import opd`).

On the model organisms (the quick zoo, built here on the CPU in a few minutes and cached):
diagnose two teachers for the student, train on the one the diagnosis clears, and look at what
the run left: the measures, the accuracy, the final model folder with its model card.

    python examples/notebook.py [ZOO_ROOT] [RUN_FOLDER]
"""

import sys

import opd

root = sys.argv[1] if len(sys.argv) > 1 else ".opd-cache/zoo"
run = sys.argv[2] if len(sys.argv) > 2 else "runs/notebook"

# %% The zoo: a student that never saw a carry chain, and two teachers that did.
zoo = opd.build_zoo("quick", root, only=["student", "teacher-aligned", "teacher-foreign"])
student = zoo.models["student"]
prompts = zoo.prompt_sets["teacher-train"]
chains = zoo.prompt_sets["eval-chain-d2"]  # the sub-skill the student lacks

# %% Diagnose before training: will OPD work for this pair, and why?
for name in ("teacher-aligned", "teacher-foreign"):
    diagnosis = opd.diagnose(student, zoo.models[name], prompts, max_new_tokens=55,
                             progress=False)
    pattern = diagnosis.checks["pattern"]
    print(f"{name}: {diagnosis.verdict} (overlap share {pattern.value:.2f}, threshold "
          f"{pattern.threshold}; {diagnosis.cost.wall_seconds:.0f} s)")
    for advice in diagnosis.advice:
        print("   ", advice)

# %% Train on the teacher the diagnosis cleared.
before = opd.evaluate(student, chains, max_new_tokens=40)
result = opd.train(student=student, teacher=zoo.models["teacher-aligned"], prompts=prompts,
                   eval_prompts=chains, out=run, profile="cpu-small", max_steps=40,
                   max_new_tokens=40, eval_every=20, progress=False)
print(f"sub-skill accuracy {before.accuracy:.2f} → {result.final_accuracy:.2f} in {result.steps} steps")
print("last step:", {k: round(v, 3) for k, v in result.final_measures.items()
                     if k in ("loss", "overlap_ratio", "entropy_gap") and v is not None})
print("model folder:", result.model, "(README.md is its model card)")
