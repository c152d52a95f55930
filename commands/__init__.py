"""partkit's command line: one module per subcommand, combined in :mod:`commands.main`."""
