"""Who may connect and post: the device and staff registries, staff logins."""
