"""One module per verb, each reading top to bottom: set-up, data, models, loop, save. `prefkd.cli` only parses and
calls these."""
