"""One module per `sdft` subcommand (configure(parser), main(args) -> int); heavy imports inside main."""
