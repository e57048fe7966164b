"""``python -m postwarden`` runs the command line."""

from postwarden.cli import main

raise SystemExit(main())
