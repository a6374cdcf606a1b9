"""``python -m flywheel`` runs the CLI (used by ``flywheel up`` to start its components)."""

from flywheel.cli import main

main()
