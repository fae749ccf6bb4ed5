"""The device-facing edge: listeners, the HTTP app, admission, intake, problems."""
