"""Subcommands of `deploy` (registered under `pneumofed.commands` in pyproject.toml)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "provision": ("pneumofed.deploy.cli.provision", "create CA, certificates, keys and per-party kits"),
}
