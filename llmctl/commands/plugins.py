"""`llmctl plugins`: installed command plugins and where each command comes from."""

from llmctl.console import console, emit, table


def plugins() -> None:
    """List installed command plugins: command, distribution, version, status."""
    from llmctl.plugins import discover

    found = discover()

    def render() -> None:
        rows = [
            [p.name, p.dist, p.version, "built-in" if p.builtin else "plugin", p.status + (f": {p.problem}" if p.problem else ""), p.target]
            for p in found
        ]
        console.print(table("llmctl commands", ["command", "distribution", "version", "kind", "status", "target"], rows))

    emit([p.to_dict() for p in found], render)
