"""Access rules now live in `stemlive.protocol.security` (shared with the dashboard); this name stays."""
from ..protocol.security import (MIN_TOKEN_CHARS, check_bind, check_token, is_loopback, secure_client,
                                 secure_server, server_keys)

__all__ = ["MIN_TOKEN_CHARS", "check_bind", "check_token", "is_loopback", "secure_client", "secure_server",
           "server_keys"]
