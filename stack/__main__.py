"""``python -m stack`` runs the CLI (used by ``flywheel up`` to start its components)."""

from stack.cli import main

main()
