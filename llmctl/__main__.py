"""`python -m llmctl …` and `torchrun … -m llmctl train …`."""

from llmctl.cli import main

if __name__ == "__main__":
    main()
