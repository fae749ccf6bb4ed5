"""One validated, immutable configuration tree, loaded from a TOML file.

Unknown keys are errors that name the file and the dotted key, with the closest known
key suggested. Relative paths resolve against the configuration file's directory.
Secrets (keys, passwords, upstream credentials) are never inline: the configuration
holds only where they are (a path, or ``credential:NAME`` for a systemd credential).
"""

from gateway.config.load import RETIRED_KEYS, load_config, parse_config
from gateway.config.models import (
    AccessLogConfig,
    AdminConfig,
    AuditConfig,
    AuthConfig,
    ChannelConfig,
    DestinationConfig,
    FieldConfig,
    GatewayConfig,
    IngressConfig,
    ListenerConfig,
    RetryConfig,
    ScannerConfig,
    SpoolConfig,
)
from gateway.config.types import (
    BATCH_MANIFEST,
    FILE_FORMATS,
    MAX_BODY_LIMIT,
    MAX_UNIX_SOCKET_PATH,
)

__all__ = [
    "BATCH_MANIFEST",
    "FILE_FORMATS",
    "MAX_BODY_LIMIT",
    "MAX_UNIX_SOCKET_PATH",
    "RETIRED_KEYS",
    "AccessLogConfig",
    "AdminConfig",
    "AuditConfig",
    "AuthConfig",
    "ChannelConfig",
    "DestinationConfig",
    "FieldConfig",
    "GatewayConfig",
    "IngressConfig",
    "ListenerConfig",
    "RetryConfig",
    "ScannerConfig",
    "SpoolConfig",
    "load_config",
    "parse_config",
]
