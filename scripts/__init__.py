"""The command-line programs, installed as the package `llama_cli` (see setup.py): each module's
main() is a console command (pyproject.toml's [project.scripts]), and each file also runs as
`python scripts/NAME.py` from a checkout."""
