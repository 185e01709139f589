"""The ``xenmig`` command line: one module per subcommand, progress display, pki."""
