"""partkit's command line, installed as ``partkit.cli`` from the top-level ``commands/`` folder: one module per
subcommand, combined in :mod:`partkit.cli.main`."""
