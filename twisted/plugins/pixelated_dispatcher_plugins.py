"""twistd plugins: ``twistd pixelated-manager`` and ``twistd pixelated-proxy``.

Kept tiny on purpose: Twisted imports every plugin module whenever any
``twistd`` runs, so the real work lives in the ``tap`` modules, imported lazily.
"""
from twisted.application.service import ServiceMaker

pixelated_manager = ServiceMaker(
    "pixelated-manager", "pixelated_dispatcher.manager.tap",
    "Root-side manager of users, sessions and agents", "pixelated-manager")
pixelated_proxy = ServiceMaker(
    "pixelated-proxy", "pixelated_dispatcher.proxy.tap",
    "Internet-facing HTTPS login and reverse proxy", "pixelated-proxy")
