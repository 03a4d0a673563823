from .cli import main

if __name__ == "__main__":  # also imported by pytest --doctest-modules, which must not run the CLI
    main()
