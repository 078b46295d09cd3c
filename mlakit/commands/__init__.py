"""The ``mlakit`` subcommands that belong to no one tool, one module each (generate, info,
evaluate, convert, demo). Every command module, these and each tool's ``cli`` module, has
the same two functions: ``register(subparsers)`` adds its subparser (``func=run_from_args``)
and ``run_from_args(args)`` runs it; ``mlakit.cli.COMMANDS`` lists them all.
``common`` holds what several commands share: the model argument, --device/--dtype,
--runtime-rank, --kv-cache-dtype, --sparse-* and loading the model they name."""
