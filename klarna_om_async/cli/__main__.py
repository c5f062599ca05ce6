"""``python -m klarna_om_async.cli``: the same as the ``klarna-om`` console script."""

from . import main

main(prog_name="klarna-om")
