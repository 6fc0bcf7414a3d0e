"""Built-in commands, one module each, registered through the `llmctl.commands` entry points."""
