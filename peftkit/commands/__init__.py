"""One module per `peftkit` sub-command; see `peftkit.cli`."""
