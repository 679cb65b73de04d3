"""`bfd`, the one command line: it only dispatches, importing each subcommand's module when that one is used."""
