"""The command-line programs: gatewayd (the daemon) and gatewayctl (its administration)."""
