"""``python -m hessspec``: the same command line as the ``hessspec`` script."""

from hessspec.cli import main

if __name__ == "__main__":
    main()
