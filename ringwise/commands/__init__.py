"""The `ringwise` commands, one module each: `add_arguments(parser)` adds the command's flags,
`main(args) -> int` runs it and returns the exit status (0 done, 2 refused before any work, 1
failed). ringwise.cli holds the one registry (command -> module) and imports only the module of
the command it runs, so a module here imports torch inside its functions where its flags must
stay light (`plan`, `generate --help`, `bench X --help` run without torch).

train, finetune, export: the training job (ringwise.train); generate: ringwise.generate across
local ranks; plan: the torch-free planner (ringwise.plan); demo: the attention op measured on
local processes; bench: the suites of ringwise.bench.
"""
