"""`python -m controlplane` is the `switchyard` CLI."""

from controlplane.cli import main

raise SystemExit(main())
