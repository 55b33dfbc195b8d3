"""The controller (``nmi mic``): assigns identities to pods and puts them on the nodes' VMs.

``flags`` (the command line) → ``app`` (composition, leader election in
``leader``) → ``controller`` (one pod at a time: ``desired`` state over the
``view``, written through ``writes``) and ``machines`` (one coalesced ARM
change per VM or scale set at a time, recorded in the ``ledger``).
"""
