"""nmi: the Node Managed Identity daemon.

Serves each Kubernetes pod the Azure AD token of the identity bound to it, over
the IMDS contract that Azure SDKs already speak.
"""

__version__ = "0.1.0"
