"""Settings: the config system (`settings`), the names each choice may take (`choices`), the
fields several verbs share (`fields`) and a training run's settings (`training`). A leaf: it
imports nothing that implements what it configures."""
