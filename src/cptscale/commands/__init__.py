"""The CLI handlers of every ``cptscale`` subcommand: argument parsing, printing and exit codes around the
stage modules, which never import this layer."""
