"""Subcommands of ``loramerge``: each module exposes ``add_parser(subparsers)``, which registers its
subparser and sets ``func`` (taking the parsed namespace, returning the exit status)."""
