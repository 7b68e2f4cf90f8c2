"""One OPD step on a batch, as data flows through it: student rollouts (`rollout`, `engines`),
scoring of student and teacher on the student's states (`scoring`), the objective
(`objectives`) and the measures (`measures`, on `distributions`)."""
