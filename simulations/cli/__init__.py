"""Subcommands of `simulations` (registered under `pneumofed.commands` in pyproject.toml)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("pneumofed.simulations.cli.simulate", "run a local multicentre Flower simulation"),
    "experiment": ("pneumofed.simulations.cli.experiment", "centralised vs federated vs local-only from one config"),
}
