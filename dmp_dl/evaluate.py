"""``python -m dmp_dl.evaluate``: the command in :mod:`dmp_dl.commands.evaluate`."""

from dmp_dl.commands.evaluate import main

if __name__ == "__main__":
    main()
