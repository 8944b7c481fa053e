"""Numerical agreement: the reference against the fast engine, the factored pursuit, the
torch port, model internals and third-party implementations, plus golden vectors that any
port can be checked against (``somp-ref verify``)."""
