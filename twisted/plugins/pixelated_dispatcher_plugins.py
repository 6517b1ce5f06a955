"""twistd plugins: ``twistd pixelated-manager`` and ``twistd pixelated-proxy``.

Kept tiny on purpose: Twisted imports every plugin module whenever any
``twistd`` runs, so the real work lives in the ``tap`` modules, imported lazily.
"""
from twisted.application.service import ServiceMaker


class _ServiceMaker(ServiceMaker):
    """Its options exit with status 1 on a usage error, also on Twisted 22.4
    (``pixelated_dispatcher.twistd_exit``)."""

    @property
    def options(self):
        from pixelated_dispatcher.twistd_exit import exiting_on_usage_error
        return exiting_on_usage_error(super().options, self.tapname)


pixelated_manager = _ServiceMaker(
    "pixelated-manager", "pixelated_dispatcher.manager.tap",
    "Root-side manager of users, sessions and agents", "pixelated-manager")
pixelated_proxy = _ServiceMaker(
    "pixelated-proxy", "pixelated_dispatcher.proxy.tap",
    "Internet-facing HTTPS login and reverse proxy", "pixelated-proxy")
