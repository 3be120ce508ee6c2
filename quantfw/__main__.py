"""`python -m quantfw` is the `quantfw` command."""

from quantfw.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
