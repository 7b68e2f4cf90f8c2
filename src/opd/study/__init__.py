"""`opd reproduce`: the study's findings re-run on the model organisms, judged by rules fixed in
advance, side by side with the study's numbers.

experiments (what is run, per seed, cached) → findings (claims and rules, pure) → stats
(intervals and verdicts, pure) → report (report.md, results.json, figures); `run` ties them.
"""
