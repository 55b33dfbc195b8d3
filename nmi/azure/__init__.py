"""Azure for the controller (MIC): cloud configuration, the ARM credential, node ids, identities.

Why a package of its own: the controller puts user-assigned managed identities on
the nodes' VMs and scale sets through Azure Resource Manager, and everything it
needs to do that - which cloud and subscription (:mod:`.cloud`), which
credential (:mod:`.credentials`), which VM or scale set a node is
(:mod:`.provider_id`), and the one door to ARM (:mod:`.identities`) - lives
here, below the controller and apart from the daemon, which never imports it
(the Azure SDK stays out of the daemon's process).  Nothing is re-exported:
``nmi.azure.provider_id`` must stay importable without loading the SDK.
"""
