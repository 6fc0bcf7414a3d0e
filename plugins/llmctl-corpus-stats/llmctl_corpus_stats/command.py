"""`llmctl corpus-stats FILE…`: documents, lines, characters, bytes, words, top words."""

from typing import Annotated

import typer

from llmctl.console import console, emit, progress, table
from llmctl.errors import DataError


def corpus_stats(
    files: Annotated[list[str], typer.Argument(help="Text (.txt, .jsonl, .gz) files, or - for stdin.")],
    top: Annotated[int, typer.Option(help="How many of the most frequent words to show.")] = 10,
) -> None:
    """Streaming statistics of text corpora, in constant memory."""
    import os

    from llmctl_corpus_stats.stats import scan

    total = sum(os.path.getsize(f) for f in files if f != "-" and os.path.isfile(f))
    results = []
    with progress("scanning", total=total or None, unit="B") as bar:
        for path in files:
            if path != "-" and not os.path.isfile(path):
                raise DataError(f"{path}: no such file")
            try:
                results.append(scan(path, on_bytes=bar.advance))
            except (OSError, ValueError) as exc:
                raise DataError(str(exc)) from None

    def render() -> None:
        rows = [[r.name, r.documents, r.lines, r.characters, r.bytes, r.words] for r in results]
        console.print(table("corpus", ["file", "documents", "lines", "characters", "bytes", "words"], rows))
        for r in results:
            mark = " (approximate)" if r.approximate else ""
            console.print(f"[bold]{r.name}[/bold] top words{mark}: " + ", ".join(f"{w} {c}" for w, c in r.top(top)))

    emit([r.to_dict(top) for r in results], render)
