"""The run's teachers: in process or served, one per run or one per prompt field value
(`build`); the teacher as a service, `opd serve-teacher` (`server`, `vllm_backend`), its JSON
wire format (`protocol`) and the client every verb scores through (`client`)."""
