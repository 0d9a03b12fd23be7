"""`python -m twinkle_worker`: the same as the twinkle-worker command."""

from twinkle_worker.cli import main

main()
