"""``nmi explain``: the identity decision of one pod, link by link.

``model`` builds the explanation (pure, from the daemon's own decision code and
read-only views), ``render`` prints it, ``admin`` is the daemon's read-only
Unix-socket endpoint and its client, ``command`` is the command line.
"""
