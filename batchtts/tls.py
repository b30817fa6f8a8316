"""The TLS context of a process's HTTP clients, made once: loading the CA certificates takes some
50 ms of CPU, which each client would otherwise spend again (a run's speech client, each fetch of the
model list, every run of a program that calls `batchtts.run` many times)."""

from __future__ import annotations

import functools
import os
import ssl


def context() -> ssl.SSLContext:
    """What httpx makes for `verify=True` with the environment trusted: the certificates of
    SSL_CERT_FILE, else of SSL_CERT_DIR, else certifi's. Made again when those variables change."""
    return _context(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)


@functools.cache
def _context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """httpx's own context, which reads the variables itself: they are the arguments only to key the cache."""
    import httpx

    return httpx.create_ssl_context(verify=True, trust_env=True)
