"""emailproxy: a local IMAP/POP3/SMTP proxy that adds OAuth 2.0 to password-only mail clients."""

__version__ = "0.1.0"
APP_NAME = "Email OAuth 2.0 Proxy"
