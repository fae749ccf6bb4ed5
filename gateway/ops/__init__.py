"""What operators see and use: metrics, logs, audit log, control socket, systemd."""
