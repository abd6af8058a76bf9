"""``python -m dmp_dl.export``: the command in :mod:`dmp_dl.commands.export`."""

from dmp_dl.commands.export import main

if __name__ == "__main__":
    main()
