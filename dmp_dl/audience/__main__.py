"""``python -m dmp_dl.audience``: the command in :mod:`dmp_dl.commands.audience`."""

from dmp_dl.commands.audience import main

if __name__ == "__main__":
    main()
