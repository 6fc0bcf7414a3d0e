"""Built-in command plugins: one thin module per command (registered in pyproject.toml)."""
