"""Node interception: the daemon side of the iptables rules and the node network facts."""
