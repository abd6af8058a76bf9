"""``python -m dmp_dl.privacy``: the command in :mod:`dmp_dl.commands.privacy`."""

from dmp_dl.commands.privacy import main

if __name__ == "__main__":
    main()
