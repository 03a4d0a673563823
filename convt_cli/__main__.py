"""`python -m convt_cli`, and the `convt` command's entry point: the signal handlers first, then the CLI.

Installing them before click and NumPy are imported leaves only the interpreter's own start without them (a
Ctrl-C there ends Python before convt has begun).
"""


def main():
    from .interrupts import install

    install()
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":  # also imported by pytest --doctest-modules, which must not run the CLI
    main()
